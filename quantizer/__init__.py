"""coder-quant: one-pass, selectively preserved GGUF builder."""

from server.native import share_libstdcxx

__version__ = "0.1.0"

share_libstdcxx()  # before llama.cpp's libraries load (quantize API, ggml): see server/native.py
