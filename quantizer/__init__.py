"""coder-quant: one-pass, selectively preserved GGUF builder."""

__version__ = "0.1.0"
