"""DINO multi-crop augmentation and its Ray Data batch function (no Ray import).

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021;
checked against facebookresearch/dino ``main_dino.py`` (``DataAugmentationDINO``). Each
image gives 2 global crops and ``n_local`` local crops (torchvision transforms on PIL
images, plus a PIL blur):

- every crop: bicubic random-resized crop, horizontal flip (p 0.5), colour jitter
  (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with p 0.8, grey-scale p 0.2;
- Gaussian blur (sigma uniform in 0.1..2.0 px) with p 1.0 on global crop 1, 0.1 on global
  crop 2 and 0.5 on local crops; solarisation (threshold 128) with p 0.2 on global crop 2;
- to tensor and normalisation (ImageNet mean/std by default).

The blur is PIL's ``ImageFilter.GaussianBlur`` (radius = sigma), as in the reference, in a
small class that draws sigma from torch's generator: torchvision's ``GaussianBlur`` on a
PIL image converts to a tensor and convolves, measured 5-100x slower per crop here.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T

from raylab.errors import ConfigError
from raylab.transforms.images import decode_image, image_batch_columns

REFERENCE_GLOBAL = 224
REFERENCE_LOCAL = 96
_OUT_DTYPES = ("float32", "uint8")


def _check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def _check_range(name: str, pair: Sequence[float], upper: float | None = 1.0) -> None:
    if len(pair) != 2 or not 0 < pair[0] <= pair[1] or (upper is not None and pair[1] > upper):
        limit = f" <= {upper}" if upper is not None else ""
        raise ConfigError(f"{name} must be (low, high) with 0 < low <= high{limit}, got "
                          f"{tuple(pair)!r}")


def local_crop_size(img_size: int, multiple: int = 8) -> int:
    """The local-crop side for global crops of ``img_size`` px: DINO's 96/224 ratio,
    rounded to the nearest multiple of ``multiple`` (at least ``multiple``).

    224 -> 96, 96 -> 40, 64 -> 24, 32 -> 16. A multiple of 8 keeps the crop a whole
    number of patches for ViT patch sizes 4 and 8.
    """
    _check_size("img_size", img_size)
    _check_size("multiple", multiple)
    ratio = REFERENCE_LOCAL / REFERENCE_GLOBAL
    return max(int(multiple), int(round(img_size * ratio / multiple)) * int(multiple))


class GaussianBlur:
    """PIL Gaussian blur with sigma drawn uniformly from ``sigma`` by torch's generator."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, img: Image.Image) -> Image.Image:
        radius = float(torch.empty(()).uniform_(self.sigma[0], self.sigma[1]))
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def _blur(sigma: tuple[float, float], p: float) -> T.RandomApply:
    return T.RandomApply([GaussianBlur(sigma)], p=p)


