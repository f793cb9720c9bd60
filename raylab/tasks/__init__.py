"""What several methods share: a task family's data pipeline, step and loop hooks.

- :mod:`.classification`: image shards, timm classifiers, the ConvNeXt recipe's step
  (ConvNeXt; MiniViT's distillation builds on its ``loss`` hook; DINO and CLEAR reuse its
  image data).
"""
