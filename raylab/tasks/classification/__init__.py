"""Supervised image classification: configs, image data on the driver, the step and the
worker-side task.

- :mod:`.config`: :class:`ImageDataConfig`, :class:`ClassificationConfig` (recipe pieces);
- :mod:`.data`: split lookup, the hold-out for Tune, decoding and augmentation in Ray Data;
- :mod:`.step`: :class:`ClassificationStep`, one optimisation step in plain torch;
- :mod:`.task`: :class:`ClassificationTask`, the engine's hooks.
"""
