"""Scale jitter (LSJ/SSJ), eval resize, compact masks and the detection batch function (no Ray).

Scenes are drawn: each shape is painted in its own colour and its mask is the set of pixels
it owns after later shapes have painted over it, so masks and pixels agree exactly.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from raylab.errors import ConfigError, DataError
from raylab.transforms.detection import (
    LSJ,
    SSJ,
    Geometry,
    ResizePad,
    ScaleJitter,
    apply_geometry,
    build_detection_transform,
    masks_to_boxes,
    unscale_boxes,
    unscale_masks,
)
from raylab.transforms.detection_batch import (
    CopyPasteParams,
    contiguous_label_map,
    detection_batch_transform,
    draw_partners,
    pack_masks,
    to_torchvision_targets,
    unpack_masks,
    with_partner_table,
    with_partners,
    xywh_to_xyxy,
)

BG = (128, 128, 128)
PAD = (7, 7, 7)
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def _scene(h: int = 96, w: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """An image with five shapes (rectangles, ellipses; the last two overlap) and their masks."""
    yy, xx = np.mgrid[:h, :w]
    fy, fx = h / 96, w / 128
    shapes = [
        (yy >= 4 * fy) & (yy < 40 * fy) & (xx >= 4 * fx) & (xx < 44 * fx),
        ((yy - 70 * fy) / (20 * fy)) ** 2 + ((xx - 30 * fx) / (24 * fx)) ** 2 < 1,
        (yy >= 8 * fy) & (yy < 50 * fy) & (xx >= 60 * fx) & (xx < 90 * fx),
        ((yy - 70 * fy) / (18 * fy)) ** 2 + ((xx - 90 * fx) / (22 * fx)) ** 2 < 1,
        (yy >= 56 * fy) & (yy < 92 * fy) & (xx >= 100 * fx) & (xx < 124 * fx),
    ]
    owner = np.full((h, w), -1)
    for k, s in enumerate(shapes):
        owner[s] = k
    image = np.empty((h, w, 3), np.uint8)
    image[...] = BG
    for k, colour in enumerate(COLOURS):
        image[owner == k] = colour
    masks = np.stack([owner == k for k in range(len(shapes))]).astype(np.uint8)
    return image, masks


def _extent(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def _colour_match(image: np.ndarray, colour: tuple[int, int, int], tol: int = 48) -> np.ndarray:
    return (np.abs(image.astype(int) - colour) <= tol).all(axis=-1)


LABELS = np.array([3, 1, 4, 1, 5])
CROWD = np.array([0, 0, 1, 0, 0], np.uint8)


# ---- geometry ----------------------------------------------------------------------------

@pytest.mark.parametrize("scale_range", [LSJ, SSJ])
def test_boxes_are_tight_extents_of_masks(scale_range):
    image, masks = _scene()
    tf = ScaleJitter(160, scale_range, pad_value=PAD)
    for seed in range(25):
        out = tf(image, masks=masks, labels=LABELS, iscrowd=CROWD,
                 rng=np.random.default_rng(seed))
        assert out.image.shape == (160, 160, 3) and out.image.dtype == np.uint8
        assert out.masks.shape == (len(out.keep), 160, 160)
        assert len(out.boxes) == len(out.labels) == len(out.iscrowd) == len(out.keep)
        np.testing.assert_array_equal(out.labels, LABELS[out.keep])
        np.testing.assert_array_equal(out.iscrowd, CROWD[out.keep])  # crowd stays crowd
        for box, mask in zip(out.boxes, out.masks):
            assert mask.any()
            np.testing.assert_allclose(box, _extent(mask), atol=1)


def test_masks_stay_aligned_with_pixels_exactly_with_nearest():
    # Nearest resampling of the image uses the masks' index map: agreement is exact.
    image, masks = _scene()
    tf = ScaleJitter(160, LSJ, pad_value=PAD, interpolation="nearest")
    for seed in range(20):
        out = tf(image, masks=masks, rng=np.random.default_rng(seed))
        ch, cw = out.geometry.content_size
        content = out.image[:ch, :cw]
        owned = np.zeros((ch, cw), bool)
        for k, mask in zip(out.keep, out.masks):
            m = mask[:ch, :cw].astype(bool)
            assert _colour_match(content[m], COLOURS[k], tol=0).all()
            owned |= m
        assert (out.masks[:, ch:, :] == 0).all() and (out.masks[:, :, cw:] == 0).all()
        # Pixels outside every kept mask are background or a dropped shape's tiny remnant.
        outside = content[~owned]
        assert _colour_match(outside, BG, tol=0).mean() > 0.97
        assert (out.image[ch:] == PAD).all() and (out.image[:, cw:] == PAD).all()


def _interior(m: np.ndarray) -> np.ndarray:
    """Mask pixels whose four neighbours are in the mask too."""
    p = np.pad(m, 1)
    return m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def test_masks_stay_aligned_with_pixels_bilinear():
    image, masks = _scene(288, 384)
    tf = ScaleJitter(480, SSJ, pad_value=PAD)  # scale >= 1: blending only at edges
    for seed in range(20):
        out = tf(image, masks=masks, rng=np.random.default_rng(seed))
        ch, cw = out.geometry.content_size
        content = out.image[:ch, :cw]
        owned = np.zeros((ch, cw), bool)
        for k, mask in zip(out.keep, out.masks):
            m = mask[:ch, :cw].astype(bool)
            assert _colour_match(content[m], COLOURS[k]).mean() > 0.95
            # Off-colour mask pixels lie on the mask's edge only (no shift of the mask).
            assert _colour_match(content[_interior(m)], COLOURS[k]).all()
            owned |= m
        outside = content[~owned]
        near_shape = np.zeros(len(outside), bool)
        for colour in COLOURS:
            near_shape |= _colour_match(outside, colour)
        assert near_shape.mean() < 0.05
        assert _colour_match(outside, BG, tol=0).mean() > 0.9


def test_scale_range_and_output_size():
    h, w, size = 60, 90, 64
    image = np.full((h, w, 3), 200, np.uint8)
    full = np.ones((1, h, w), np.uint8)  # one instance covering the whole image
    for lo, hi in (LSJ, SSJ):
        tf = ScaleJitter(size, (lo, hi), flip_prob=0.0, pad_value=PAD)
        scales = []
        for seed in range(300):
            out = tf(image, masks=full, rng=np.random.default_rng(seed))
            rh, rw = out.geometry.resized_size
            s = rw / size  # w is the longer side
            assert lo - 1 / size <= s <= hi + 1 / size
            assert abs(rh / rw - h / w) <= 1.0 / rw + 1e-9  # aspect ratio kept
            assert out.image.shape == (size, size, 3)
            ch, cw = out.geometry.content_size
            assert (ch, cw) == (min(rh, size), min(rw, size))
            # The visible content is exactly the resized (and cropped) image.
            np.testing.assert_array_equal(out.boxes, [[0, 0, cw, ch]])
            assert (out.image[:ch, :cw] == 200).all() and (out.image[ch:] == PAD).all()
            scales.append(s)
        span = hi - lo
        assert min(scales) < lo + 0.05 * span and max(scales) > hi - 0.05 * span
        assert abs(np.mean(scales) - (lo + hi) / 2) < 0.06 * span


def test_flip_mirrors_boxes_masks_and_pixels_exactly():
    image, masks = _scene(90, 150)
    for seed in range(15):
        a = ScaleJitter(128, LSJ, flip_prob=0.0)(image, masks=masks,
                                                  rng=np.random.default_rng(seed))
        b = ScaleJitter(128, LSJ, flip_prob=1.0)(image, masks=masks,
                                                  rng=np.random.default_rng(seed))
        assert a.geometry.resized_size == b.geometry.resized_size
        assert a.geometry.offset == b.geometry.offset and b.geometry.flip
        ch, cw = a.geometry.content_size
        np.testing.assert_array_equal(b.keep, a.keep)
        expected = a.boxes.copy()
        expected[:, [0, 2]] = cw - a.boxes[:, [2, 0]]
        np.testing.assert_array_equal(b.boxes, expected)
        np.testing.assert_array_equal(b.masks[:, :ch, :cw], a.masks[:, :ch, ::-1][:, :, -cw:])
        np.testing.assert_array_equal(b.image[:ch, :cw], a.image[:ch, :cw][:, ::-1])


def test_box_only_instances_follow_the_geometry():
    image, masks = _scene()
    boxes = np.array([_extent(m) for m in masks], np.float32)
    tf = ScaleJitter(160, LSJ, flip_prob=0.5)
    for seed in range(30):
        with_masks = tf(image, masks=masks, rng=np.random.default_rng(seed))
        box_only = tf(image, boxes=boxes, rng=np.random.default_rng(seed))
        g = box_only.geometry
        assert box_only.masks is None and g == with_masks.geometry
        (sy, sx), (oy, ox), (ch, cw) = g.scale, g.offset, g.content_size
        x = boxes[:, 0::2] * sx - ox
        y = boxes[:, 1::2] * sy - oy
        inside = (x >= 0).all(1) & (x <= cw).all(1) & (y >= 0).all(1) & (y <= ch).all(1)
        if g.flip:
            x = cw - x[:, ::-1]
        expected = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1).clip(0, [cw, ch, cw, ch])
        np.testing.assert_allclose(box_only.boxes, expected[box_only.keep], atol=1e-4)
        # Instances the crop leaves whole: mapped COCO box == mask-derived box up to the
        # nearest-neighbour rounding of each edge (half a source pixel, plus one output pixel
        # for thin tips skipped when downscaling).
        whole = np.flatnonzero(inside)
        assert set(whole) <= set(box_only.keep) and set(whole) <= set(with_masks.keep)
        a = with_masks.boxes[np.searchsorted(with_masks.keep, whole)]
        b = box_only.boxes[np.searchsorted(box_only.keep, whole)]
        np.testing.assert_allclose(a, b, atol=1.0 + 0.5 * max(g.scale) + 1e-4)


def test_cropped_away_instances_are_dropped_with_labels():
    # 100 x 100 image at 2x, crop the top-left 100 x 100: only the top-left quadrant stays.
    image = np.zeros((100, 100, 3), np.uint8)
    masks = np.zeros((5, 100, 100), np.uint8)
    masks[0, 5:20, 5:20] = 1  # top-left: kept
    masks[1, 5:20, 70:90] = 1  # top-right: dropped
    masks[2, 70:90, 5:20] = 1  # bottom-left: dropped
    masks[3, 70:90, 70:90] = 1  # bottom-right: dropped
    masks[4, 40:60, 40:60] = 1  # straddles the crop: kept, clipped to the crop
    labels, crowd = np.array([10, 20, 30, 40, 50]), np.array([0, 0, 0, 0, 1], np.uint8)
    geom = Geometry((100, 100), (200, 200), (0, 0), 100)
    out = apply_geometry(geom, image, masks=masks, labels=labels, iscrowd=crowd)
    np.testing.assert_array_equal(out.keep, [0, 4])
    np.testing.assert_array_equal(out.labels, [10, 50])
    np.testing.assert_array_equal(out.iscrowd, [0, 1])
    np.testing.assert_array_equal(out.boxes, [[10, 10, 40, 40], [80, 80, 100, 100]])
    boxes = np.array([_extent(m) for m in masks], np.float32)
    by_box = apply_geometry(geom, image, boxes=boxes, labels=labels, iscrowd=crowd)
    np.testing.assert_array_equal(by_box.keep, [0, 4])
    np.testing.assert_array_equal(by_box.boxes, out.boxes)
    # A crop window in the middle keeps only the straddling instance.
    mid = apply_geometry(Geometry((100, 100), (200, 200), (60, 60), 80), image, masks=masks,
                         labels=labels)
    np.testing.assert_array_equal(mid.labels, [50])


@pytest.mark.parametrize("hw", [(97, 203), (300, 120), (64, 64), (480, 640)])
@pytest.mark.parametrize("size", [128, 256])
def test_eval_resize_and_unscale_round_trip(hw, size):
    h, w = hw
    image, masks = _scene(h, w)
    boxes = np.array([_extent(m) for m in masks], np.float32)
    tf = ResizePad(size, pad_value=PAD)
    out = tf(image, boxes=boxes)
    g = out.geometry
    assert not g.flip and g.offset == (0, 0) and max(g.resized_size) == size
    np.testing.assert_array_equal(out.keep, np.arange(len(boxes)))
    back = unscale_boxes(out.boxes, g.scale, (h, w))
    np.testing.assert_allclose(back, boxes, atol=1e-3)
    t_back = unscale_boxes(torch.from_numpy(out.boxes), torch.tensor(g.scale), (h, w))
    np.testing.assert_allclose(t_back.numpy(), boxes, atol=1e-3)
    # Through the masks (boxes recomputed after resampling): within 1 original pixel when
    # upscaling (every source pixel is sampled); downscaling may skip thin tips of a shape.
    with_masks = tf(image, masks=masks)
    back = unscale_boxes(with_masks.boxes, g.scale, (h, w))
    atol = 1.0 if min(g.scale) >= 1 else 2.0 / min(g.scale)
    np.testing.assert_allclose(back, boxes, atol=atol + 1e-3)
    # Mask probabilities pasted on the S x S output come back to the original size.
    probs = torch.from_numpy(with_masks.masks).float()[:, None]
    restored = unscale_masks(probs, g.scale, (h, w))
    assert restored.shape == (len(masks), 1, h, w)
    for k, m in enumerate(masks):
        wrong = ((restored[k, 0] > 0.5).numpy() != m.astype(bool)).sum()
        perimeter = 2 * sum(np.ptp(np.nonzero(m), axis=1) + 1)
        assert wrong <= perimeter * max(1.0, 1.0 / min(g.scale))


def test_determinism_for_a_seed():
    image, masks = _scene()
    tf = ScaleJitter(128)
    a = tf(image, masks=masks, rng=np.random.default_rng(7))
    b = tf(image, masks=masks, rng=np.random.default_rng(7))
    c = tf(image, masks=masks, rng=np.random.default_rng(8))
    assert a.geometry == b.geometry != c.geometry
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.boxes, b.boxes)


def test_option_errors():
    with pytest.raises(ConfigError, match="output_size"):
        ScaleJitter(0)
    with pytest.raises(ConfigError, match="scale_range"):
        ScaleJitter(64, (2.0, 1.0))
    with pytest.raises(ConfigError, match="flip_prob"):
        ScaleJitter(64, flip_prob=1.5)
    with pytest.raises(ConfigError, match="pad_value"):
        ResizePad(64, pad_value=300)
    with pytest.raises(ConfigError, match="interpolation"):
        ResizePad(64, interpolation="bicubic")
    with pytest.raises(ConfigError, match="detection transform"):
        build_detection_transform("rsj")
    assert build_detection_transform("ssj", 64).scale_range == SSJ
    assert isinstance(build_detection_transform("eval", 64), ResizePad)
    image, masks = _scene()
    with pytest.raises(ValueError, match="masks"):
        ScaleJitter(64)(image, masks=masks[:, :10])
    with pytest.raises(ValueError, match="labels"):
        ScaleJitter(64)(image, masks=masks, labels=[1, 2])


# ---- compact masks -----------------------------------------------------------------------

def test_pack_masks_round_trips_exactly_and_is_small():
    rng = np.random.default_rng(0)
    size = 97  # windows whose bit count is not a multiple of 8
    masks = np.zeros((5, size, size), np.uint8)
    masks[0] = rng.random((size, size)) < 0.3  # noise over the whole canvas
    masks[1, 10:13, 20:31] = 1
    masks[2, 50, 60] = 1
    masks[3] = 1
    # masks[4] stays empty
    data, windows = pack_masks(masks)
    assert data.dtype == np.uint8 and windows.dtype == np.int32
    np.testing.assert_array_equal(windows[1], [20, 10, 31, 13])
    np.testing.assert_array_equal(windows[4], [0, 0, 0, 0])
    back = unpack_masks(data, windows, size)
    assert back.dtype == torch.uint8
    np.testing.assert_array_equal(back.numpy(), masks)
    assert data.nbytes <= 5 * (size * size + 7) // 8
    with pytest.raises(DataError, match="packed masks"):
        unpack_masks(data[:-1], windows, size)

    # A drawn 1024 px scene: each instance costs its tight box / 8, far below raw uint8.
    image, scene_masks = _scene(768, 1024)
    out = ResizePad(1024)(image, masks=scene_masks)
    data, windows = pack_masks(out.masks)
    np.testing.assert_array_equal(unpack_masks(data, windows, 1024).numpy(), out.masks)
    assert data.nbytes / len(out.masks) < 1024 * 1024 / 40


def test_masks_to_boxes_empty():
    boxes, nonempty = masks_to_boxes(np.zeros((0, 8, 8), np.uint8))
    assert boxes.shape == (0, 4) and nonempty.shape == (0,)


# ---- batch function ----------------------------------------------------------------------

def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _ragged(items: list) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        out[i] = x
    return out


def _rows(scenes: list[tuple[np.ndarray, np.ndarray]], cats: np.ndarray,
          crowd: np.ndarray) -> dict[str, np.ndarray]:
    """Shard rows in the converter's schema, with RLE masks and COCO boxes from pycocotools."""
    cols: dict[str, list] = {k: [] for k in ("image_id", "file_name", "image", "width",
                                             "height", "ann_ids", "category_ids", "boxes",
                                             "areas", "iscrowd", "masks")}
    for j, (image, masks) in enumerate(scenes):
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
        n = len(masks)
        cols["image_id"].append(100 + j)
        cols["file_name"].append(f"img{j}.png")
        cols["image"].append(_png(image))
        cols["height"].append(image.shape[0])
        cols["width"].append(image.shape[1])
        cols["ann_ids"].append(np.arange(n, dtype=np.int64) + 1000 * j)
        cols["category_ids"].append(cats[:n].astype(np.int32))
        cols["boxes"].append(mask_utils.toBbox(rles).astype(np.float32).reshape(-1))
        cols["areas"].append(mask_utils.area(rles).astype(np.float32))
        cols["iscrowd"].append(crowd[:n].astype(np.int8))
        cols["masks"].append(_ragged([r["counts"] for r in rles]))
    batch = {k: _ragged(v) for k, v in cols.items()}
    for k in ("image_id", "width", "height"):
        batch[k] = np.asarray(cols[k], dtype=np.int64 if k == "image_id" else np.int32)
    batch["file_name"] = np.asarray(cols["file_name"])
    return batch


