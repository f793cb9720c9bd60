"""The only package that talks to Ray Train and Ray Tune.

Modules here import Ray lazily where they can, so that pure-torch code and the CLI's
start-up stay fast. ``checkpoint`` and ``options`` are plain Python/torch.
"""
