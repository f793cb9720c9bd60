"""Pure numpy steps of CLEAR's stream curation (Lin et al., NeurIPS 2021 Datasets track).

CLEAR built its benchmark from a pool of timestamped images: split the pool into buckets by
upload time, rank every image by CLIP cosine similarity to text queries of each class (several
prompts per class, averaged: "prompt engineering"), keep the top-ranked images of each class in
each bucket, drop images that rank high for several classes as ambiguous, and draw a
background class from images that rank low for every class.

No model runs here: image and prompt embeddings come in as arrays, so the whole selection is
deterministic and testable on synthetic data.
"""

from __future__ import annotations

import datetime as dt
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from raylab.errors import ConfigError

# ------------------------------------------------------------------------- time buckets


def bucket_edges(timestamps: np.ndarray, n_buckets: int) -> np.ndarray:
    """Edges that split timestamps into buckets of (nearly) equal counts.

    Args:
        timestamps: Timestamps of the pool (any shape; flattened), e.g. POSIX seconds.
        n_buckets: How many buckets.

    Returns:
        ``n_buckets + 1`` float64 edges at the timestamps' quantiles (``np.quantile``,
        linear interpolation); the first is the minimum and the last the maximum.

    Raises:
        ConfigError: ``n_buckets < 1``, no timestamps, a non-finite timestamp, or two edges
            that coincide (too few distinct timestamps for that many buckets).
    """
    if isinstance(n_buckets, bool) or not isinstance(n_buckets, numbers.Integral) \
            or n_buckets < 1:
        raise ConfigError(f"n_buckets must be an integer >= 1, got {n_buckets!r}")
    ts = np.asarray(timestamps, dtype=np.float64).ravel()
    if ts.size == 0:
        raise ConfigError("no timestamps to split into buckets")
    if not np.isfinite(ts).all():
        bad = int(np.flatnonzero(~np.isfinite(ts))[0])
        raise ConfigError(f"timestamp {bad} is not finite ({ts[bad]})")
    edges = np.quantile(ts, np.linspace(0.0, 1.0, int(n_buckets) + 1))
    if (np.diff(edges) <= 0).any():
        distinct = np.unique(ts).size
        raise ConfigError(f"cannot split into {n_buckets} time buckets: two bucket edges "
                          f"coincide ({distinct} distinct timestamps among {ts.size}); "
                          "use fewer buckets")
    return edges


def _edge_seconds(index: int, entry: object) -> float:
    """POSIX seconds of one date edge, or a ConfigError naming it."""
    where = f"date edge {index} ({entry!r})"
    if isinstance(entry, bool):  # True is an int, but never meant as a time
        raise ConfigError(f"{where} is not a date or a number of seconds")
    if isinstance(entry, numbers.Real):
        value = float(entry)
        if not math.isfinite(value):
            raise ConfigError(f"{where} is not finite")
        return value
    if isinstance(entry, str):
        text = entry.strip()
        # Python 3.10's fromisoformat does not take the "Z" suffix for UTC.
        if text[-1:] in ("Z", "z"):
            text = text[:-1] + "+00:00"
        try:
            entry = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ConfigError(f"{where} is not an ISO-8601 date or datetime") from None
    if isinstance(entry, dt.date) and not isinstance(entry, dt.datetime):
        entry = dt.datetime(entry.year, entry.month, entry.day)  # YAML loads dates so
    if isinstance(entry, dt.datetime):
        if entry.tzinfo is None:
            entry = entry.replace(tzinfo=dt.timezone.utc)
        return entry.timestamp()
    raise ConfigError(f"{where} is not a date or a number of seconds")


def parse_date_edges(edges: Sequence[str | float | int]) -> np.ndarray:
    """Bucket edges given as dates or POSIX seconds, as float64 POSIX seconds.

    Args:
        edges: ISO-8601 dates or datetimes (``"2020-01-01"``, ``"2020-06-01T12:00:00Z"``; a
            naive one means UTC) or POSIX seconds. ``datetime.date``/``datetime`` objects,
            as YAML loads unquoted dates, are taken too.

    Returns:
        The edges as float64 POSIX seconds.

    Raises:
        ConfigError: Fewer than two edges, an entry that is neither a date nor a finite
            number, or an entry not after the one before it (the message names its index
            and text).
    """
    if isinstance(edges, (str, bytes)):
        raise ConfigError(f"date edges must be a list, got the single value {edges!r}")
    entries = list(edges)
    if len(entries) < 2:
        raise ConfigError(f"need at least 2 date edges, got {len(entries)}")
    seconds = np.array([_edge_seconds(i, e) for i, e in enumerate(entries)], dtype=np.float64)
    for i in range(1, len(entries)):
        if seconds[i] <= seconds[i - 1]:
            raise ConfigError(f"date edge {i} ({entries[i]!r}) is not after date edge "
                              f"{i - 1} ({entries[i - 1]!r}); edges must increase strictly")
    return seconds


