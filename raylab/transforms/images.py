"""Image decoding, timm train/eval transforms, the Ray Data batch function and Mixup/CutMix.

The augmentation recipe is ConvNeXt's (Liu et al., CVPR 2022; facebookresearch/ConvNeXt
``datasets.py``), built with timm's ``create_transform`` and ``Mixup`` rather than rewritten:
RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25 (pixel mode), bicubic resizing,
Mixup 0.8 / CutMix 1.0 with label smoothing 0.1. :class:`ImageBatchTransform` is the callable
class that Ray Data runs in ``map_batches(batch_format="numpy")``; everything here is plain
PIL/numpy/torch (no Ray import).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    Mixup,
    auto_augment,
    create_transform,
)
from timm.data.mixup import mixup_target
from timm.data.random_erasing import RandomErasing
from torchvision import transforms

from raylab.errors import ConfigError, DataError

ImageTransform = Callable[[Image.Image], torch.Tensor]

_OUT_DTYPES = ("float32", "uint8")


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op, safe for Pillow >= 11.

    RandAugment's ``PosterizeIncreasing`` keeps ``4 - level*4/10`` bits, which is 0 at the
    top magnitude (m9 with mstd0.5 noise reaches it). Pillow used to map 0 bits to a black
    image and now raises ValueError, which would kill a data task mid-epoch; this keeps the
    old meaning.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    for name in ("PosterizeIncreasing", "PosterizeOriginal", "Posterize"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize


_patch_timm_posterize()


def _as_bytes(data: Any) -> bytes:
    """Encoded image bytes from bytes, bytearray, memoryview or a uint8 numpy array."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, np.ndarray) and data.dtype == np.uint8:
        return data.tobytes()
    raise TypeError(f"expected encoded image bytes, got {type(data).__name__}")


def decode_image(data: bytes, path: str = "<bytes>") -> Image.Image:
    """Decode an encoded image (JPEG, PNG, ...) into an RGB PIL image.

    The pixels are loaded eagerly, so a truncated file fails here and not later inside a
    transform. Grey-scale, palette, CMYK and RGBA images are converted to RGB.

    Args:
        data: The encoded file contents.
        path: Where the bytes came from; used only in the error message.

    Raises:
        DataError: The bytes are not a readable image (names ``path``).
    """
    try:
        raw = _as_bytes(data)
    except TypeError as exc:
        raise DataError(f"cannot decode image ({exc})", path=path) from None
    if not raw:
        raise DataError("cannot decode image (empty file)", path=path)
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise DataError(f"cannot decode image (not a recognised image format, {len(raw)} "
                        f"bytes)", path=path) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # "image file is truncated" and friends are OSErrors.
        detail = str(exc).strip() or type(exc).__name__
        raise DataError(f"cannot decode image ({detail})", path=path) from None


def _check_options(input_size: int, re_prob: float, hflip: float,
                   crop_pct: float | None) -> None:
    if isinstance(input_size, bool) or not isinstance(input_size, (int, np.integer)) \
            or input_size < 1:
        raise ConfigError(f"input_size must be an integer >= 1, got {input_size!r}")
    for name, p in (("re_prob", re_prob), ("hflip", hflip)):
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"{name} must be a probability in [0, 1], got {p!r}")
    if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct!r}")


class _SizeAwareEval:
    """Eval transform that never crops a margin off images no larger than the input size.

    Holds two timm eval transforms: ``small`` (crop_pct 1.0) for images whose shorter side
    is <= ``input_size``, ``large`` (timm's default crop_pct 0.875) for the others. A
    top-level class so that Ray can pickle it.
    """

    def __init__(self, input_size: int, small: ImageTransform, large: ImageTransform) -> None:
        self.input_size = input_size
        self.small = small
        self.large = large

    def __call__(self, img: Image.Image) -> torch.Tensor:
        fn = self.small if min(img.size) <= self.input_size else self.large
        return fn(img)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(input_size={self.input_size}, "
                f"small={self.small!r}, large={self.large!r})")


class PadCrop:
    """Resize the shorter side to ``size``, centre-crop a square, zero-pad by ``padding``
    and crop ``size`` x ``size`` at a uniformly random offset; then ``then``. A top-level
    class so that Ray can pickle it."""

    def __init__(self, size: int, padding: int, then: ImageTransform) -> None:
        self.size, self.padding, self.then = size, padding, then
        self.square = transforms.Compose([transforms.Resize(size),
                                          transforms.CenterCrop(size)])
        self.crop = transforms.RandomCrop(size, padding=padding)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.size != (self.size, self.size):
            img = self.square(img)
        return self.then(self.crop(img) if self.padding else img)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, padding={self.padding}, "
                f"then={self.then!r})")


