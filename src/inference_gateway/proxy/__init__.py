"""The request path: the HTTP application, the /v1 handler, payload, relay, upstream, SSE."""
