"""The model: its spec and tensor names, the checkpoint reader and writer, the tokenizer, the PyTorch reference, synthetic checkpoints."""