def build_transform(
    is_training: bool,
    input_size: int,
    *,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    re_prob: float = 0.25,
    interpolation: str = "bicubic",
    scale: tuple[float, float] = (0.08, 1.0),
    crop: str = "resized",
    padding: int = 4,
    hflip: float = 0.5,
    color_jitter: float = 0.4,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    crop_pct: float | None = None,
    re_mode: str = "pixel",
    normalize: bool = True,
) -> ImageTransform:
    """Build a PIL -> tensor ``[3, S, S]`` transform with ``timm.data.create_transform``.

    Training: random-resized crop to ``input_size`` with area ``scale`` (``crop="pad"``:
    resize and centre-crop to ``input_size``, zero-pad by ``padding`` and crop
    ``input_size`` at a random offset, the CIFAR practice), horizontal flip, then
    RandAugment (``auto_augment``; timm turns colour jitter **off** whenever an
    auto-augment policy is given, so ``color_jitter`` only acts with ``auto_augment=None``),
    to-tensor, normalisation and random erasing (``re_prob``, ``re_mode``).

    Evaluation: resize the shorter side to ``floor(input_size / crop_pct)`` and centre-crop
    ``input_size``; ``crop_pct`` is the fraction of the resized image the crop keeps.
    With ``crop_pct=None`` (default) images whose shorter side is larger than
    ``input_size`` use timm's 0.875 (256 -> 224 crop at 224), and images no larger than
    ``input_size`` (e.g. 32 px CIFAR at 32, or upscaled to 224) use 1.0: they are resized
    to ``input_size`` and nothing but the longer side's excess is cropped. An explicit
    ``crop_pct`` applies to every image.

    Args:
        is_training: Random augmentation (True) or deterministic evaluation (False).
        input_size: Output side ``S`` in pixels.
        auto_augment: timm auto-augment policy string, or None for none.
        re_prob: Random-erasing probability (training only).
        interpolation: Resize interpolation (``bicubic``, ``bilinear``, ``random``, ...).
        scale: Random-resized-crop area range (``crop="resized"``).
        crop: ``resized`` (random-resized crop) or ``pad`` (pad-and-crop).
        padding: Zero padding on each side for ``crop="pad"``.
        hflip: Horizontal-flip probability.
        color_jitter: Colour-jitter strength (used only without ``auto_augment``).
        mean: Normalisation mean per channel (0-1 scale).
        std: Normalisation standard deviation per channel.
        crop_pct: Eval crop fraction in (0, 1], or None for the size-aware default above.
        re_mode: Random-erasing fill: ``pixel`` (per-pixel normal noise, ConvNeXt and timm
            ``train.py``), ``rand`` or ``const``.
        normalize: False returns the un-normalised uint8 tensor and skips random erasing
            (see :func:`normalize_on_device`).

    Raises:
        ConfigError: ``input_size`` below 1, a probability outside [0, 1], ``crop_pct``
            outside (0, 1], an unknown ``crop`` or a negative ``padding``.
    """
    _check_options(input_size, re_prob, hflip, crop_pct)
    if crop not in ("resized", "pad"):
        raise ConfigError(f"crop must be 'resized' or 'pad', got {crop!r}")
    if padding < 0:
        raise ConfigError(f"padding must be >= 0, got {padding!r}")
    common: dict[str, Any] = dict(
        input_size=int(input_size), interpolation=interpolation,
        mean=tuple(mean), std=tuple(std), normalize=normalize,
    )
    if is_training:
        # After a pad-and-crop the image is already input_size square: a "random-resized"
        # crop of scale 1 and ratio 1 is then the identity, and timm's factory still
        # does the flip, RandAugment, tensor conversion, normalisation and erasing.
        pad = crop == "pad"
        train = create_transform(
            is_training=True, scale=(1.0, 1.0) if pad else tuple(scale),
            ratio=(1.0, 1.0) if pad else (3 / 4, 4 / 3), hflip=hflip,
            color_jitter=color_jitter, auto_augment=auto_augment or None, re_prob=re_prob,
            re_mode=re_mode, **common,
        )
        return PadCrop(int(input_size), padding, train) if pad else train
    if crop_pct is not None:
        return create_transform(is_training=False, crop_pct=crop_pct, **common)
    return _SizeAwareEval(
        int(input_size),
        small=create_transform(is_training=False, crop_pct=1.0, **common),
        large=create_transform(is_training=False, crop_pct=None, **common),
    )


