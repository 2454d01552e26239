"""QLoRA trainer workers: model loading, chat encoding, packing, EWC, checkpoints, registry.

Torch and friends are imported only by the modules that need them (the `train` extra).
"""
