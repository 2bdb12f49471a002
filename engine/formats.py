"""Result formats: the one list, shared by the worker (engine/encode.py), the HTTP API
(gateway/handlers.py, gateway/openapi.py) and the README's table. Name -> media type."""

MEDIA_TYPES = {
    "json": "application/json",
    "arrow": "application/vnd.apache.arrow.stream",
    "csv": "text/csv; charset=utf-8",
    "ndjson": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
}
FORMATS = tuple(MEDIA_TYPES)
