"""OpenAI-compatible HTTP server over the serving engine (``slimlm serve MODEL``); see docs/serving.md."""
