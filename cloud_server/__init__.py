"""DLoRA cloud server: holds the frozen LLM and serves remote LoRA steps over gRPC."""
