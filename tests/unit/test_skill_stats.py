"""Channel statistics of the skill method from rows the driver holds (pure pyarrow/numpy)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from raylab.errors import DataError
from raylab.methods.skill.data import table_channel_stats

C = 76  # JIGSAWS kinematic channels


def _table(trials: dict[str, np.ndarray]) -> pa.Table:
    """Rows shaped like the shards: a name and the flat [T * C] kinematics of a trial."""
    return pa.table({"name": list(trials),
                     "kinematics": pa.array([a.reshape(-1) for a in trials.values()],
                                            type=pa.list_(pa.float32()))})


def test_matches_numpy_over_the_selected_trials_only():
    rng = np.random.default_rng(0)
    trials = {f"t{i}": (rng.normal(i, 1 + i, size=(20 + 7 * i, C))).astype(np.float32)
              for i in range(6)}
    first = _table({k: trials[k] for k in ("t0", "t1", "t2")})
    # A slice, as the block cutting in runtime.datasets makes: offsets must be honoured.
    second = _table({k: trials[k] for k in ("t3", "t4", "t5")}).slice(1, 2)
    names = {"t0", "t2", "t4", "t5", "absent"}
    stats = table_channel_stats([first, second], names)
    chosen = np.concatenate([trials[k] for k in ("t0", "t2", "t4", "t5")]).astype(np.float64)
    np.testing.assert_allclose(stats.mean, chosen.mean(0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats.std, chosen.std(0), rtol=1e-9, atol=0)
    # t1 (not chosen) and t3 (sliced away) would move the mean far from this:
    assert not np.allclose(stats.mean, np.concatenate(list(trials.values())).mean(0))


def test_no_selected_trial_is_a_clear_error():
    table = _table({"t0": np.zeros((5, C), dtype=np.float32)})
    with pytest.raises(DataError, match="no frames were seen"):
        table_channel_stats([table], {"other"})
