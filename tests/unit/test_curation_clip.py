"""The CLIP side of curation without Ray: model specs, local weights only, image and text
embeddings against open_clip's own calls, the queries file, and the per-bucket choices of
:func:`raylab.curation.curate.select_stream` on scores built by hand."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raylab.curation.clip import (
    ImageEmbedder,
    check_checkpoint,
    load_clip,
    model_id,
    parse_model,
    text_embeddings,
    write_random_clip,
)
from raylab.curation.curate import select_stream
from raylab.curation.queries import BACKGROUND, load_queries, parse_queries
from raylab.data.clear import UNLABELED
from raylab.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return write_random_clip(tmp_path_factory.mktemp("clip"))


def _png(color: tuple[int, int, int], size: int = 40) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, format="PNG")
    return out.getvalue()


def test_model_specs() -> None:
    assert parse_model("open_clip:ViT-B-32") == "ViT-B-32"
    with pytest.raises(ConfigError, match="expected --model open_clip:ARCH"):
        parse_model("timm:vit_tiny")
    with pytest.raises(ConfigError, match="did you mean ViT-B-32"):
        parse_model("open_clip:ViT-B-23")
    with pytest.raises(ConfigError, match="config file not found"):
        parse_model("open_clip:/nowhere/model.json")


def test_weights_come_from_a_local_file_only(tiny: tuple[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pretrained tags such as 'openai' are not"):
        check_checkpoint("openai")
    config, weights = tiny
    other = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, other)
    with pytest.raises(ConfigError, match="does not fit open_clip architecture"):
        load_clip(parse_model(f"open_clip:{config}"), other)
    # The id follows the weights' contents: other weights, other cache folder.
    arch = parse_model(f"open_clip:{config}")
    assert model_id(arch, weights) == model_id(arch, weights)
    assert model_id(arch, weights) != model_id(arch, other)


def test_image_embeddings_are_open_clips_normalised(tiny: tuple[str, str]) -> None:
    config, weights = tiny
    arch = parse_model(f"open_clip:{config}")
    embedder = ImageEmbedder(arch, weights, keep=("path", "stamp"), device="cpu")
    images = [_png((200, 30, 30)), _png((30, 200, 30), size=64)]
    out = embedder({"image": np.array(images, dtype=object),
                    "path": np.array(["a.png", "b.png"]), "stamp": np.array([1.0, 2.0])})
    assert out["embedding"].shape == (2, 64) and out["embedding"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, atol=1e-5)
    assert out["path"].tolist() == ["a.png", "b.png"] and out["stamp"].tolist() == [1.0, 2.0]
    # The same numbers as open_clip's own preprocess + encode_image, normalised.
    model, preprocess, _ = load_clip(arch, weights)
    with torch.no_grad():
        ref = model.encode_image(torch.stack(
            [preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]))
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_allclose(out["embedding"], ref, atol=1e-5)
    with pytest.raises(DataError, match="bad.png: image does not decode"):
        embedder({"image": np.array([b"not an image"], dtype=object),
                  "path": np.array(["bad.png"]), "stamp": np.array([0.0])})


def test_text_embeddings_average_the_normalised_prompts(tiny: tuple[str, str]) -> None:
    config, weights = tiny
    model, _, tokenizer = load_clip(parse_model(f"open_clip:{config}"), weights)
    prompts = [["a photo of a cat.", "a cat."], ["a ship."]]
    got = text_embeddings(model, tokenizer, prompts)
    with torch.no_grad():
        cat = torch.nn.functional.normalize(model.encode_text(tokenizer(prompts[0])), dim=-1)
        ship = torch.nn.functional.normalize(model.encode_text(tokenizer(prompts[1])), dim=-1)
    want = torch.nn.functional.normalize(torch.stack([cat.mean(0), ship[0]]), dim=-1)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_queries_file(tmp_path: Path) -> None:
    q = parse_queries({"templates": ["a photo of a {}.", "art of a {}."],
                       "classes": {"bus": None, "dog": ["a dog."]}})
    assert q.names == ("bus", "dog")
    assert q.prompts == (("a photo of a bus.", "art of a bus."), ("a dog.",))
    assert parse_queries({"classes": ["cat"]}).prompts == (("a photo of a cat.",),)
    for spec, words in (({"classes": [BACKGROUND]}, "reserved for the background"),
                        ({"classes": ["a"], "templates": ["no slot"]}, "exactly one '{}'"),
                        ({"classes": {"a": "one string"}}, "a: expected a non-empty list"),
                        ({"classes": ["a", "a"]}, "listed twice"),
                        ({"classes": ["a"], "prompts": 1}, "unknown key"),
                        ([1, 2], "expected a YAML mapping")):
        with pytest.raises(ConfigError, match=words):
            parse_queries(spec)
    bad = tmp_path / "q.yaml"
    bad.write_text("classes:\n  - cat\n   - dog: [\n")
    with pytest.raises(DataError, match=r"q\.yaml:\d+: not valid YAML"):
        load_queries(bad)
    with pytest.raises(DataError, match="cannot read the queries file"):
        load_queries(tmp_path / "missing.yaml")


def test_select_stream_by_hand() -> None:
    # Two classes; edges 0 | 10 | 20 | 30: bucket 0 = t in [0, 10), and so on.
    paths = np.array(list("abcdefgh"), dtype=object)
    stamps = np.array([1.0, 5.0, 12.0, 15.0, 18.0, 25.0, 40.0, 22.0])  # g: outside
    scores = np.array([[0.9, 0.1], [0.1, 0.9],   # bucket 0: unlabeled whatever they score
                       [0.8, 0.2], [0.3, 0.7], [0.1, 0.1],   # bucket 1
                       [0.6, 0.5], [0.0, 0.0], [0.05, 0.02]], dtype=np.float32)
    edges = np.array([0.0, 10.0, 20.0, 30.0])
    out = select_stream(paths, stamps, scores, edges, per_class=1, margin=0.0, background=1)
    assert out["buckets"][0] == [("a", UNLABELED), ("b", UNLABELED)]
    # Bucket 1: class 0's top is c (.8), class 1's d (.7); background: e (best .1).
    assert out["buckets"][1] == [("c", 0), ("d", 1), ("e", 2)]
    # Bucket 2: f is the top of both classes, so ambiguous; h is the background.
    assert out["buckets"][2] == [("h", 2)]
    assert out["ambiguous"] == {1: 0, 2: 1}
    assert out["outside"] == 1 and out["has_background"]
    assert [(p, b, label) for p, b, label, _ in out["selection"]] == [
        ("c", 1, 0), ("d", 1, 1), ("e", 1, 2), ("h", 2, 2)]
    np.testing.assert_allclose([s for *_, s in out["selection"]], [0.8, 0.7, 0.1, 0.05])
    with pytest.raises(DataError, match="bucket 2: no image was selected"):
        select_stream(paths, stamps, scores, edges, per_class=1, margin=0.0, background=0)
    with pytest.raises(DataError, match="bucket 1 .* holds no image"):
        select_stream(paths, stamps, scores, np.array([0.0, 10.0, 11.0, 30.0]),
                      per_class=1, margin=0.0, background=1)


def test_embedding_progress_prints_a_line_per_twentieth(capsys: pytest.CaptureFixture) -> None:
    from raylab.cli import _EmbeddingProgress

    progress = _EmbeddingProgress()
    for done in range(10, 1001, 10):  # a shard of 10 images finishes at a time
        progress(done, 1000)
    lines = capsys.readouterr().out.splitlines()
    # A line once 50 more images are done (1000 / 20), and always at the end.
    assert [line.split()[1] for line in lines] == [f"{n}/1000" for n in range(50, 1001, 50)]
    assert "s left" in lines[0] and "s left" not in lines[-1]
