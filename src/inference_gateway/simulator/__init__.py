"""A stand-in for vLLM's OpenAI server for development, load and fault tests.

It answers with vLLM's JSON and SSE shapes, deterministic token counts (one token per word or
punctuation mark) and configurable timing. The gateway never imports it.
"""
