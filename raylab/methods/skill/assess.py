"""Online skill assessment: stream one recording window by window through a trained model.

This is the paper's "online" use: every L frames (1 s at 30 Hz for L=30) the most recent
W frames are classified, and the running estimate is the mean of the per-window class
probabilities so far. Pure torch; no Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raylab.config import from_dict
from raylab.data.jigsaws import read_kinematics
from raylab.engine.checkpoint import load_checkpoint, load_meta, restore_checkpoint
from raylab.errors import CheckpointError, DataError
from raylab.methods.skill.config import SkillConfig
from raylab.methods.skill.task import build_model
from raylab.transforms.windows import ChannelStats, ChannelStatsAccumulator, znorm

FRAME_RATE_HZ = 30.0


@dataclass
class Assessment:
    times_s: np.ndarray          # end time of each window, seconds from the start
    probs: np.ndarray            # [N, C] per-window class probabilities
    running: np.ndarray          # [N, C] running mean of probabilities
    latency_ms: np.ndarray       # per-window model latency
    class_names: list[str]

    @property
    def estimate(self) -> str:
        return self.class_names[int(self.running[-1].argmax())]


class SkillAssessor:
    """A trained skill model with its normalisation, ready for streaming inference."""

    def __init__(self, checkpoint: str | Path, threads: int = 1) -> None:
        meta = load_meta(checkpoint)
        if meta.get("method") != "skill":
            raise CheckpointError(f"{checkpoint}: a {meta.get('method')!r} checkpoint, "
                                  "expected one from `raylab train skill`")
        self.cfg = from_dict(SkillConfig, meta["config"])
        # None: the model was trained on recordings normalised with their own statistics.
        self.stats = None if meta.get("stats") is None else ChannelStats.from_dict(meta["stats"])
        self.class_names = list(meta["class_names"])
        self.n_channels = int(meta["n_channels"])
        self.model = build_model(self.cfg, len(self.class_names), self.n_channels)
        restore_checkpoint(load_checkpoint(checkpoint), model=self.model, restore_rng=False,
                           where=str(checkpoint))
        self.model.eval()
        torch.set_num_threads(threads)

    @torch.inference_mode()
    def stream(self, frames: np.ndarray) -> Assessment:
        """Classify each window as it would arrive live; time only the model's work (and
        the normalisation). A model trained with ``normalize: recording`` normalises each
        window with the statistics of the recording's frames up to its end."""
        w, step = self.cfg.window, self.cfg.step
        if frames.shape[0] < w:
            raise DataError(f"recording has {frames.shape[0]} frames, fewer than the "
                            f"model's window of {w}")
        ends = np.arange(w, frames.shape[0] + 1, step)
        probs, latency = [], []
        # Live, a recording's own statistics can only cover the frames seen so far.
        seen, start = ChannelStatsAccumulator(), 0
        for end in ends:
            window = frames[end - w:end]
            t0 = time.perf_counter()
            stats = self.stats
            if stats is None:
                seen.update(frames[start:end])
                start, stats = end, seen.result()
            x = torch.from_numpy(znorm(window, stats)).unsqueeze(0)
            p = torch.softmax(self.model(x), dim=1)[0].numpy()
            latency.append((time.perf_counter() - t0) * 1e3)
            probs.append(p)
        probs_arr = np.stack(probs)
        running = np.cumsum(probs_arr, 0) / np.arange(1, len(probs_arr) + 1)[:, None]
        return Assessment(ends / FRAME_RATE_HZ, probs_arr, running, np.asarray(latency),
                          self.class_names)


def assess_file(checkpoint: str | Path, file: str | Path, out: str | Path | None = None,
                quiet: bool = False) -> Assessment:
    """`raylab assess`: print the running estimate per window and write the timeline."""
    from raylab.plots import plot_timeline

    assessor = SkillAssessor(checkpoint)
    frames = read_kinematics(file)
    if frames.shape[1] != assessor.n_channels:
        raise DataError(f"expected {assessor.n_channels} channels, got {frames.shape[1]}",
                        path=file)
    result = assessor.stream(frames)
    names = result.class_names
    if not quiet:
        print(f"{'t (s)':>7}  " + "  ".join(f"{n[:6]:>6}" for n in names) + "   running")
        for t, p, r in zip(result.times_s, result.probs, result.running):
            print(f"{t:7.1f}  " + "  ".join(f"{v:6.3f}" for v in p)
                  + f"   {names[int(r.argmax())]} ({r.max():.2f})")
    out = Path(out) if out else Path(str(file) + ".timeline.png")
    plot_timeline(result.times_s, result.probs, names, out, running=result.running,
                  title=f"{Path(file).name}: online skill estimate")
    lat = result.latency_ms
    print(f"\nestimate: {result.estimate} (mean probability {result.running[-1].max():.3f}) "
          f"after {len(lat)} windows of {assessor.cfg.window} frames")
    print(f"latency per window: median {np.median(lat):.3f} ms, p95 "
          f"{np.percentile(lat, 95):.3f} ms (1 thread)")
    print(f"timeline: {out}")
    return result


