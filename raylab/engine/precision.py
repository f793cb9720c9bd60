"""Mixed-precision contexts (pure torch: used inside Ray workers and in plain benchmarks)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch


def autocast(device: torch.device, precision: str) -> Any:
    """``torch.autocast`` for ``precision`` in {"fp32", "bf16", "fp16"}."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
