"""Serving: an OpenAI-compatible HTTP server over the Model API, with continuous batching and metrics."""
