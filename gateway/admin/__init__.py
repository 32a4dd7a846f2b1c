"""The admin plane: admin API, OpenAPI document, metrics and the web page."""