def assign_buckets(timestamps: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The time bucket of each timestamp.

    Args:
        timestamps: Timestamps (any shape), in the unit of ``edges``.
        edges: Strictly increasing bucket edges, at least two.

    Returns:
        int64 bucket index per timestamp, in the shape of ``timestamps``: bucket ``i`` holds
        ``edges[i] <= t < edges[i + 1]``; ``t == edges[-1]`` goes into the last bucket (so
        edges from :func:`bucket_edges` leave no image out); a timestamp outside
        ``[edges[0], edges[-1]]`` (or NaN) gets -1.

    Raises:
        ConfigError: ``edges`` is not 1-D, has fewer than two entries, or does not increase
            strictly.
    """
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2:
        raise ConfigError(f"bucket edges must be a 1-D list of at least 2, got shape {e.shape}")
    if not (np.diff(e) > 0).all():
        raise ConfigError("bucket edges must increase strictly")
    ts = np.asarray(timestamps, dtype=np.float64)
    idx = np.searchsorted(e, ts, side="right").astype(np.int64) - 1
    n = e.size - 1
    idx[ts == e[-1]] = n - 1
    idx[(idx >= n) | np.isnan(ts)] = -1
    return idx


# ------------------------------------------------------------------------- CLIP scores


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm; a zero row stays zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def class_embeddings(prompt_embeddings: Sequence[np.ndarray]) -> np.ndarray:
    """One unit embedding per class from its prompts' embeddings (prompt ensembling).

    Each prompt row is L2-normalised first, so that no prompt weighs more for a longer
    vector; the mean is normalised again so that cosine scores are plain dot products.

    Args:
        prompt_embeddings: One ``(P_c, D)`` array per class (a 1-D array is one prompt).

    Returns:
        ``(C, D)`` float32 unit vectors.

    Raises:
        ConfigError: No classes, a class without prompts, a non-finite value, dimensions that
            differ between classes, or a zero vector (a prompt, or a class whose prompts
            cancel out).
    """
    if len(prompt_embeddings) == 0:
        raise ConfigError("no classes: class_embeddings needs one prompt array per class")
    out = []
    dim = None
    for c, prompts in enumerate(prompt_embeddings):
        p = np.atleast_2d(np.asarray(prompts, dtype=np.float64))
        if p.ndim != 2 or p.shape[0] == 0:
            raise ConfigError(f"class {c} has no prompt embeddings (shape {p.shape})")
        if dim is None:
            dim = p.shape[1]
        if p.shape[1] != dim:
            raise ConfigError(f"class {c} prompt embeddings have dimension {p.shape[1]}, "
                              f"class 0's have {dim}")
        if not np.isfinite(p).all():
            raise ConfigError(f"class {c} prompt embeddings are not all finite")
        norms = np.linalg.norm(p, axis=1)
        if (norms == 0).any():
            raise ConfigError(f"class {c} prompt {int(np.flatnonzero(norms == 0)[0])} "
                              "embedding is a zero vector")
        mean = (p / norms[:, None]).mean(axis=0)
        length = np.linalg.norm(mean)
        if length == 0:
            raise ConfigError(f"class {c} prompt embeddings cancel out to a zero vector")
        out.append(mean / length)
    return np.stack(out).astype(np.float32)


def cosine_scores(image_embeddings: np.ndarray, class_embeds: np.ndarray) -> np.ndarray:
    """Cosine similarity of every image to every class.

    Args:
        image_embeddings: ``(N, D)`` image embeddings.
        class_embeds: ``(C, D)`` class embeddings (from :func:`class_embeddings`).

    Returns:
        ``(N, C)`` float32 similarities in [-1, 1]; both sides are normalised here, and a
        zero row (image or class) scores 0.

    Raises:
        ConfigError: An input that is not 2-D, or dimensions that differ.
    """
    dtype = np.result_type(np.float32, np.asarray(image_embeddings).dtype,
                           np.asarray(class_embeds).dtype)
    x = np.asarray(image_embeddings, dtype=dtype)
    c = np.asarray(class_embeds, dtype=dtype)
    if x.ndim != 2 or c.ndim != 2:
        raise ConfigError(f"embeddings must be 2-D, got images {x.shape} and classes {c.shape}")
    if x.shape[1] != c.shape[1]:
        raise ConfigError(f"image embeddings have dimension {x.shape[1]}, class embeddings "
                          f"{c.shape[1]}")
    scores = _normalise_rows(x) @ _normalise_rows(c).T
    # Rounding can push a unit dot product just past 1.
    return np.clip(scores, -1.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class BucketSelection:
    """Images kept from one time bucket, and those dropped as ambiguous.

    Attributes:
        indices: int64 row indices into the bucket's images that were kept, grouped by label
            (classes in order, background last), each group by score descending.
        labels: int64 class index per kept row; the background class is index ``C`` (one
            past the last query class).
        scores: float32 score per kept row: the assigned class's score; for background rows
            the row's best class score.
        ambiguous: int64 sorted row indices removed as ambiguous.
    """

    indices: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    ambiguous: np.ndarray


def _check_selection_args(scores: np.ndarray, per_class: int, margin: float,
                          background: int | None) -> tuple[np.ndarray, int]:
    """Validated float64 scores and background count, or a ConfigError."""
    for name, value in (("per_class", per_class), ("background", background)):
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, numbers.Integral)):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    if per_class < 1:
        raise ConfigError(f"per_class must be >= 1, got {per_class}")
    if background is not None and background < 0:
        raise ConfigError(f"background must be >= 0, got {background}")
    if not (isinstance(margin, numbers.Real) and math.isfinite(margin) and margin >= 0):
        raise ConfigError(f"margin must be a finite number >= 0, got {margin!r}")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] == 0:
        raise ConfigError(f"scores must be 2-D (images, classes) with at least one class, "
                          f"got shape {s.shape}")
    if not np.isfinite(s).all():
        row = int(np.flatnonzero(~np.isfinite(s).all(axis=1))[0])
        raise ConfigError(f"scores of image {row} are not all finite")
    return s, int(per_class if background is None else background)


def _ambiguous_by_margin(s: np.ndarray, margin: float) -> np.ndarray:
    """Boolean mask: best and second-best class scores closer than ``margin``."""
    if s.shape[1] < 2 or s.shape[0] == 0:
        return np.zeros(s.shape[0], dtype=bool)
    top2 = np.sort(s, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) < margin


def _top_rows(values: np.ndarray, rows: np.ndarray, k: int, descending: bool) -> np.ndarray:
    """The ``k`` of ``rows`` with the highest (or lowest) ``values``, ties to lower rows."""
    key = -values[rows] if descending else values[rows]
    # rows are ascending and the sort is stable, so equal scores keep the lower row first.
    return rows[np.argsort(key, kind="stable")[:k]]


def select_bucket(scores: np.ndarray, per_class: int, *, margin: float = 0.0,
                  background: int | None = None) -> BucketSelection:
    """Label one time bucket's images from their class scores, CLEAR-style.

    Rules, applied in this order:

    1. An image whose best and second-best class scores differ by less than ``margin`` is
       ambiguous (with a single class there is no second best: never ambiguous by margin).
    2. Among the images not ambiguous by rule 1, each class's top set is its ``per_class``
       highest-scoring images (all of them if fewer). Classes rank independently, so an
       image can land in the top set of a class that is not its best one (when it misses
       its best class's top set); a positive ``margin`` guards against close calls.
    3. An image in the top set of more than one class is ambiguous and dropped. Classes
       are not refilled: a class may end with fewer than ``per_class`` images.
    4. Background (label ``C``): from the images in no class's top set, the
       ``background`` ones with the lowest best-class score. Rule 1 does not bar an image
       from the background: one that scores almost alike for every class is typically low
       for all, which is what CLEAR's background class is made of.
    5. The ambiguous images reported are those of rules 1 and 3 not taken as background.

    Every ordering uses stable sorts, so equal scores are broken by the lower row index
    first and the result depends only on the inputs.

    Args:
        scores: ``(N, C)`` class scores of the bucket's images (e.g. from
            :func:`cosine_scores`).
        per_class: Top-set size per class.
        margin: Minimum gap between an image's best and second-best class score.
        background: How many background images; None means ``per_class``, 0 means no
            background rows.

    Returns:
        The kept rows with their labels and scores, and the ambiguous rows.

    Raises:
        ConfigError: ``per_class < 1``, ``background < 0``, ``margin < 0`` (or not finite),
            scores not 2-D, or a non-finite score.
    """
    s, n_background = _check_selection_args(scores, per_class, margin, background)
    n, n_classes = s.shape
    by_margin = _ambiguous_by_margin(s, margin)
    eligible = np.flatnonzero(~by_margin)
    tops = [_top_rows(s[:, c], eligible, per_class, descending=True) for c in range(n_classes)]
    counts = np.bincount(np.concatenate(tops), minlength=n)
    in_several = counts > 1
    ambiguous = by_margin | in_several

    kept = [top[~in_several[top]] for top in tops]
    best = s.max(axis=1)
    rest = np.flatnonzero(counts == 0)
    low = _top_rows(best, rest, n_background, descending=False)
    ambiguous[low] = False
    # Within the background group too, order by score descending (ties: lower row first).
    kept.append(_top_rows(best, np.sort(low), low.size, descending=True))

    indices = np.concatenate(kept).astype(np.int64)
    labels = np.repeat(np.arange(n_classes + 1, dtype=np.int64), [k.size for k in kept])
    row_scores = np.where(labels < n_classes, s[indices, np.minimum(labels, n_classes - 1)],
                          best[indices])
    return BucketSelection(indices=indices, labels=labels,
                           scores=row_scores.astype(np.float32),
                           ambiguous=np.flatnonzero(ambiguous).astype(np.int64))
