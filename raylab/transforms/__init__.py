"""Pure numpy/torch transforms run inside Ray Data ``map_batches`` (no Ray import here).

``windows``: sliding windows and per-channel z-normalisation of kinematic time series.
``images``: decoding, timm train/eval transforms, Mixup/CutMix wiring for image batches.
"""
