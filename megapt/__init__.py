"""megapt: pretrain decoder-only transformers from scratch on many GPUs and nodes."""

__version__ = "0.1.0"
