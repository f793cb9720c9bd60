"""raylab: train, tune and evaluate 2022 computer-vision methods on a Ray cluster."""

__version__ = "0.1.0"
