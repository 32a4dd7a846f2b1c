"""The admin plane: the admin API, its OpenAPI document and the web page."""
