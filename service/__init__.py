"""score-service: the HTTP/WebSocket service and its core (settings, keys, scripts, models)."""
