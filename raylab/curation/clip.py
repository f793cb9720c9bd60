"""A CLIP model from local files (open_clip), and the two things curation asks of it.

CLEAR ranked 7.8M Flickr images by the cosine similarity of their CLIP image embedding
to the text embedding of each visual concept (Lin et al. 2021, "Visio-Linguistic Dataset
Curation"). Here the model is any open_clip architecture, built from its config and
loaded from a local weights file only: nothing is downloaded at run time, so a pretrained
tag such as ``openai`` is refused rather than fetched. ``ARCH`` is a name open_clip knows
(``ViT-B-32``, ``RN50``, ...) or the path of a model-config JSON in open_clip's format (a
custom or tiny model; :func:`write_random_clip` writes one with random weights).

Pure torch: the Ray Data job that runs :class:`ImageEmbedder` in actors lives in
:mod:`raylab.runtime.embedding`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from raylab.curation.select import class_embeddings
from raylab.errors import ConfigError, DataError

PREFIX = "open_clip:"
_MODEL_HINT = ("expected --model open_clip:ARCH, ARCH an open_clip architecture (e.g. "
               "ViT-B-32) or the path of a model-config JSON")


def _open_clip() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: never reach the hub
    try:
        import open_clip
    except ImportError:
        raise ConfigError("curation needs open_clip: pip install open-clip-torch") from None
    return open_clip


def parse_model(spec: str) -> str:
    """``ARCH`` of ``open_clip:ARCH``, checked against open_clip's architectures.

    Raises:
        ConfigError: Another prefix, an unknown name, or a config JSON that does not exist.
    """
    if not isinstance(spec, str) or not spec.startswith(PREFIX) or spec == PREFIX:
        raise ConfigError(f"model {spec!r}: {_MODEL_HINT}")
    arch = spec[len(PREFIX):]
    if arch.endswith(".json"):
        if not Path(arch).is_file():
            raise ConfigError(f"model {spec!r}: config file not found; {_MODEL_HINT}")
        return str(Path(arch).resolve())
    known = _open_clip().list_models()
    if arch not in known:
        import difflib

        close = difflib.get_close_matches(arch, known, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"model {spec!r}: open_clip has no architecture {arch!r}{hint}")
    return arch


def _register(arch: str) -> str:
    """open_clip's name of ``arch``: a config JSON is registered under its file stem."""
    if arch.endswith(".json"):
        _open_clip().add_model_config(arch)
        return Path(arch).stem
    return arch


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """open_clip warns on the root logger for every model built without pretrained weights;
    raylab loads its weights from a file right after, so the warning only misleads."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def check_checkpoint(path: str | os.PathLike) -> str:
    """The absolute path of a local weights file.

    Raises:
        ConfigError: ``path`` is not an existing file (a pretrained tag is not fetched).
    """
    if not Path(path).is_file():
        raise ConfigError(f"checkpoint {str(path)!r}: expected a local weights file (a "
                          "state dict saved by torch.save; nothing is downloaded at run "
                          "time, so pretrained tags such as 'openai' are not accepted)")
    return str(Path(path).resolve())


def model_id(arch: str, checkpoint: str | os.PathLike) -> str:
    """A short id of (architecture, weights file contents): embeddings cached under one id
    came from exactly this model."""
    digest = hashlib.sha256()
    digest.update(Path(arch).name.encode() if arch.endswith(".json") else arch.encode())
    if arch.endswith(".json"):
        digest.update(Path(arch).read_bytes())
    with open(checkpoint, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    name = Path(arch).stem if arch.endswith(".json") else arch
    return f"{name}-{digest.hexdigest()[:12]}"


def load_clip(arch: str, checkpoint: str | os.PathLike, device: str = "cpu"
              ) -> tuple[Any, Any, Any]:
    """``(model, preprocess, tokenizer)``: the model in eval mode on ``device``, its image
    preprocessing (resize, centre crop, CLIP's normalisation) and its tokenizer.

    Raises:
        ConfigError: The weights do not fit the architecture.
    """
    open_clip = _open_clip()
    name = _register(arch)
    with _quiet_root_logger():  # "initialized randomly": ours are loaded next
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None, pretrained_image=False, pretrained_text=False,
            device=device)
    try:
        open_clip.load_checkpoint(model, str(checkpoint), device=device)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ConfigError(f"checkpoint {str(checkpoint)!r} does not fit open_clip "
                          f"architecture {name!r}: {str(exc).splitlines()[0][:300]}") from None
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def text_embeddings(model: Any, tokenizer: Any, prompts: Sequence[Sequence[str]],
                    device: str = "cpu") -> np.ndarray:
    """One L2-normalised embedding per class: the mean of its prompts' normalised text
    embeddings, normalised again (CLIP's prompt ensembling)."""
    per_class = []
    for texts in prompts:
        tokens = tokenizer(list(texts)).to(device)
        per_class.append(model.encode_text(tokens).float().cpu().numpy())
    return class_embeddings(per_class)


class ImageEmbedder:
    """A Ray Data actor's callable: L2-normalised CLIP image embeddings of a batch of
    encoded images (``image`` bytes), passing the ``keep`` columns through.

    The model is built once per actor, on the GPU when one is assigned; ``threads`` sets
    torch's CPU threads (the CPUs the actor may use).
    """

    def __init__(self, arch: str, checkpoint: str, keep: Sequence[str] = ("path",),
                 device: str = "auto", threads: int | None = None) -> None:
        if threads:  # Ray gives an actor of 1 CPU one thread; a lone actor may use more
            torch.set_num_threads(int(threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.model, self.preprocess, _ = load_clip(arch, checkpoint, device)
        self.keep = tuple(keep)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = torch.stack([self.preprocess(_decode(data, path))
                              for data, path in zip(batch["image"], batch["path"])])
        features = self.model.encode_image(pixels.to(self.device)).float()
        features = torch.nn.functional.normalize(features, dim=-1).cpu().numpy()
        out = {k: np.asarray(batch[k]) for k in self.keep}
        out["embedding"] = features.astype(np.float32)
        return out


def _decode(data: Any, path: Any) -> Image.Image:
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            return im.convert("RGB")
    except OSError as exc:
        raise DataError(f"image does not decode ({exc})", path=str(path)) from None


def write_random_clip(folder: str | os.PathLike, *, embed_dim: int = 64, image_size: int = 32,
                      patch_size: int = 8, width: int = 64, layers: int = 2, seed: int = 0
                      ) -> tuple[str, str]:
    """A small open_clip ViT with random weights: ``(config JSON path, weights path)``.

    For tests, the demo and benchmarks of the pipeline (nothing pretrained can be
    downloaded here). Its rankings are arbitrary but deterministic.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"embed_dim": embed_dim,
              "vision_cfg": {"image_size": image_size, "layers": layers, "width": width,
                             "patch_size": patch_size},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width,
                           "heads": max(1, width // 32), "layers": layers}}
    name = f"raylab-random-clip-{embed_dim}-{width}x{layers}-{image_size}px"
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return str(config_path), save_random_weights(str(config_path), folder / f"{name}.pt",
                                                 seed=seed)


def save_random_weights(arch: str, path: str | os.PathLike, *, seed: int = 0) -> str:
    """Save an open_clip architecture (a name or a config JSON) with random weights as a
    local checkpoint; return its path. The compute of the real model, arbitrary rankings:
    for benchmarks of the pipeline where nothing pretrained can be downloaded."""
    name = _register(arch)
    torch.manual_seed(seed)
    with _quiet_root_logger():  # random initialisation is the point here
        model = _open_clip().create_model(name, pretrained=None, pretrained_image=False,
                                          pretrained_text=False)
    torch.save(model.state_dict(), path)
    return str(path)
