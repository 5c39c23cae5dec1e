"""DLoRA edge client: private data, tokenizer, embedding, LM head and the live LoRA adapters."""