COCO_CATS = np.array([18, 1, 90, 1, 44])
LABEL_MAP = contiguous_label_map([1, 18, 44, 90, 7])  # {1: 1, 7: 2, 18: 3, 44: 4, 90: 5}


def _empty_scene() -> tuple[np.ndarray, np.ndarray]:
    return np.full((40, 60, 3), 9, np.uint8), np.zeros((0, 40, 60), np.uint8)


def test_batch_transform_schema_and_masks():
    batch = _rows([_scene(), _scene(70, 50), _empty_scene()], COCO_CATS, CROWD)
    tf = ScaleJitter(128, LSJ)
    out = detection_batch_transform(batch, tf, label_map=LABEL_MAP, seed=3)
    assert set(out) == {"image", "image_id", "height", "width", "scale", "boxes", "labels",
                        "iscrowd", "ann_ids", "pasted", "masks", "mask_windows"}
    assert out["image"].shape == (3, 128, 128, 3) and out["image"].dtype == np.uint8
    np.testing.assert_array_equal(out["image_id"], [100, 101, 102])
    np.testing.assert_array_equal(out["height"], [96, 70, 40])
    assert out["scale"].shape == (3, 2)
    for i in range(3):
        boxes = out["boxes"][i].reshape(-1, 4)
        n = len(boxes)
        assert out["boxes"][i].dtype == np.float32 and out["labels"][i].dtype == np.int64
        assert len(out["labels"][i]) == len(out["iscrowd"][i]) == len(out["ann_ids"][i]) == n
        kept = out["ann_ids"][i] % 1000
        np.testing.assert_array_equal(out["labels"][i],
                                      [LABEL_MAP[c] for c in COCO_CATS[kept]])
        np.testing.assert_array_equal(out["iscrowd"][i], CROWD[kept])
        masks = unpack_masks(out["masks"][i], out["mask_windows"][i], 128).numpy()
        assert masks.shape == (n, 128, 128)
        for box, mask in zip(boxes, masks):
            np.testing.assert_array_equal(box, _extent(mask))
        # Same draws as calling the transform directly with the row's generator.
        image, scene_masks = [_scene(), _scene(70, 50), _empty_scene()][i]
        direct = tf(image, masks=scene_masks if len(scene_masks) else None,
                    rng=np.random.default_rng([3, 0, 100 + i]))
        np.testing.assert_array_equal(out["image"][i], direct.image)
        if n:
            np.testing.assert_array_equal(masks, direct.masks)
    assert len(out["boxes"][2]) == 0 and len(out["masks"][2]) == 0


