"""Serving: the streaming inspector (web page + SSE) and the OpenAI-compatible API over one model."""
