"""coder-serve: OpenAI-compatible local coding server over llama.cpp."""

__version__ = "0.1.0"
