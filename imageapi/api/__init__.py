"""The HTTP layer's helpers: request handlers, validators, error mapping and ASGI middlewares."""