def image_batch_columns(batch: dict[str, np.ndarray]) -> tuple[Any, np.ndarray, Any]:
    """``(images, labels, paths)`` of a Ray Data batch, checked; ``paths`` may be None.

    Raises:
        DataError: ``image`` or ``label`` is missing, or the columns differ in length.
    """
    missing = [c for c in ("image", "label") if c not in batch]
    if missing:
        raise DataError(f"image batch is missing columns {missing}; has {sorted(batch)}")
    images = batch["image"]
    labels = np.asarray(batch["label"]).reshape(-1).astype(np.int64)
    paths = batch.get("path")
    if len(images) != labels.size or (paths is not None and len(paths) != labels.size):
        raise DataError(
            f"image batch columns differ in length: image {len(images)}, label "
            f"{labels.size}" + ("" if paths is None else f", path {len(paths)}")
        )
    return images, labels, paths


class ImageBatchTransform:
    """Decode and transform a batch of encoded images (a Ray Data ``map_batches`` class).

    Use as ``ds.map_batches(ImageBatchTransform, fn_constructor_args=(True, 224),
    batch_format="numpy", compute=...)``: the timm transform is built once per actor.

    ``out_dtype="uint8"`` returns the augmented but un-normalised pixels, 4x fewer bytes
    through the object store and host-to-device copy; the training loop then calls
    :func:`normalize_on_device` on the GPU. The trade-off: random erasing is skipped here
    (it needs normalised values), so apply ``timm.data.RandomErasing(re_prob,
    mode="pixel", device="cuda")`` to the normalised batch on the device if the recipe
    uses it. Values are otherwise identical up to float rounding (8-bit images carry
    nothing finer than uint8).

    Args:
        is_training: Passed to :func:`build_transform`.
        input_size: Passed to :func:`build_transform`.
        out_dtype: ``"float32"`` (normalised) or ``"uint8"`` (0-255, no random erasing).
        **transform_kwargs: Further keyword arguments of :func:`build_transform`.

    Raises:
        ConfigError: Unknown ``out_dtype`` or a bad transform option.
    """

    def __init__(self, is_training: bool, input_size: int, *, out_dtype: str = "float32",
                 **transform_kwargs: Any) -> None:
        if out_dtype not in _OUT_DTYPES:
            raise ConfigError(f"out_dtype must be one of {list(_OUT_DTYPES)}, got {out_dtype!r}")
        transform_kwargs.pop("normalize", None)
        self.out_dtype = out_dtype
        self.input_size = int(input_size)
        self.transform = build_transform(is_training, input_size,
                                          normalize=out_dtype == "float32", **transform_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Transform one batch.

        Args:
            batch: Columns ``image`` (encoded bytes per row), ``label`` (integers) and
                optionally ``path`` (strings, used in error messages).

        Returns:
            ``image`` ``[N, 3, S, S]`` (float32 normalised, or uint8) and ``label`` int64
            ``[N]``.

        Raises:
            DataError: A column is missing, the columns differ in length, or a row does not
                decode (the error names its path, or its row index without ``path``).
        """
        images, labels, paths = image_batch_columns(batch)
        size = self.input_size
        out = np.empty((len(images), 3, size, size), dtype=self.out_dtype)
        for i, data in enumerate(images):
            where = str(paths[i]) if paths is not None else f"<row {i}>"
            out[i] = self.transform(decode_image(data, where)).numpy()
        return {"image": out, "label": labels}


def normalize_on_device(
    x_uint8: torch.Tensor,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Normalise uint8 pixels on their device: ``(x / 255 - mean) / std``.

    The partner of ``ImageBatchTransform(out_dtype="uint8")``: move the uint8 batch to the
    GPU first (4x fewer bytes), then call this. Random erasing, if wanted, comes after.

    Args:
        x_uint8: uint8 tensor ``[N, C, H, W]`` or ``[C, H, W]`` with 0-255 values.
        mean: Per-channel mean (0-1 scale).
        std: Per-channel standard deviation (0-1 scale).
        dtype: Floating dtype of the result.

    Raises:
        ValueError: ``x_uint8`` is not uint8 or its channel count differs from ``mean``.
    """
    if x_uint8.dtype != torch.uint8:
        raise ValueError(f"normalize_on_device expects a uint8 tensor, got {x_uint8.dtype}")
    channels = x_uint8.shape[-3] if x_uint8.ndim >= 3 else -1
    if channels != len(mean) or len(mean) != len(std):
        raise ValueError(f"expected [..., {len(mean)}, H, W] for {len(mean)} mean values and "
                         f"{len(std)} std values, got shape {tuple(x_uint8.shape)}")
    m = torch.tensor(mean, dtype=dtype, device=x_uint8.device).view(-1, 1, 1) * 255.0
    s = torch.tensor(std, dtype=dtype, device=x_uint8.device).view(-1, 1, 1) * 255.0
    return x_uint8.to(dtype).sub_(m).div_(s)


class DeviceNormalize:
    """The worker-side half of the uint8 loader (as timm's own prefetcher does it).

    Ray Data tasks ship augmented uint8 pixels (4x fewer bytes through the object store
    and the host-to-device copy); on the worker this normalises them and, for training,
    applies random erasing on the device. Float batches pass through unchanged, so the
    same loop serves both loader dtypes.

    Args:
        re_prob: Random-erasing probability (0 for evaluation).
        device: Where batches live when this is called.
    """

    def __init__(self, re_prob: float = 0.0, device: str | torch.device = "cpu",
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self.erase = (RandomErasing(re_prob, mode="pixel", max_count=1, device=str(device))
                      if re_prob > 0 else None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return x
        x = normalize_on_device(x, self.mean, self.std)
        return self.erase(x) if self.erase is not None else x


def build_mixup(
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
    num_classes: int = 1000,
) -> Mixup | None:
    """A timm ``Mixup`` (per-batch mode) for the ConvNeXt recipe, or None when it is off.

    Args:
        mixup_alpha: Beta-distribution alpha of Mixup; 0 disables Mixup.
        cutmix_alpha: Beta-distribution alpha of CutMix; 0 disables CutMix.
        prob: Probability that a batch is mixed at all.
        switch_prob: Probability of CutMix instead of Mixup when both are enabled.
        label_smoothing: Smoothing folded into the soft targets.
        num_classes: Number of classes of the targets.

    Returns:
        None when both alphas are 0 or ``prob`` is 0 (timm's Mixup asserts in that case);
        then train with a hard-label criterion instead.

    Raises:
        ConfigError: A negative alpha, a probability outside [0, 1], smoothing outside
            [0, 1) or fewer than 1 class.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ConfigError(f"mixup/cutmix alphas must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
    for name, p in (("prob", prob), ("switch_prob", switch_prob)):
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"mixup {name} must be in [0, 1], got {p!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes!r}")
    if (mixup_alpha == 0 and cutmix_alpha == 0) or prob == 0:
        return None
    return Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob,
                 switch_prob=switch_prob, mode="batch", label_smoothing=label_smoothing,
                 num_classes=num_classes)


def apply_mixup(mixup: Mixup, x: torch.Tensor, y: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a batch with timm's ``Mixup``, also when the batch size is odd.

    timm's Mixup pairs sample ``i`` with sample ``N - 1 - i`` and asserts that ``N`` is
    even. For an odd batch (e.g. the last, partial batch of an epoch) the first ``N - 1``
    samples are mixed among themselves and the **last sample is kept unmixed** with the
    label-smoothed one-hot target; no sample is dropped. A batch of one is not mixed.

    Args:
        mixup: From :func:`build_mixup`.
        x: Images ``[N, C, H, W]``; modified in place, as timm does.
        y: Integer labels ``[N]``.

    Returns:
        ``(x, soft_targets)`` with soft targets ``[N, num_classes]`` (rows sum to 1), for
        ``timm.loss.SoftTargetCrossEntropy``.

    Raises:
        ValueError: ``x`` and ``y`` differ in length.
    """
    n = int(x.shape[0])
    if y.shape[0] != n:
        raise ValueError(f"mixup got {n} images but {y.shape[0]} labels")
    if n % 2 == 0:
        return mixup(x, y)
    even = n - 1
    tail = mixup_target(y[even:], mixup.num_classes, lam=1.0, smoothing=mixup.label_smoothing)
    if even == 0:
        return x, tail
    x_even, t_even = mixup(x[:even], y[:even])
    return torch.cat((x_even, x[even:])), torch.cat((t_even, tail.to(t_even.dtype)))
