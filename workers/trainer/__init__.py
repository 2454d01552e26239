"""QLoRA trainer workers: training data, packing, the recipe, EWC, SSR, checkpoints.

Torch and friends are imported only by the modules that need them (the `train` extra).
"""
