"""Client side: the Ray actor that trains and evaluates LoRA adapters for (virtual) clients."""
