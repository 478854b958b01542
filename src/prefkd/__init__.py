"""prefkd: knowledge distillation of large language models, within and across tokenizers."""

__version__ = "0.1.0"
