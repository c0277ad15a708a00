"""coder-serve: OpenAI-compatible local coding server over llama.cpp."""

from server.native import share_libstdcxx

__version__ = "0.1.0"

share_libstdcxx()  # before any module here imports llama_cpp: see server/native.py
