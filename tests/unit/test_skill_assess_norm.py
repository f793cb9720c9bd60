"""`raylab assess` with a model trained on per-recording normalisation (no Ray)."""

from __future__ import annotations

import numpy as np
import torch

from raylab.methods.skill.assess import SkillAssessor
from raylab.methods.skill.config import SkillConfig
from raylab.transforms.windows import trial_stats, znorm


class _Recorder(torch.nn.Module):
    """Stands in for SkillNet: keeps every input, answers uniform probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return torch.zeros(x.shape[0], 3)


def test_live_windows_use_the_recording_statistics_so_far() -> None:
    assessor = object.__new__(SkillAssessor)
    assessor.cfg = SkillConfig(window=4, step=2, normalize="recording")
    assessor.stats = None
    assessor.class_names = ["novice", "intermediate", "expert"]
    assessor.model = _Recorder()
    frames = np.random.default_rng(0).normal(3.0, 2.0, size=(11, 5)).astype(np.float32)
    result = assessor.stream(frames)
    ends = [4, 6, 8, 10]
    assert len(assessor.model.seen) == len(ends) == len(result.probs)
    for end, x in zip(ends, assessor.model.seen):
        # Causal: the statistics of frames 0..end-1 only, never a later frame.
        expected = znorm(frames[end - 4:end], trial_stats(frames[:end]))
        np.testing.assert_allclose(x[0].numpy(), expected, rtol=1e-5, atol=1e-5)
