"""`encdec serve`: an OpenAI-compatible HTTP server with continuous batching over the decoding engine."""
