"""fedsim: simulate federated, privacy-preserving LoRA fine-tuning of LLM recommenders on Ray."""
__version__ = "0.1.0"
