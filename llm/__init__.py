"""llm: a PyTorch-native, extensible training framework for language models."""
