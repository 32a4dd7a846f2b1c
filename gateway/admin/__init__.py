"""The admin plane: admin API, OpenAPI document, metrics."""
