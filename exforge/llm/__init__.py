"""The model contract: chat encoding, decoding, model loading and LoRA merge, the model
registry and its promotion gate."""