def test_batch_transform_determinism_and_epochs():
    batch = _rows([_scene(), _scene(70, 50)], COCO_CATS, CROWD)
    tf = ScaleJitter(96)
    a = detection_batch_transform(batch, tf, label_map=LABEL_MAP, seed=1, epoch=0)
    b = detection_batch_transform(batch, tf, label_map=LABEL_MAP, seed=1, epoch=0)
    c = detection_batch_transform(batch, tf, label_map=LABEL_MAP, seed=1, epoch=1)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["scale"], b["scale"])
    assert not np.array_equal(a["scale"], c["scale"])
    # A row's draws do not depend on the rest of its batch.
    single = {k: v[1:] for k, v in batch.items()}
    d = detection_batch_transform(single, tf, label_map=LABEL_MAP, seed=1, epoch=0)
    np.testing.assert_array_equal(d["image"][0], a["image"][1])


def test_batch_copy_paste_moves_the_partners_objects_with_their_columns():
    scenes = [_scene(), _scene(70, 50), _empty_scene()]
    batch = _rows(scenes, COCO_CATS, CROWD)
    tf = ScaleJitter(128, SSJ, flip_prob=0.0)
    params = CopyPasteParams(prob=1.0, blend=False)
    paired = with_partners(batch, batch, prob=1.0, seed=5, epoch=0)
    plain = detection_batch_transform(batch, tf, label_map=LABEL_MAP, seed=5)
    out = detection_batch_transform(paired, tf, label_map=LABEL_MAP, seed=5,
                                    copy_paste=params)
    again = detection_batch_transform(paired, tf, label_map=LABEL_MAP, seed=5,
                                      copy_paste=params)
    for key in out:  # same seed, same stream
        for x, y in zip(out[key], again[key]):
            np.testing.assert_array_equal(x, y)
    plain_masks = [unpack_masks(plain["masks"][j], plain["mask_windows"][j], 128).numpy()
                   for j in range(3)]
    pasted_total = 0
    for i in range(3):
        partner = int(paired["partner_image_id"][i]) - 100
        assert partner != i and 0 <= partner < 3
        n = len(out["labels"][i])
        pasted = out["pasted"][i].astype(bool)
        assert out["pasted"][i].dtype == np.uint8 and len(pasted) == n
        masks = unpack_masks(out["masks"][i], out["mask_windows"][i], 128).numpy()
        for box, mask in zip(out["boxes"][i].reshape(-1, 4), masks):
            np.testing.assert_array_equal(box, _extent(mask))  # boxes follow the masks
        # Annotation ids, labels and crowd flags travel together: a survivor is one of
        # the row's own objects, a pasted one its partner's (ids are row * 1000 + k).
        ids = out["ann_ids"][i]
        assert (ids[~pasted] // 1000 == i).all() and (ids[pasted] // 1000 == partner).all()
        kept = ids % 1000
        np.testing.assert_array_equal(out["labels"][i], [LABEL_MAP[c] for c in COCO_CATS[kept]])
        np.testing.assert_array_equal(out["iscrowd"][i], CROWD[kept])
        # Outside the pasted masks the image is the plain jittered one (no blending).
        union = masks[pasted].any(0) if pasted.any() else np.zeros((128, 128), bool)
        np.testing.assert_array_equal(out["image"][i][~union], plain["image"][i][~union])
        # The partner arrives as it is itself this epoch: each pasted mask is one of its
        # own jittered masks (same annotation id), and the pasted pixels are its pixels.
        for k in np.flatnonzero(pasted):
            own = np.flatnonzero(plain["ann_ids"][partner] == ids[k])
            assert len(own) == 1
            np.testing.assert_array_equal(masks[k], plain_masks[partner][own[0]])
        np.testing.assert_array_equal(out["image"][i][union], plain["image"][partner][union])
        pasted_total += int(pasted.sum())
    assert pasted_total > 0
    # prob 0 is the plain pipeline, draw for draw.
    off = detection_batch_transform(with_partners(batch, batch, prob=0.0, seed=5), tf,
                                    label_map=LABEL_MAP, seed=5,
                                    copy_paste=CopyPasteParams(prob=0.0))
    np.testing.assert_array_equal(off["image"], plain["image"])
    images, targets = to_torchvision_targets(out)
    assert [len(t["boxes"]) for t in targets] == [
        int((out["iscrowd"][i] == 0).sum()) for i in range(3)]
    with pytest.raises(ValueError, match="partner"):
        detection_batch_transform(batch, tf, label_map=LABEL_MAP, seed=5, copy_paste=params)


def test_partner_draws_depend_on_the_row_and_epoch_only():
    pool = np.arange(500, 540)
    a = draw_partners(pool, pool, prob=1.0, seed=3, epoch=2)
    assert (a >= 0).all() and (pool[a] != pool).all()  # never the image itself
    # The same row draws the same partner whatever else is in its batch, and in any order.
    part = draw_partners(pool[[7, 3, 30]], pool, prob=1.0, seed=3, epoch=2)
    np.testing.assert_array_equal(part, a[[7, 3, 30]])
    assert (draw_partners(pool, pool, prob=1.0, seed=3, epoch=3) != a).sum() > 30
    # prob: the share of rows that receive a paste; one image alone has no partner.
    half = draw_partners(np.arange(4000), pool, prob=0.5, seed=1, epoch=0)
    assert 0.46 < (half >= 0).mean() < 0.54
    assert (draw_partners(pool, pool, prob=0.0, seed=3, epoch=2) == -1).all()
    assert draw_partners([9], [9], prob=1.0, seed=0, epoch=0).tolist() == [-1]
    assert draw_partners([9], [], prob=1.0, seed=0, epoch=0).tolist() == [-1]
    # Uniform over the others: each of 4 partners about a quarter of 4,000 draws.
    counts = np.bincount(draw_partners(np.arange(10, 4010), np.arange(4), prob=1.0,
                                       seed=0, epoch=0), minlength=4)
    assert (np.abs(counts - 1000) < 100).all()


def test_batch_paste_depends_on_the_row_not_its_batch_and_reads_the_epoch_clock():
    # Ray Data hands rows in block order, which changes every epoch and run: each image's
    # output must follow from the image, the epoch and the pool alone (a resumed run then
    # replays an epoch's pastes), and a clock object gives what its epoch number does.
    scenes = [_scene(), _scene(70, 50), _scene(90, 110), _empty_scene()]
    batch = _rows(scenes, COCO_CATS, CROWD)
    tf = ScaleJitter(128, SSJ, flip_prob=0.5)
    params = CopyPasteParams(prob=1.0, blend=True)
    out = detection_batch_transform(with_partners(batch, batch, prob=1.0, seed=7, epoch=3),
                                    tf, label_map=LABEL_MAP, seed=7, epoch=3,
                                    copy_paste=params)
    assert sum(len(p) and p.any() for p in out["pasted"]) > 0
    for order in ([2, 0, 3, 1], [1], [3, 0]):
        rows = {k: v[np.array(order)] for k, v in batch.items()}
        again = detection_batch_transform(
            with_partners(rows, batch, prob=1.0, seed=7, epoch=lambda: 3), tf,
            label_map=LABEL_MAP, seed=7, epoch=lambda: 3, copy_paste=params)
        assert again["image_id"].tolist() == out["image_id"][order].tolist()
        for key in out:
            for position, k in enumerate(order):
                np.testing.assert_array_equal(again[key][position], out[key][k])
    other = detection_batch_transform(
        with_partners(batch, batch, prob=1.0, seed=7, epoch=4), tf,
        label_map=LABEL_MAP, seed=7, epoch=lambda: 4, copy_paste=params)
    assert not np.array_equal(other["image"], out["image"])


def test_partner_table_matches_the_numpy_twin():
    import pyarrow as pa

    batch = _rows([_scene(), _scene(70, 50), _scene(90, 110)], COCO_CATS, CROWD)
    table = pa.table({k: pa.array(list(v)) if v.dtype == object else pa.array(v)
                      for k, v in batch.items()})
    for prob in (1.0, 0.5):
        numpy_side = with_partners(batch, batch, prob=prob, seed=2, epoch=1)
        arrow_side = with_partner_table(table, table, prob=prob, seed=2, epoch=lambda: 1)
        ids = arrow_side.column("partner_image_id").to_numpy()
        np.testing.assert_array_equal(ids, numpy_side["partner_image_id"])
        for i, partner in enumerate(ids):
            got = arrow_side.column("partner_image")[i].as_py()
            assert got == (None if partner < 0 else batch["image"][partner - 100])
    # An empty pool (no paste source): every row without a partner.
    none = with_partner_table(table, table.slice(0, 0), prob=1.0, seed=2, epoch=1)
    assert none.column("partner_image_id").to_pylist() == [-1, -1, -1]


def test_batch_transform_eval_without_masks_round_trips_boxes():
    batch = _rows([_scene(), _scene(70, 50)], COCO_CATS, CROWD)
    out = detection_batch_transform(batch, ResizePad(160), label_map=LABEL_MAP,
                                    with_masks=False)
    for i in range(2):
        coco = xywh_to_xyxy(batch["boxes"][i])
        assert len(out["masks"][i]) == 0
        back = unscale_boxes(out["boxes"][i], out["scale"][i],
                             (out["height"][i], out["width"][i]))
        np.testing.assert_allclose(back, coco, atol=1e-3)


def test_batch_transform_errors_name_the_file():
    batch = _rows([_scene(), _scene()], COCO_CATS, CROWD)
    with pytest.raises(DataError, match=r"img0.png.*\[18\]"):
        detection_batch_transform(batch, ResizePad(64), label_map={1: 1, 44: 2, 90: 3})
    bad = dict(batch, masks=batch["masks"].copy())
    bad["masks"][1] = bad["masks"][1][:2]
    with pytest.raises(DataError, match="img1.png.*differ in length"):
        detection_batch_transform(bad, ResizePad(64), label_map=LABEL_MAP)
    bad = dict(batch, image=batch["image"].copy())
    bad["image"][0] = b"\x89PNG broken"
    with pytest.raises(DataError, match="img0.png"):
        detection_batch_transform(bad, ResizePad(64), label_map=LABEL_MAP)
    bad = dict(batch, width=np.array([128, 100], np.int32))
    with pytest.raises(DataError, match="img1.png.*row says"):
        detection_batch_transform(bad, ResizePad(64), label_map=LABEL_MAP)


def test_to_torchvision_targets_drops_crowd():
    batch = _rows([_scene(), _scene(70, 50), _empty_scene()], COCO_CATS, CROWD)
    out = detection_batch_transform(batch, ResizePad(128), label_map=LABEL_MAP)
    images, targets = to_torchvision_targets(out)
    assert len(images) == 3 and images[0].shape == (3, 128, 128)
    assert images[0].dtype == torch.float32 and 0 <= images[0].min() <= images[0].max() <= 1
    torch.testing.assert_close(images[1] * 255, torch.from_numpy(out["image"][1]).permute(
        2, 0, 1).float())
    t = targets[0]
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (4, 128, 128)
    assert (t["iscrowd"] == 0).all() and len(t["labels"]) == 4  # the crowd one is gone
    keep = out["iscrowd"][0] == 0
    np.testing.assert_array_equal(t["boxes"].numpy(), out["boxes"][0].reshape(-1, 4)[keep])
    _, with_crowd = to_torchvision_targets(out, drop_crowd=False)
    assert with_crowd[0]["masks"].shape[0] == 5 and with_crowd[0]["iscrowd"].sum() == 1
    assert targets[2]["boxes"].shape == (0, 4) and targets[2]["masks"].shape == (0, 128, 128)
    _, no_masks = to_torchvision_targets(out, with_masks=False)
    assert "masks" not in no_masks[0]


def test_targets_accept_fixed_shape_columns():
    # Ray Data turns a ragged column whose rows happen to have equal lengths into a 2-D
    # array; the consumers index rows, so both layouts give the same targets.
    batch = _rows([_scene(), _scene()], COCO_CATS, CROWD)
    out = detection_batch_transform(batch, ScaleJitter(96, SSJ), label_map=LABEL_MAP, seed=5)
    stacked = dict(out)
    for k in ("boxes", "labels", "iscrowd", "ann_ids"):
        stacked[k] = np.stack(list(out[k]))
    _, a = to_torchvision_targets(out, drop_crowd=False)
    _, b = to_torchvision_targets(stacked, drop_crowd=False)
    for ta, tb in zip(a, b):
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k])


