"""Simple Copy-Paste as a pure function: a hand-worked example of the paste, the box update
and the occlusion rule; blending; determinism; the subset size; and the invariants on real
coco128 images and masks, each side scale-jittered on its own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from scipy import ndimage

from raylab.transforms.copy_paste import copy_paste
from raylab.transforms.detection import LSJ, ScaleJitter


class PickAll:
    """A stand-in for the Generator that pastes every source object."""

    def integers(self, low: int, high: int) -> int:
        return high - 1

    def choice(self, n: int, size: int, replace: bool) -> np.ndarray:
        return np.arange(size)


def _sample(h: int, w: int, boxes: list[tuple[int, int, int, int]], labels: list[int],
            colour: int) -> dict:
    masks = np.zeros((len(boxes), h, w), bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes):
        m[y0:y1, x0:x1] = True
    return {"image": np.full((h, w, 3), colour, np.uint8), "masks": masks,
            "boxes": np.array(boxes, np.float32).reshape(-1, 4),
            "labels": np.array(labels, np.int64)}


def _hand_worked() -> tuple[dict, dict]:
    # Target: a small square (64 px) and a wide band (rows 20-39, 800 px).
    dst = _sample(40, 40, [(2, 2, 10, 10), (0, 20, 40, 40)], [1, 2], colour=10)
    # Source: a square that covers the small one, and a band over rows 29-39.
    src = _sample(40, 40, [(0, 0, 15, 15), (0, 29, 40, 40)], [3, 4], colour=200)
    return dst, src


def test_hand_worked_paste_without_blending() -> None:
    dst, src = _hand_worked()
    out = copy_paste(dst, src, PickAll(), blend=False)
    # The covered square is gone; the band keeps rows 20-28 (360 px > 300: kept although
    # its bottom moved by 11 > 10 px); the two pasted objects follow.
    assert out["labels"].tolist() == [2, 3, 4]
    assert out["pasted"].tolist() == [False, True, True]
    assert out["source"].tolist() == [1, 0, 1]  # dst's band, then src's square and band
    np.testing.assert_array_equal(out["boxes"], [[0, 20, 40, 29], [0, 0, 15, 15],
                                                 [0, 29, 40, 40]])
    assert out["masks"].dtype == bool and out["masks"].sum(axis=(1, 2)).tolist() == \
        [360, 225, 440]
    union = src["masks"].any(0)
    assert (out["image"][union] == 200).all() and (out["image"][~union] == 10).all()
    # The occlusion rule needs both: a moved box AND a small area.
    tight = copy_paste(dst, src, PickAll(), blend=False, area_thr=400)
    assert tight["labels"].tolist() == [3, 4]
    loose = copy_paste(dst, src, PickAll(), blend=False, area_thr=400, box_thr=11)
    assert loose["labels"].tolist() == [2, 3, 4]


def test_a_fully_covered_object_always_goes() -> None:
    dst = _sample(40, 40, [(0, 0, 4, 4)], [1], colour=0)  # 16 px, box may not move much
    src = _sample(40, 40, [(0, 0, 5, 5)], [2], colour=255)
    out = copy_paste(dst, src, PickAll(), blend=False, box_thr=1000, area_thr=0)
    assert out["labels"].tolist() == [2]


def test_blending_softens_the_edges_only() -> None:
    dst, src = _hand_worked()
    out = copy_paste(dst, src, PickAll(), blend=True, sigma=1.0)
    union = src["masks"].any(0)
    square = np.ones((3, 3), bool)
    # scipy's Gaussian reaches 4 sigma: 5 px in, the source; 5 px out, the target.
    inside = ndimage.binary_erosion(union, square, iterations=5, border_value=1)
    outside = ~ndimage.binary_dilation(union, square, iterations=5)
    assert inside.any() and outside.any()
    assert (out["image"][inside] == 200).all() and (out["image"][outside] == 10).all()
    # The 1 px rings either side of the mask's edge (the image border is no edge: the
    # filter reflects there).
    edge = ndimage.binary_dilation(union, square) & ~ndimage.binary_erosion(
        union, square, border_value=1)
    assert ((out["image"][edge] > 10) & (out["image"][edge] < 200)).all()
    # The masks stay binary and equal to the unblended paste's.
    plain = copy_paste(dst, src, PickAll(), blend=False)
    for key in ("masks", "boxes", "labels", "pasted"):
        np.testing.assert_array_equal(out[key], plain[key])


def _random_pair(rng: np.random.Generator, n: int = 4, size: int = 64) -> tuple[dict, dict]:
    def one(colour: int) -> dict:
        boxes = []
        for _ in range(n):
            x0, y0 = rng.integers(0, size - 12, 2)
            w, h = rng.integers(6, 24, 2)
            boxes.append((int(x0), int(y0), int(min(x0 + w, size)), int(min(y0 + h, size))))
        return _sample(size, size, boxes, list(range(1, n + 1)), colour)
    return one(30), one(220)


def test_same_seed_same_output_and_a_uniform_subset_size() -> None:
    dst, src = _random_pair(np.random.default_rng(0))
    a = copy_paste(dst, src, np.random.default_rng(7))
    b = copy_paste(dst, src, np.random.default_rng(7))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    counts = np.bincount([int(copy_paste(dst, src, np.random.default_rng(s))["pasted"].sum())
                          for s in range(2000)], minlength=5)
    # 0..4 objects, each with probability 1/5 (400 expected of 2000; 5 sigma is 89).
    assert len(counts) == 5 and (np.abs(counts - 400) < 90).all(), counts


def test_an_empty_side_and_bad_inputs() -> None:
    dst, src = _random_pair(np.random.default_rng(1))
    empty = _sample(64, 64, [], [], colour=5)
    out = copy_paste(empty, src, np.random.default_rng(0))
    assert len(out["labels"]) == out["pasted"].sum() == len(out["masks"])
    out = copy_paste(dst, empty, np.random.default_rng(0))
    assert not out["pasted"].any() and (out["image"] == dst["image"]).all()
    with pytest.raises(ValueError, match="dst is 64x64 and src 32x32"):
        copy_paste(dst, _sample(32, 32, [(0, 0, 4, 4)], [1], colour=0),
                   np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"src\['masks'\] must be"):
        copy_paste(dst, dict(src, masks=src["masks"].astype(np.uint8)),
                   np.random.default_rng(0))
    with pytest.raises(ValueError, match="dst lacks \\['labels'\\]"):
        copy_paste({k: v for k, v in dst.items() if k != "labels"}, src,
                   np.random.default_rng(0))


# ------------------------------------------------------------------ real coco128 images

def _coco128(real_data_root: Path, count: int) -> list[dict]:
    root = real_data_root / "coco128"
    if not root.is_dir():
        pytest.skip(f"real data not found at {root}")
    coco = COCO()
    coco.dataset = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    coco.createIndex()
    samples = []
    for image_id in sorted(coco.getImgIds()):
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))]
        if len(anns) < 2:
            continue
        info = coco.loadImgs(image_id)[0]
        image = np.asarray(Image.open(root / "images" / "val2017" / info["file_name"])
                           .convert("RGB"))
        masks = np.stack([coco.annToMask(a) for a in anns]).astype(np.uint8)
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                           a["bbox"][1] + a["bbox"][3]] for a in anns], np.float32)
        samples.append({"image": image, "masks": masks, "boxes": boxes,
                        "labels": np.array([a["category_id"] for a in anns], np.int64)})
        if len(samples) == count:
            break
    return samples


def _jittered(sample: dict, rng: np.random.Generator) -> dict:
    out = ScaleJitter(256, LSJ)(sample["image"], sample["boxes"], sample["masks"],
                                sample["labels"], rng=rng)
    return {"image": out.image, "masks": out.masks.astype(bool), "boxes": out.boxes,
            "labels": out.labels}


def _box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.mark.data
def test_invariants_on_real_coco128_images(real_data_root: Path) -> None:
    samples = _coco128(real_data_root, 6)
    rng = np.random.default_rng(0)
    pasted_any = removed_any = 0
    for i in range(len(samples)):
        dst, src = _jittered(samples[i], rng), _jittered(samples[(i + 1) % len(samples)], rng)
        for blend in (False, True):
            seed = 100 * i + blend
            out = copy_paste(dst, src, np.random.default_rng(seed), blend=blend)
            again = copy_paste(dst, src, np.random.default_rng(seed), blend=blend)
            assert all(np.array_equal(out[k], again[k]) for k in out)
            pasted = out["masks"][out["pasted"]]
            union = pasted.any(0) if len(pasted) else np.zeros(dst["image"].shape[:2], bool)
            # Every box is its mask's; no mask is empty.
            for mask, box in zip(out["masks"], out["boxes"]):
                assert mask.any() and _box(mask) == box.tolist()
            # Pasted objects are source objects, unchanged, in order.
            src_masks = [m for m in src["masks"]]
            for mask in pasted:
                assert any(np.array_equal(mask, m) for m in src_masks)
            # Target objects lost exactly the pasted pixels; the rule decided who stays.
            survivors = iter(out["masks"][~out["pasted"]])
            for mask, box in zip(dst["masks"], dst["boxes"]):
                left = mask & ~union
                moved = np.abs(np.array(_box(left) if left.any() else [0] * 4) - box).max()
                if left.any() and not (moved > 10 and left.sum() <= 300):
                    assert np.array_equal(next(survivors), left)
                else:
                    removed_any += 1
            assert next(survivors, None) is None
            # Pixels: the source's under the paste, the target's elsewhere (5 px from the
            # edge with blending, where scipy's Gaussian no longer reaches).
            square = np.ones((3, 3), bool)
            inside = ndimage.binary_erosion(union, square, iterations=5,
                                            border_value=1) if blend else union
            outside = ~ndimage.binary_dilation(union, square, iterations=5) if blend \
                else ~union
            np.testing.assert_array_equal(out["image"][inside], src["image"][inside])
            np.testing.assert_array_equal(out["image"][outside], dst["image"][outside])
            pasted_any += len(pasted)
    assert pasted_any and removed_any  # the data exercised both paths


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5])
def test_the_blend_in_the_paste_window_equals_the_whole_image_blend(sigma: float) -> None:
    """Only a crop around the pasted objects is filtered and mixed; the result is the
    whole-image formula's, bit for bit, objects at the image's border included."""
    rng = np.random.default_rng(7)
    for trial in range(12):
        dst, src = _random_pair(rng, n=3, size=48)
        dst["image"] = rng.integers(0, 256, dst["image"].shape, dtype=np.uint8)
        src["image"] = rng.integers(0, 256, src["image"].shape, dtype=np.uint8)
        out = copy_paste(dst, src, np.random.default_rng(trial), blend=True, sigma=sigma)
        union = out["masks"][out["pasted"]].any(axis=0)
        alpha = np.clip(ndimage.gaussian_filter(union.astype(np.float32), sigma), 0, 1)
        whole = dst["image"] * (1.0 - alpha[..., None]) + src["image"] * alpha[..., None]
        expected = np.clip(np.rint(whole), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(out["image"], expected)