class MultiCropTransform:
    """One PIL image -> ``[global1, global2, local1, ..., local_n]`` tensors ``[3, S, S]``.

    Randomness comes from torch's global generator (as for any torchvision transform), so
    ``torch.manual_seed`` makes it repeatable.

    Args:
        global_size: Side of the two global crops (224).
        local_size: Side of the local crops (96).
        n_local: Number of local crops (the reference's command-line default is 8; 0
            leaves the two global crops only).
        global_scale: Area fraction range of global crops ((0.4, 1.0)).
        local_scale: Area fraction range of local crops ((0.05, 0.4)).
        mean: Normalisation mean per channel (0-1 scale).
        std: Normalisation standard deviation per channel.
        blur_sigma: Gaussian-blur sigma range in output pixels ((0.1, 2.0)).
        normalize: False returns uint8 tensors (0-255) without normalisation.

    Raises:
        ConfigError: A size below 1, a negative ``n_local``, or a bad range.
    """

    def __init__(
        self,
        global_size: int = REFERENCE_GLOBAL,
        local_size: int = REFERENCE_LOCAL,
        n_local: int = 6,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        *,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        normalize: bool = True,
    ) -> None:
        _check_size("global_size", global_size)
        _check_size("local_size", local_size)
        if isinstance(n_local, bool) or int(n_local) != n_local or n_local < 0:
            raise ConfigError(f"n_local must be an integer >= 0, got {n_local!r}")
        _check_range("global_scale", global_scale)
        _check_range("local_scale", local_scale)
        _check_range("blur_sigma", blur_sigma, upper=None)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"mean and std need 3 values each (std > 0), got {mean}, {std}")
        self.global_size, self.local_size, self.n_local = int(global_size), int(local_size), \
            int(n_local)
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.mean, self.std = tuple(mean), tuple(std)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.normalize = normalize

        bicubic = T.InterpolationMode.BICUBIC
        flip_jitter_grey = [
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2,
                                         hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
        to_tensor = ([T.ToTensor(), T.Normalize(self.mean, self.std)] if normalize
                     else [T.PILToTensor()])

        def crop(size: int, scale: tuple[float, float]) -> T.RandomResizedCrop:
            return T.RandomResizedCrop(size, scale=scale, interpolation=bicubic)

        self.global1 = T.Compose([crop(self.global_size, self.global_scale), *flip_jitter_grey,
                                  _blur(self.blur_sigma, 1.0), *to_tensor])
        self.global2 = T.Compose([crop(self.global_size, self.global_scale), *flip_jitter_grey,
                                  _blur(self.blur_sigma, 0.1),
                                  T.RandomSolarize(threshold=128, p=0.2), *to_tensor])
        self.local = T.Compose([crop(self.local_size, self.local_scale), *flip_jitter_grey,
                                _blur(self.blur_sigma, 0.5), *to_tensor])

    @classmethod
    def for_image_size(cls, img_size: int, multiple: int = 8,
                       **kwargs: Any) -> MultiCropTransform:
        """The reference recipe scaled to images of ``img_size`` px (e.g. 32 for CIFAR).

        Rule: global crops are ``img_size``; local crops are :func:`local_crop_size`
        (96/224 of it, rounded to a multiple of ``multiple``: 32 -> 16, 64 -> 24,
        224 -> 96); the blur sigma range is scaled by ``img_size / 224`` (0.1..2.0 px at
        224, 0.014..0.29 px at 32, where blur hardly acts, as in common CIFAR recipes).
        Crop area ranges, jitter, grey-scale and solarisation are unchanged; any
        constructor argument in ``kwargs`` overrides the rule.
        """
        _check_size("img_size", img_size)
        factor = img_size / REFERENCE_GLOBAL
        options: dict[str, Any] = {
            "global_size": int(img_size),
            "local_size": local_crop_size(img_size, multiple),
            "blur_sigma": (0.1 * factor, 2.0 * factor),
        }
        options.update(kwargs)
        return cls(**options)

    @property
    def n_crops(self) -> int:
        """Crops per image: 2 global + ``n_local``."""
        return 2 + self.n_local

    def crop_sizes(self) -> list[int]:
        """Side of each crop, in output order."""
        return [self.global_size] * 2 + [self.local_size] * self.n_local

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        """The crops of one RGB image: 2 global crops, then ``n_local`` local crops."""
        crops = [self.global1(img), self.global2(img)]
        crops.extend(self.local(img) for _ in range(self.n_local))
        return crops

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(global_size={self.global_size}, "
                f"local_size={self.local_size}, n_local={self.n_local}, "
                f"global_scale={self.global_scale}, local_scale={self.local_scale}, "
                f"blur_sigma={self.blur_sigma}, normalize={self.normalize})")


class MultiCropBatch:
    """Decode and multi-crop a batch of encoded images (a Ray Data ``map_batches`` class).

    Use as ``ds.map_batches(MultiCropBatch, fn_constructor_kwargs={"img_size": 32},
    batch_format="numpy", compute=...)``. Every crop is its own column, so each column has
    one fixed shape: ``crop0``, ``crop1`` (global) and ``crop2`` ... (local).

    Args:
        img_size: Build the transform with :meth:`MultiCropTransform.for_image_size`; None
            uses the :class:`MultiCropTransform` defaults (224 / 96).
        seed: Make the crops repeatable: the instance keeps its own torch RNG state,
            seeded with ``seed`` and untouched by (and not touching) the global generator.
            None draws a fresh seed, so that parallel actors differ. Give each actor a
            different seed if you set one.
        out_dtype: ``"float32"`` (normalised) or ``"uint8"`` (0-255; normalise on the
            device with :func:`raylab.transforms.images.normalize_on_device`).
        **transform_kwargs: Further :class:`MultiCropTransform` arguments.

    Raises:
        ConfigError: Unknown ``out_dtype`` or a bad transform option.
    """

    def __init__(self, img_size: int | None = None, *, seed: int | None = None,
                 out_dtype: str = "float32", **transform_kwargs: Any) -> None:
        if out_dtype not in _OUT_DTYPES:
            raise ConfigError(f"out_dtype must be one of {list(_OUT_DTYPES)}, got {out_dtype!r}")
        transform_kwargs["normalize"] = out_dtype == "float32"
        if img_size is None:
            self.transform = MultiCropTransform(**transform_kwargs)
        else:
            self.transform = MultiCropTransform.for_image_size(img_size, **transform_kwargs)
        self.out_dtype = out_dtype
        generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None
                                                   else int(seed))
        self._rng_state = generator.get_state()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Transform one batch.

        Args:
            batch: Columns ``image`` (encoded bytes per row), ``label`` (integers) and
                optionally ``path`` (strings, used in error messages).

        Returns:
            ``crop0`` .. ``crop{n-1}`` ``[N, 3, S, S]`` (float32 or uint8) and ``label``
            int64 ``[N]``.

        Raises:
            DataError: A missing column, columns of different lengths, or a row that does
                not decode (named by its path, or its row index without ``path``).
        """
        images, labels, paths = image_batch_columns(batch)
        sizes = self.transform.crop_sizes()
        out = {f"crop{i}": np.empty((len(images), 3, s, s), dtype=self.out_dtype)
               for i, s in enumerate(sizes)}
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng_state)
            for row, data in enumerate(images):
                where = str(paths[row]) if paths is not None else f"<row {row}>"
                for i, crop in enumerate(self.transform(decode_image(data, where))):
                    out[f"crop{i}"][row] = crop.numpy()
            self._rng_state = torch.get_rng_state()
        out["label"] = labels
        return out
