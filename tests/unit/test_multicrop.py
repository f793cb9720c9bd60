"""DINO multi-crop transform and its Ray Data batch class (no Ray)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from raylab.errors import ConfigError, DataError
from raylab.transforms.multicrop import (
    GaussianBlur,
    MultiCropBatch,
    MultiCropTransform,
    local_crop_size,
)


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_reference_crop_shapes() -> None:
    transform = MultiCropTransform()
    crops = transform(_image(150, 120))
    assert transform.n_crops == len(crops) == 8
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6
    assert all(c.dtype == torch.float32 for c in crops)


def test_reference_recipe() -> None:
    transform = MultiCropTransform()

    def find(compose: T.Compose, kind: type) -> list:
        found = []
        for t in compose.transforms:
            inner = t.transforms if isinstance(t, T.RandomApply) else [t]
            found += [(t, i) for i in inner if isinstance(i, kind)]
        return found

    blur_p = [find(c, GaussianBlur)[0][0].p
              for c in (transform.global1, transform.global2, transform.local)]
    assert blur_p == [1.0, 0.1, 0.5]
    assert find(transform.local, GaussianBlur)[0][1].sigma == (0.1, 2.0)
    assert [s.p for s, _ in find(transform.global2, T.RandomSolarize)] == [0.2]
    assert find(transform.global1, T.RandomSolarize) == []
    assert find(transform.local, T.RandomSolarize) == []
    for compose, size, scale in ((transform.global1, 224, (0.4, 1.0)),
                                 (transform.local, 96, (0.05, 0.4))):
        (_, rrc), = find(compose, T.RandomResizedCrop)
        assert rrc.size == (size, size) and rrc.scale == scale
        assert rrc.interpolation == T.InterpolationMode.BICUBIC
        (apply, jitter), = find(compose, T.ColorJitter)
        assert apply.p == 0.8
        assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
            (0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
        assert find(compose, T.RandomGrayscale)[0][1].p == 0.2
        assert find(compose, T.RandomHorizontalFlip)[0][1].p == 0.5


def test_small_images() -> None:
    assert [local_crop_size(s) for s in (224, 96, 64, 32, 8)] == [96, 40, 24, 16, 8]
    transform = MultiCropTransform.for_image_size(32, n_local=4)
    crops = transform(_image(32, 32))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 4
    assert transform.blur_sigma == pytest.approx((0.1 * 32 / 224, 2.0 * 32 / 224))
    default = MultiCropTransform.for_image_size(224)
    assert (default.global_size, default.local_size, default.blur_sigma) == (224, 96, (0.1, 2.0))
    assert MultiCropTransform.for_image_size(32, local_size=12).local_size == 12


def test_seeded_crops_repeat() -> None:
    transform = MultiCropTransform.for_image_size(32, n_local=2)
    img = _image(40, 36, seed=3)
    torch.manual_seed(0)
    first = transform(img)
    torch.manual_seed(0)
    second = transform(img)
    third = transform(img)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, third))


def test_uint8_output_and_bad_options() -> None:
    crops = MultiCropTransform(64, 32, 1, normalize=False)(_image(70, 70))
    assert [c.dtype for c in crops] == [torch.uint8] * 3
    with pytest.raises(ConfigError, match="n_local"):
        MultiCropTransform(n_local=-1)
    with pytest.raises(ConfigError, match="global_scale"):
        MultiCropTransform(global_scale=(0.5, 0.4))
    with pytest.raises(ConfigError, match="local_size"):
        MultiCropTransform(local_size=0)


def _cifar_rows(root: Path, n: int) -> tuple[list[bytes], list[int], list[str]]:
    folder = root / "cifar10" / "train"
    if not folder.is_dir():
        pytest.skip(f"CIFAR-10 JPEGs not found at {folder}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    rows = [(path, label) for label, name in enumerate(classes[:2])
            for path in sorted((folder / name).glob("*.jpg"))[: n // 2]]
    return ([p.read_bytes() for p, _ in rows], [lab for _, lab in rows],
            [str(p) for p, _ in rows])


def test_batch_on_real_jpegs(real_data_root: Path) -> None:
    images, labels, paths = _cifar_rows(real_data_root, 4)
    batch = {"image": np.array(images, dtype=object), "label": np.array(labels),
             "path": np.array(paths)}
    before = torch.get_rng_state()
    out = MultiCropBatch(img_size=32, n_local=4, seed=0)(batch)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is untouched
    assert sorted(out) == ["crop0", "crop1", "crop2", "crop3", "crop4", "crop5", "label"]
    for i in range(6):
        side = 32 if i < 2 else 16
        assert out[f"crop{i}"].shape == (4, 3, side, side)
        assert out[f"crop{i}"].dtype == np.float32
        assert np.isfinite(out[f"crop{i}"]).all()
    assert out["label"].dtype == np.int64 and out["label"].tolist() == labels

    again = MultiCropBatch(img_size=32, n_local=4, seed=0)(batch)
    other = MultiCropBatch(img_size=32, n_local=4, seed=1)(batch)
    assert all(np.array_equal(out[k], again[k]) for k in out)
    assert not np.array_equal(out["crop0"], other["crop0"])

    raw = MultiCropBatch(img_size=32, n_local=1, out_dtype="uint8", seed=0)(batch)
    assert raw["crop0"].dtype == np.uint8 and raw["crop2"].shape == (4, 3, 16, 16)


def test_batch_default_sizes_and_errors() -> None:
    batch = {"image": np.array([_encode(_image(30, 40))], dtype=object), "label": np.array([2])}
    out = MultiCropBatch(n_local=1, seed=0)(batch)
    assert out["crop0"].shape == (1, 3, 224, 224) and out["crop2"].shape == (1, 3, 96, 96)

    crop = MultiCropBatch(img_size=32, n_local=0)
    with pytest.raises(DataError, match="missing columns"):
        crop({"image": batch["image"]})
    with pytest.raises(DataError, match="differ in length"):
        crop({"image": batch["image"], "label": np.array([1, 2])})
    with pytest.raises(DataError, match="<row 0>"):
        crop({"image": np.array([b"not an image"], dtype=object), "label": np.array([0])})
    with pytest.raises(ConfigError, match="out_dtype"):
        MultiCropBatch(out_dtype="float16")


def test_blur_is_pil_gaussian_with_drawn_sigma() -> None:
    from PIL import ImageFilter

    img = _image(20, 20)
    got = np.asarray(GaussianBlur((1.5, 1.5))(img))
    want = np.asarray(img.filter(ImageFilter.GaussianBlur(radius=1.5)))
    assert np.array_equal(got, want)
    assert not np.array_equal(got, np.asarray(img))
