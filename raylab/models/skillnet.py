"""The surgical skill CNN of Wang & Majewicz Fey (IJCARS 2018, arXiv 1806.05796).

Ten layers: 3 x (Conv1d -> ReLU -> MaxPool1d -> Dropout 0.2), Flatten, FC -> ReLU ->
Dropout 0.5, FC to the class logits (the softmax lives in the cross-entropy loss). The paper
does not give widths or kernel sizes, so they are constructor arguments that Tune searches.
The model offers timm's backbone surface (``forward_features``, ``forward_head``,
``reset_classifier``, ``num_features``) so that generic code (linear probes, frozen
backbones) works on it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from raylab.errors import ConfigError, DataError


def _conv_block(c_in: int, c_out: int, kernel_size: int, pool: int, p: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
        nn.ReLU(inplace=True),
        nn.MaxPool1d(pool),
        nn.Dropout(p),
    )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"SkillNet {name} must be an integer >= 1, got {value!r}")


def _check_prob(**values: float) -> None:
    for name, value in values.items():
        if not 0.0 <= float(value) < 1.0:
            raise ConfigError(f"SkillNet {name} must be in [0, 1), got {value!r}")


class SkillNet(nn.Module):
    """1-D CNN classifying a kinematics window ``[B, W, C]`` into skill levels.

    Args:
        in_channels: Kinematic channels ``C`` per frame (JIGSAWS: 76).
        window: Window width ``W`` in frames; fixes the size of the first FC layer.
        num_classes: Output classes (N/I/E: 3). 0 gives a model without classifier, whose
            ``forward`` returns the pre-logits features (timm convention).
        channels: Output channels of each conv block (one block per entry; the paper has 3).
        kernel_size: Conv kernel size; padding ``kernel_size // 2`` keeps the length for odd
            kernels.
        pool: Max-pool kernel and stride after each conv.
        fc_dim: Width of the hidden FC layer.
        dropout_conv: Dropout after each conv block.
        dropout_fc: Dropout after the hidden FC layer.

    Raises:
        ConfigError: A size is not a positive integer, a dropout is outside [0, 1), or the
            window is too short to survive the pools.
    """

    def __init__(
        self,
        in_channels: int = 76,
        window: int = 60,
        num_classes: int = 3,
        channels: Sequence[int] = (64, 128, 256),
        kernel_size: int = 5,
        pool: int = 2,
        fc_dim: int = 128,
        dropout_conv: float = 0.2,
        dropout_fc: float = 0.5,
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        if not channels:
            raise ConfigError("SkillNet channels must list at least one conv width")
        _check_positive(in_channels=in_channels, window=window, kernel_size=kernel_size,
                        pool=pool, fc_dim=fc_dim)
        _check_positive(**{f"channels[{i}]": c for i, c in enumerate(channels)})
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ConfigError(f"SkillNet num_classes must be an integer >= 0, got {num_classes!r}")
        _check_prob(dropout_conv=dropout_conv, dropout_fc=dropout_fc)

        length = window
        for i in range(len(channels)):
            length = (length + 2 * (kernel_size // 2) - kernel_size + 1) // pool
            if length < 1:
                raise ConfigError(
                    f"SkillNet window {window} is too short for {len(channels)} conv blocks "
                    f"with kernel {kernel_size} and pool {pool}: the length is {length} after "
                    f"block {i + 1}; use a wider window or fewer/smaller pools"
                )

        self.in_channels = in_channels
        self.window = window
        self.num_classes = num_classes
        self.feature_length = length
        self.num_features = channels[-1] * length
        self.head_hidden_size = fc_dim

        widths = (in_channels, *channels)
        self.features = nn.Sequential(*(
            _conv_block(widths[i], widths[i + 1], kernel_size, pool, dropout_conv)
            for i in range(len(channels))
        ))
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(self.num_features, fc_dim)
        self.act = nn.ReLU(inplace=True)
        self.head_drop = nn.Dropout(dropout_fc)
        self.fc = nn.Linear(fc_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        """The final classification layer (timm surface)."""
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final layer with a fresh one for ``num_classes`` (0: none)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ConfigError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        self.num_classes = num_classes
        device = self.fc1.weight.device
        self.fc = (nn.Linear(self.head_hidden_size, num_classes, device=device)
                   if num_classes > 0 else nn.Identity())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Conv features of ``x`` ``[B, W, C]``, flattened to ``[B, num_features]``.

        Raises:
            DataError: ``x`` is not ``[B, window, in_channels]``.
        """
        if x.ndim != 3 or x.shape[1] != self.window or x.shape[2] != self.in_channels:
            raise DataError(
                f"SkillNet expects windows [B, {self.window}, {self.in_channels}] "
                f"(time-major), got {tuple(x.shape)}"
            )
        x = self.features(x.transpose(1, 2))
        return self.flatten(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """FC -> ReLU -> Dropout, then the classifier unless ``pre_logits``."""
        x = self.head_drop(self.act(self.fc1(x)))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for windows ``[B, W, C]``."""
        return self.forward_head(self.forward_features(x))
