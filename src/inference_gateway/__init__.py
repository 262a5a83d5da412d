"""An OpenAI-compatible gateway in front of vLLM that meters every token into Postgres."""

__version__ = "0.1.0"
