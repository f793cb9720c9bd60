"""Image decoding, timm transforms, the Ray Data batch class and Mixup/CutMix (no Ray)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raylab.errors import ConfigError, DataError
from raylab.transforms.images import (
    ImageBatchTransform,
    apply_mixup,
    build_mixup,
    build_transform,
    decode_image,
    normalize_on_device,
)

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _random_image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _by_hand(img: Image.Image) -> np.ndarray:
    """ToTensor + Normalize written out: [3, H, W] float."""
    return ((np.asarray(img, dtype=np.float64) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("is_training", [True, False])
def test_transform_shapes_and_dtypes(size, is_training):
    tf = build_transform(is_training, size)
    for h, w in ((32, 32), (300, 400), (17, 50)):
        out = tf(_random_image(h, w))
        assert out.shape == (3, size, size)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_uint8_transform_has_no_normalisation():
    for is_training in (True, False):
        out = build_transform(is_training, 32, normalize=False)(_random_image(40, 40))
        assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)


def test_eval_transform_is_deterministic():
    img = _random_image(300, 400, seed=3)
    tf = build_transform(False, 224)
    torch.testing.assert_close(tf(img), tf(img), rtol=0, atol=0)


def test_eval_at_native_size_keeps_every_pixel():
    # A 32 px image evaluated at 32 px: no resize, no crop margin, only normalisation.
    img = _random_image(32, 32, seed=1)
    out = build_transform(False, 32)(img).double().numpy()
    np.testing.assert_allclose(out, _by_hand(img), atol=1e-5)


def test_eval_upscales_small_images_without_margin():
    # Shorter side 32 <= 64: resized to 64 (bicubic), crop_pct 1.0, nothing cut.
    img = _random_image(32, 32, seed=2)
    out = build_transform(False, 64)(img).double().numpy()
    expected = _by_hand(img.resize((64, 64), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_eval_explicit_crop_pct_and_large_images_use_the_crop():
    img = _random_image(32, 32, seed=4)
    # crop_pct 0.875 at 32: resize to floor(32 / 0.875) = 36, centre crop 32 (offset 2).
    out = build_transform(False, 32, crop_pct=0.875)(img).double().numpy()
    expected = _by_hand(img.resize((36, 36), Image.Resampling.BICUBIC).crop((2, 2, 34, 34)))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # A 256 px image at 224 with the default: timm's 0.875, i.e. resize 256 (a no-op)
    # and centre crop 224 (offset 16).
    big = _random_image(256, 256, seed=5)
    out = build_transform(False, 224)(big).double().numpy()
    np.testing.assert_allclose(out, _by_hand(big.crop((16, 16, 240, 240))), atol=1e-5)


def test_transform_option_errors():
    with pytest.raises(ConfigError, match="input_size"):
        build_transform(False, 0)
    with pytest.raises(ConfigError, match="re_prob"):
        build_transform(True, 32, re_prob=1.5)
    with pytest.raises(ConfigError, match="crop_pct"):
        build_transform(False, 32, crop_pct=0.0)


def test_decode_image_converts_to_rgb():
    grey = Image.fromarray(np.full((5, 7), 100, dtype=np.uint8), mode="L")
    img = decode_image(_encode(grey), "grey.png")
    assert img.mode == "RGB" and img.size == (7, 5)
    assert np.asarray(img)[0, 0].tolist() == [100, 100, 100]


@pytest.mark.parametrize("data", [b"", b"not an image at all", None])
def test_corrupt_bytes_name_their_path(data):
    with pytest.raises(DataError, match="cifar/train/cat/0007.jpg"):
        decode_image(data, "cifar/train/cat/0007.jpg")


def test_truncated_jpeg_names_its_path():
    data = _encode(_random_image(64, 64), "JPEG")
    with pytest.raises(DataError, match="cut.jpg"):
        decode_image(data[: len(data) // 2], "cut.jpg")


def _png_batch(n: int = 6) -> dict[str, np.ndarray]:
    images = np.empty(n, dtype=object)
    images[:] = [_encode(_random_image(32, 32, seed=i)) for i in range(n)]
    return {"image": images, "label": np.arange(n) % 3,
            "path": np.array([f"mem/{i}.png" for i in range(n)])}


def _check_batch(out: dict[str, np.ndarray], n: int, size: int, dtype) -> None:
    assert set(out) == {"image", "label"}
    assert out["image"].shape == (n, 3, size, size)
    assert out["image"].dtype == dtype
    assert out["label"].dtype == np.int64 and out["label"].shape == (n,)


@pytest.mark.parametrize("is_training", [True, False])
def test_batch_transform_on_png_bytes(is_training):
    batch = _png_batch()
    for size in (32, 224):
        out = ImageBatchTransform(is_training, size)(batch)
        _check_batch(out, 6, size, np.float32)
        np.testing.assert_array_equal(out["label"], [0, 1, 2, 0, 1, 2])


def test_batch_transform_eval_matches_by_hand():
    batch = _png_batch(2)
    out = ImageBatchTransform(False, 32)(batch)
    for i in range(2):
        np.testing.assert_allclose(out["image"][i], _by_hand(_random_image(32, 32, seed=i)),
                                   atol=1e-5)


def test_batch_transform_on_real_cifar_jpegs(real_data_root: Path):
    root = real_data_root / "cifar10" / "train"
    files = sorted(root.glob("*/0000.jpg"))
    if not files:
        pytest.skip(f"no CIFAR-10 JPEGs under {root}")
    classes = sorted({f.parent.name for f in files})
    images = np.empty(len(files), dtype=object)
    images[:] = [f.read_bytes() for f in files]
    batch = {"image": images, "label": np.array([classes.index(f.parent.name) for f in files]),
             "path": np.array([str(f) for f in files])}
    for is_training in (True, False):
        _check_batch(ImageBatchTransform(is_training, 32)(batch), len(files), 32, np.float32)
    _check_batch(ImageBatchTransform(True, 32, out_dtype="uint8")(batch), len(files), 32,
                 np.uint8)


def test_batch_transform_uint8_then_normalize_on_device():
    batch = _png_batch(4)
    ref = ImageBatchTransform(False, 32)(batch)["image"]
    raw = ImageBatchTransform(False, 32, out_dtype="uint8")(batch)
    _check_batch(raw, 4, 32, np.uint8)
    assert raw["image"].nbytes * 4 == ref.nbytes
    x = normalize_on_device(torch.from_numpy(raw["image"]))
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, torch.from_numpy(ref), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        normalize_on_device(x)


def test_batch_transform_errors_name_the_row():
    batch = _png_batch(3)
    batch["image"][1] = b"\xff\xd8\xff broken"
    with pytest.raises(DataError, match="mem/1.png"):
        ImageBatchTransform(False, 32)(batch)
    del batch["path"]
    with pytest.raises(DataError, match="<row 1>"):
        ImageBatchTransform(False, 32)(batch)
    with pytest.raises(DataError, match="missing columns"):
        ImageBatchTransform(False, 32)({"image": batch["image"]})
    with pytest.raises(DataError, match="differ in length"):
        ImageBatchTransform(False, 32)({"image": batch["image"], "label": np.arange(2)})
    with pytest.raises(ConfigError, match="out_dtype"):
        ImageBatchTransform(False, 32, out_dtype="float16")


def test_batch_transform_pickles():
    import pickle

    tf = pickle.loads(pickle.dumps(ImageBatchTransform(False, 32)))
    _check_batch(tf(_png_batch(2)), 2, 32, np.float32)


# ---- Mixup / CutMix --------------------------------------------------------------------

def _smooth_one_hot(y: list[int], k: int, smoothing: float) -> np.ndarray:
    out = np.full((len(y), k), smoothing / k)
    for i, c in enumerate(y):
        out[i, c] = 1.0 - smoothing + smoothing / k
    return out


def _constant_images(values: list[float], size: int = 8) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(
        -1, 3, size, size).clone()


def test_build_mixup_off_and_errors():
    assert build_mixup(mixup_alpha=0.0, cutmix_alpha=0.0) is None
    assert build_mixup(prob=0.0) is None
    mix = build_mixup(num_classes=10)
    assert mix is not None and mix.num_classes == 10 and mix.label_smoothing == 0.1
    with pytest.raises(ConfigError):
        build_mixup(mixup_alpha=-1.0)
    with pytest.raises(ConfigError):
        build_mixup(prob=2.0)
    with pytest.raises(ConfigError):
        build_mixup(label_smoothing=1.0)


def test_mixup_targets_match_lam_by_hand():
    # Image i is the constant v_i; image 0 is 1 and its partner (the last) 0, so after
    # mixing image 0 holds lam: x0' = lam * 1 + (1 - lam) * 0.
    k, smoothing = 5, 0.1
    y = [0, 3, 2, 4]
    values = [1.0, 5.0, 7.0, 0.0]
    mix = build_mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=smoothing,
                      num_classes=k)
    np.random.seed(0)
    x, t = apply_mixup(mix, _constant_images(values), torch.tensor(y))
    lam = float(x[0, 0, 0, 0])
    assert 0.0 < lam < 1.0
    assert float(x[1, 0, 0, 0]) == pytest.approx(lam * 5.0 + (1 - lam) * 7.0, abs=1e-5)
    expected = (lam * _smooth_one_hot(y, k, smoothing)
                + (1 - lam) * _smooth_one_hot(y[::-1], k, smoothing))
    np.testing.assert_allclose(t.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(t.sum(dim=1).numpy(), 1.0, atol=1e-6)


def test_cutmix_targets_match_pasted_area():
    # CutMix pastes a box of the partner; with ones and zeros the kept area is the mean.
    k = 4
    y = [1, 0, 3, 2]
    mix = build_mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=k)
    np.random.seed(1)
    x, t = apply_mixup(mix, _constant_images([1.0, 1.0, 0.0, 0.0], size=16), torch.tensor(y))
    lam = float(x[0].mean())
    expected = lam * _smooth_one_hot(y, k, 0.0) + (1 - lam) * _smooth_one_hot(y[::-1], k, 0.0)
    np.testing.assert_allclose(t.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(t.sum(dim=1).numpy(), 1.0, atol=1e-6)


def test_odd_batch_mixes_all_but_the_last_sample():
    k, smoothing = 3, 0.1
    y = [0, 1, 2, 1, 2]
    values = [1.0, 4.0, 6.0, 0.0, 9.0]
    mix = build_mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=smoothing,
                      num_classes=k)
    np.random.seed(2)
    x, t = apply_mixup(mix, _constant_images(values), torch.tensor(y))
    assert x.shape[0] == 5 and t.shape == (5, k)
    lam = float(x[0, 0, 0, 0])  # pairs: 0<->3, 1<->2; sample 4 untouched
    assert float(x[4, 0, 0, 0]) == 9.0
    mixed = (lam * _smooth_one_hot(y[:4], k, smoothing)
             + (1 - lam) * _smooth_one_hot(y[:4][::-1], k, smoothing))
    np.testing.assert_allclose(t[:4].numpy(), mixed, atol=1e-6)
    np.testing.assert_allclose(t[4].numpy(), [0.1 / 3, 0.1 / 3, 0.9 + 0.1 / 3], atol=1e-6)
    np.testing.assert_allclose(t.sum(dim=1).numpy(), 1.0, atol=1e-6)


def test_batch_of_one_is_smoothed_not_mixed():
    mix = build_mixup(num_classes=4, label_smoothing=0.2)
    x0 = _constant_images([3.0])
    x, t = apply_mixup(mix, x0.clone(), torch.tensor([2]))
    torch.testing.assert_close(x, x0)
    np.testing.assert_allclose(t.numpy(), [[0.05, 0.05, 0.85, 0.05]], atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        apply_mixup(mix, _constant_images([1.0, 2.0]), torch.tensor([0]))


def test_randaugment_posterize_to_zero_bits_does_not_raise() -> None:
    """Pillow >= 11 rejects posterize(bits=0); RandAugment m9 mstd0.5 can ask for it."""
    from PIL import Image
    from timm.data import auto_augment

    from raylab.transforms import images

    img = Image.new("RGB", (8, 8), (200, 100, 50))
    op = auto_augment.NAME_TO_OP["PosterizeIncreasing"]
    assert op is images._posterize
    assert op(img, 0).getpixel((0, 0)) == (0, 0, 0)
    assert op(img, 8) is img
    assert op(img, 1).getpixel((0, 0)) == (128, 0, 0)  # keep the top bit only


def test_device_normalize_matches_cpu_path_and_erases() -> None:
    from raylab.transforms.images import DeviceNormalize, normalize_on_device

    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    plain = DeviceNormalize()
    assert torch.allclose(plain(x), normalize_on_device(x))
    f = torch.randn(2, 3, 8, 8)
    assert plain(f) is f  # float batches (float32 loader) pass through
    torch.manual_seed(0)
    erased = DeviceNormalize(re_prob=1.0)(x.clone())
    changed = (erased != normalize_on_device(x)).flatten(1).any(1)
    assert changed.all()  # every image got one erased box


def _pad_crop(padding: int, **kw) -> object:
    return build_transform(True, 32, crop="pad", padding=padding, hflip=0.0,
                           auto_augment=None, color_jitter=0.0, re_prob=0.0,
                           normalize=False, **kw)


def test_pad_crop_without_padding_is_the_identity() -> None:
    img = _random_image(32, 32)
    out = _pad_crop(0)(img)
    assert out.dtype == torch.uint8
    assert np.array_equal(out.permute(1, 2, 0).numpy(), np.asarray(img))


def test_pad_crop_is_a_window_of_the_zero_padded_image() -> None:
    """Every output is some 32 x 32 window of the image zero-padded by 4 (no resampling),
    and over many draws the window moves by up to 4 pixels in each direction."""
    img = _random_image(32, 32, seed=3)
    padded = np.pad(np.asarray(img), ((4, 4), (4, 4), (0, 0)))
    t = _pad_crop(4)
    offsets = set()
    torch.manual_seed(0)
    for _ in range(200):
        out = t(img).permute(1, 2, 0).numpy()
        found = [(dy, dx) for dy in range(9) for dx in range(9)
                 if np.array_equal(out, padded[dy:dy + 32, dx:dx + 32])]
        assert found, "not a window of the padded image"
        offsets.add(found[0])
    assert {dy for dy, _ in offsets} == set(range(9))
    assert {dx for _, dx in offsets} == set(range(9))


def test_pad_crop_squares_other_sizes_first() -> None:
    out = _pad_crop(4)(_random_image(40, 64))
    assert tuple(out.shape) == (3, 32, 32)


def test_pad_crop_options_errors() -> None:
    with pytest.raises(ConfigError, match="crop must be"):
        build_transform(True, 32, crop="centre")
    with pytest.raises(ConfigError, match="padding must be"):
        build_transform(True, 32, crop="pad", padding=-1)
