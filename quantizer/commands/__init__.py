"""Sub-commands of `coder-quant`; each module exposes register(subparsers)."""