def _small_mask_rcnn(num_classes: int, size: int) -> torch.nn.Module:
    """torchvision's Mask R-CNN with tiny heads on a one-layer stride-8 backbone (CPU-fast)."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 8, stride=8), torch.nn.ReLU())
    backbone.out_channels = 16
    return MaskRCNN(
        backbone, min_size=size, max_size=size,
        rpn_anchor_generator=AnchorGenerator(((16, 32, 64),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        box_head=TwoMLPHead(16 * 7 * 7, 32),
        box_predictor=FastRCNNPredictor(32, num_classes),
        box_batch_size_per_image=64, box_detections_per_img=10,
        mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2),
        mask_head=MaskRCNNHeads(16, (16,), 1),
        mask_predictor=MaskRCNNPredictor(16, 16, num_classes),
    )


def test_targets_train_torchvision_mask_rcnn():
    batch = _rows([_scene(), _scene(70, 50), _empty_scene()], COCO_CATS, CROWD)
    out = detection_batch_transform(batch, ScaleJitter(128, SSJ), label_map=LABEL_MAP, seed=0)
    images, targets = to_torchvision_targets(out)
    torch.manual_seed(0)
    model = _small_mask_rcnn(len(LABEL_MAP) + 1, 128).train()
    losses = model(images, targets)
    assert {"loss_mask", "loss_box_reg", "loss_classifier", "loss_objectness"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        preds = model(images[:1])
    assert preds[0]["masks"].shape[-2:] == (128, 128)  # pasted at S x S: unscale_masks input


# ---- real COCO images ----------------------------------------------------------------------

def test_real_coco_rows_lsj_and_mask_size(real_data_root: Path):
    root = real_data_root / "coco128"
    ann_file = root / "annotations" / "instances_val2017.json"
    if not ann_file.is_file():
        pytest.skip(f"no coco128 annotations at {ann_file}")
    coco = json.loads(ann_file.read_text())
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    infos = [im for im in coco["images"] if im["id"] in by_image][:4]
    cols: dict[str, list] = {k: [] for k in ("image_id", "file_name", "image", "width",
                                             "height", "ann_ids", "category_ids", "boxes",
                                             "iscrowd", "masks")}
    for im in infos:
        anns = by_image[im["id"]]
        cols["image_id"].append(im["id"])
        cols["file_name"].append(im["file_name"])
        cols["image"].append((root / "images" / "val2017" / im["file_name"]).read_bytes())
        cols["width"].append(im["width"])
        cols["height"].append(im["height"])
        cols["ann_ids"].append(np.array([a["id"] for a in anns], np.int64))
        cols["category_ids"].append(np.array([a["category_id"] for a in anns], np.int32))
        cols["boxes"].append(np.array([a["bbox"] for a in anns], np.float32).reshape(-1))
        cols["iscrowd"].append(np.array([a["iscrowd"] for a in anns], np.int8))
        cols["masks"].append(_ragged([a["segmentation"]["counts"].encode() for a in anns]))
    batch = {k: _ragged(v) for k, v in cols.items()}
    label_map = contiguous_label_map(c["id"] for c in coco["categories"])
    out = detection_batch_transform(batch, ScaleJitter(1024, LSJ), label_map=label_map, seed=0)
    n = sum(len(x) for x in out["labels"])
    packed = sum(x.nbytes for x in out["masks"])
    assert n > 0 and packed / n < 1024 * 1024 / 8 / 4  # well under even whole-canvas bits
    for i in range(len(infos)):
        masks = unpack_masks(out["masks"][i], out["mask_windows"][i], 1024).numpy()
        for box, mask in zip(out["boxes"][i].reshape(-1, 4), masks):
            np.testing.assert_array_equal(box, _extent(mask))
