"""Base models, LoRA adapters as flat buffers, and Yes/No preference scoring."""
