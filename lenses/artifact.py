"""Lens artifacts: a folder with ``lens.safetensors`` and ``config.json``.

``config.json`` follows the reference tuned-lens layout (``base_model_name_or_path``,
``base_model_revision``, ``d_model``, ``num_hidden_layers``, ``bias``, ``unembed_hash``,
``lens_type``) plus what this project needs: the lensed residual indices, the token offset, and a
manifest with the size and sha256 of the weights file so that a file cut short is refused on load.

The folder is written next to its final place and renamed into it, so readers never see half an
artifact, and an earlier artifact at the same path stays intact until the new one is complete.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lenses.errors import UserError
from lenses.files import atomic_dir
from lenses.learned_prompt import LearnedPromptLens  # noqa: F401 (registers its lens type)
from lenses.lens import LENS_TYPES, Lens

WEIGHTS = "lens.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 1


class LensArtifactError(UserError):
    """An artifact is missing, damaged, or was made for another model."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_lens(lens: Lens, path: str | Path, *, base_model: str, revision: str, unembed_hash: str,
              num_hidden_layers: int, extra: dict | None = None) -> Path:
    """Write ``lens`` to the folder ``path`` atomically. Returns the path."""
    with atomic_dir(path) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in lens.state_dict().items()}
        if tensors:
            save_file(tensors, tmp / WEIGHTS)
        config = {
            "format_version": FORMAT_VERSION,
            "lens_type": lens.lens_type,
            "base_model_name_or_path": base_model,
            "base_model_revision": revision,
            "unembed_hash": unembed_hash,
            "d_model": lens.d_model,
            "num_hidden_layers": num_hidden_layers,
            "layers": lens.layers,
            **lens.extra_config(),
            **(extra or {}),
            "files": {WEIGHTS: {"bytes": (tmp / WEIGHTS).stat().st_size, "sha256": _sha256(tmp / WEIGHTS)}}
            if tensors else {},
        }
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(path)


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise LensArtifactError(f"{path} is not a lens artifact (no {CONFIG}); pass the folder written by train.py")
    try:
        return json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise LensArtifactError(f"{path / CONFIG} is not valid JSON ({err.msg}); the artifact is damaged, retrain or re-copy it") from None


def load_lens(path: str | Path, *, unembed_hash: str | None = None, num_hidden_layers: int | None = None,
              map_location: str | torch.device = "cpu") -> Lens:
    """Load a lens artifact in one call.

    With ``unembed_hash`` / ``num_hidden_layers`` of the model at hand, a lens made for another
    model is refused with a message that says which.
    """
    path = Path(path)
    config = read_config(path)
    lens_type = config.get("lens_type")
    if lens_type not in LENS_TYPES:
        raise LensArtifactError(f"{path}: unknown lens type {lens_type!r}; known types: {sorted(LENS_TYPES)}")
    model = config.get("base_model_name_or_path")
    if unembed_hash is not None and config.get("unembed_hash") != unembed_hash:
        raise LensArtifactError(
            f"{path} was trained for {model!r} (unembedding {config.get('unembed_hash')}), not for this model "
            f"(unembedding {unembed_hash}); use a lens trained on this model"
        )
    if num_hidden_layers is not None and config.get("num_hidden_layers") != num_hidden_layers:
        raise LensArtifactError(
            f"{path} has {config.get('num_hidden_layers')} layers but this model has {num_hidden_layers}; "
            "use a lens trained on this model"
        )
    cls = LENS_TYPES[lens_type]
    kwargs = {k: config[k] for k in ("bias", "offset", "prompt_length") if k in config and lens_type != "logit"}
    lens = cls(layers=config["layers"], d_model=config["d_model"], **kwargs)
    files = config.get("files", {})
    if WEIGHTS not in files and lens.state_dict():
        raise LensArtifactError(f"{path / CONFIG} lists no {WEIGHTS} for a {lens_type} lens; the artifact is damaged, retrain or re-copy it")
    if WEIGHTS in files:
        weights = path / WEIGHTS
        if not weights.is_file():
            raise LensArtifactError(f"{path} has no {WEIGHTS}; the artifact is incomplete, retrain or re-copy it")
        expected = files[WEIGHTS]
        if weights.stat().st_size != expected["bytes"] or _sha256(weights) != expected["sha256"]:
            raise LensArtifactError(f"{weights} does not match its manifest (cut short or modified); retrain or re-copy it")
        lens.load_state_dict(load_file(weights, device=str(map_location)))
    return lens.to(map_location)
