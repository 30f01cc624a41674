"""Lens artifacts: a folder with ``lens.safetensors`` and ``config.json``.

``config.json`` follows the reference tuned-lens layout (``base_model_name_or_path``,
``base_model_revision``, ``d_model``, ``num_hidden_layers``, ``bias``, ``unembed_hash``,
``lens_type``) plus what this project needs: the lensed residual indices, the token offset, and a
manifest that covers every file: the size and sha256 of the weights file (``files``) and the
sha256 of the config itself (``config_sha256``, over its canonical JSON without that field). A
file cut short or edited (a reordered ``layers`` list would apply translators to the wrong layers)
is refused on load. Artifacts of format 1, whose manifest did not cover the config, load with a
warning that says how to seal them (``reseal``).

A lens names its model by an id (a Hub id, ``embedded:…``, or for a local folder the id it was
converted from or its name, never its path, with ``base_model_local``) and the fingerprint of its
unembedding; a loaded lens is bound to that fingerprint and refuses any other model (``Lens.bind``).

The folder is written next to its final place and renamed into it, so readers never see half an
artifact, and an earlier artifact at the same path stays intact until the new one is complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lenscope.errors import UserError
from lenscope.files import atomic_dir, atomic_write, recover_dir
from lenscope.lenses.hub import (
    is_hub_ref,
    is_local_path,
    is_model_id,
    local_model_name,
    pull_lens,
)
from lenscope.lenses.learned_prompt import LearnedPromptLens  # noqa: F401 (registers its lens type)
from lenscope.lenses.lens import LENS_TYPES, Lens
from lenscope.lenses.tuned_lens_format import check_hash, is_tuned_lens_folder, read_tuned_lens

if TYPE_CHECKING:
    from lenscope.model.frozen import FrozenModel

WEIGHTS = "lens.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 2
"""2: the manifest covers config.json too (``config_sha256``); 1: only the weights file."""
SEAL = "config_sha256"


class LensArtifactError(UserError):
    """An artifact is missing, damaged, or was made for another model."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_sha256(config: dict) -> str:
    """sha256 of the config's canonical JSON (sorted keys, no spaces) without its own seal: what the
    manifest records, unchanged by re-indenting the file but by any edit of a value."""
    # NaN is written as the file writes it (a held-out score may be one): the seal never stops a save.
    canonical = json.dumps({k: v for k, v in config.items() if k != SEAL}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def sealed(config: dict) -> dict:
    """``config`` at the current format, with the seal over its content."""
    config = {"format_version": FORMAT_VERSION, **{k: v for k, v in config.items() if k not in ("format_version", SEAL)}}
    return {**config, SEAL: config_sha256(config)}


def _write_config(folder: Path, config: dict) -> None:
    (folder / CONFIG).write_text(json.dumps(sealed(config), indent=2) + "\n")


def save_lens(lens: Lens, path: str | Path, *, base_model: str, revision: str, unembed_hash: str,
              num_hidden_layers: int, extra: dict | None = None) -> Path:
    """Write ``lens`` to the folder ``path`` atomically. Returns the path."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in lens.state_dict().items()}
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise LensArtifactError(f"refusing to write {path}: the lens's {', '.join(bad)} contain NaN or inf "
                                "(training diverged); lower the learning rate and train again")
    local_name = local_model_name(base_model)  # a lens may be shared: it never holds the user's paths
    with atomic_dir(path) as tmp:
        if tensors:
            save_file(tensors, tmp / WEIGHTS)
        config = {
            "lens_type": lens.lens_type,
            "base_model_name_or_path": local_name or base_model,
            "base_model_local": local_name is not None,
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
        _write_config(tmp, config)
    return Path(path)


def _local_folder(path: str | Path) -> Path:
    """The folder of a lens: a Hub lens's in the Hugging Face cache; a local one after recovering
    what a killed replace of it left (``recover_dir``: the complete new artifact is put in place)."""
    if is_hub_ref(path):
        return pull_lens(path)
    recover_dir(path)
    return Path(path)


def read_config(path: str | Path) -> dict:
    path = _local_folder(path)
    if path.is_file():
        what = "a training checkpoint" if path.suffix == ".ckpt" else "a file"
        raise LensArtifactError(f"{path} is {what}, not a lens artifact; pass the artifact folder `lenscope train` writes "
                                "(e.g. artifacts/quickstart/tuned)")
    if not (path / CONFIG).is_file():
        raise LensArtifactError(f"{path} is not a lens artifact (no {CONFIG}); pass the folder `lenscope train` writes")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise LensArtifactError(f"{path / CONFIG} is not valid JSON ({reason}); the artifact is damaged, retrain or re-copy it") from None
    if not isinstance(config, dict):
        raise LensArtifactError(f"{path / CONFIG} holds a JSON {type(config).__name__}, not an object; the artifact is "
                                "damaged, retrain or re-copy it")
    return config


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_config(path: Path, config: dict) -> None:
    """Every field the lens is built from has the right type and range, or one line says which does not."""
    def damaged(what: str) -> LensArtifactError:
        return LensArtifactError(f"{path / CONFIG}: {what}; the artifact is damaged, retrain or re-copy it")

    for key in ("lens_type", "d_model", "num_hidden_layers", "layers"):
        if key not in config:
            raise damaged(f"no {key!r}")
    if config["lens_type"] not in LENS_TYPES:
        raise LensArtifactError(f"{path}: unknown lens type {config['lens_type']!r}; known types: {sorted(LENS_TYPES)}")
    if not _is_int(config["d_model"], 1):
        raise damaged(f"'d_model' must be a positive integer, not {config['d_model']!r}")
    if not _is_int(config["num_hidden_layers"], 1):
        raise damaged(f"'num_hidden_layers' must be a positive integer, not {config['num_hidden_layers']!r}")
    layers = config["layers"]
    if (not isinstance(layers, list) or not layers or not all(_is_int(x, 0) for x in layers)
            or len(set(layers)) != len(layers) or max(layers) > config["num_hidden_layers"]):
        raise damaged(f"'layers' must be distinct residual indices 0..{config['num_hidden_layers']}, not {layers!r}")
    for key, low in (("offset", 0), ("prompt_length", 1)):
        if key in config and not _is_int(config[key], low):
            raise damaged(f"{key!r} must be an integer >= {low}, not {config[key]!r}")
    if "bias" in config and not isinstance(config["bias"], bool):
        raise damaged(f"'bias' must be true or false, not {config['bias']!r}")
    files = config.get("files", {})
    entry = files.get(WEIGHTS) if isinstance(files, dict) else None
    if not isinstance(files, dict) or (entry is not None and not (
            isinstance(entry, dict) and _is_int(entry.get("bytes"), 0) and isinstance(entry.get("sha256"), str))):
        raise damaged(f"'files' must map {WEIGHTS} to its bytes and sha256")


def _check_seal(path: Path, config: dict) -> None:
    """The config is the one its manifest covers, or one line says it was edited. A format-1 artifact
    (no seal) loads with a warning that says how to seal it."""
    version = config.get("format_version")
    if version == 1:
        warnings.warn(f"{path} is a lens artifact of format 1, whose manifest does not cover {CONFIG} (an edit of "
                      f"it would go unnoticed); seal it once with lenscope.lenses.artifact.reseal({str(path)!r})",
                      UserWarning, stacklevel=3)
        return
    if not _is_int(version, 1) or version > FORMAT_VERSION:
        raise LensArtifactError(f"{path / CONFIG} has format_version {version!r}, which this lenscope does not read "
                                f"(it reads 1..{FORMAT_VERSION}); upgrade lenscope, or retrain or re-copy the artifact")
    if config.get(SEAL) != config_sha256(config):
        raise LensArtifactError(f"{path / CONFIG} does not match its manifest ({SEAL}): it was edited after it was "
                                "written (e.g. 'layers' reordered); retrain or re-copy the artifact")


def reseal(path: str | Path) -> Path:
    """Bring a format-1 artifact to the current format: check its weights against their manifest and
    write its config sealed, in place (atomically). Returns the path."""
    path = Path(path)
    config = read_config(path)
    if config.get("format_version") != 1:
        raise LensArtifactError(f"{path} is not a format-1 lens artifact; only those need sealing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_lens(path)  # the weights match their manifest and the config
    atomic_write(path / CONFIG, json.dumps(sealed(config), indent=2) + "\n")
    return path


def model_named_by(path: str | Path) -> str:
    """The model a lens artifact names, to load when the user named none: a Hub id or
    ``embedded:…``. A lens never makes lenscope open a local path: a lens that names one (or names a
    model by a local folder's name) is refused in one line asking for the model (``--model``)."""
    path = _local_folder(path)
    config = read_config(path)
    if not is_tuned_lens_folder(path):
        _check_seal(path, config)
    name = config.get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        raise LensArtifactError(f"{path} does not name the model it was trained on; pass the model (--model)")
    if config.get("base_model_local") is True or is_local_path(name) or not is_model_id(name):
        raise LensArtifactError(f"{path} was trained on a local model ({name!r}), which lenscope does not open on a "
                                "lens's word; pass the model explicitly (--model PATH_OR_ID)")
    return name


def load_lens(path: str | Path, model: FrozenModel | None = None, *, unembed_hash: str | None = None,
              num_hidden_layers: int | None = None, map_location: str | torch.device = "cpu") -> Lens:
    """Load a lens artifact in one call: ``load_lens("artifacts/quickstart/tuned", model)``. A folder
    in the tuned-lens format (``config.json`` + ``params.pt``) is read too, and so is a lens on the
    Hugging Face Hub: ``load_lens("hub:AlignmentResearch/tuned-lens:lens/gpt2", model)`` (see
    :mod:`lenscope.lenses.hub`; revisions are pinned with ``hub:owner/name@rev:folder``).

    Given the model it will be used with (or that model's ``unembed_hash`` / ``num_hidden_layers``),
    a lens made for another model is refused with a message that says which, and the lens is put on
    the model's device. A damaged artifact (config of the wrong shape, weights that do not match
    their manifest or their config, NaN or inf weights) is refused too.
    """
    if model is not None:
        unembed_hash, num_hidden_layers, map_location = model.unembed_hash, model.num_layers, model.device
    path = _local_folder(path)
    if is_tuned_lens_folder(path):  # the reference's format (config.json + params.pt)
        lens, info = read_tuned_lens(path, LensArtifactError)
        trained_for = info["base_model_name_or_path"]
        if num_hidden_layers is not None and lens.num_layers != num_hidden_layers:
            raise LensArtifactError(f"{path} (tuned-lens format, for {trained_for!r}) has {lens.num_layers} translators "
                                    f"but this model has {num_hidden_layers} layers; use a lens trained on this model")
        if model is not None and lens.d_model != model.d_model:
            raise LensArtifactError(f"{path} (tuned-lens format, for {trained_for!r}) has width {lens.d_model} but this "
                                    f"model's residual stream has {model.d_model}; use a lens trained on this model")
        # No lenscope fingerprint to bind it by: the first model it is used with (this one, if given)
        # is checked by tuned-lens's own, which only warns, as tuned-lens does.
        lens.made_for, lens.check_first_model = trained_for, functools.partial(check_hash, path, info)
        if model is not None:
            lens.bind(model)
        return lens.to(map_location)
    config = read_config(path)
    _check_config(path, config)
    lens_type = config["lens_type"]
    trained_for = config.get("base_model_name_or_path")
    if unembed_hash is not None and config.get("unembed_hash") != unembed_hash:
        raise LensArtifactError(
            f"{path} was trained for {trained_for!r} (unembedding {config.get('unembed_hash')}), not for this model "
            f"(unembedding {unembed_hash}); use a lens trained on this model"
        )
    if num_hidden_layers is not None and config["num_hidden_layers"] != num_hidden_layers:
        raise LensArtifactError(
            f"{path} has {config['num_hidden_layers']} layers but this model has {num_hidden_layers}; "
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
        try:
            state = load_file(weights, device=str(map_location))
        except (SafetensorError, OSError) as err:
            raise LensArtifactError(f"{weights} is damaged ({str(err).splitlines()[0]}); retrain or re-copy it") from None
        try:
            lens.load_state_dict(state)
        except RuntimeError as err:
            detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
            raise LensArtifactError(f"{weights} does not fit {path / CONFIG} (were 'layers' or 'd_model' edited?): "
                                    f"{detail}; retrain or re-copy the artifact") from None
        bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
        if bad:
            raise LensArtifactError(f"{weights} holds NaN or inf in {', '.join(bad)} (training diverged); retrain it")
    # Last, so that an edit the checks above name (a lens type, a layer count) is named as such.
    _check_seal(path, config)
    if not isinstance(config.get("unembed_hash"), str):
        raise LensArtifactError(f"{path / CONFIG} has no 'unembed_hash', so no model to bind the lens to; the artifact "
                                "is damaged, retrain or re-copy it")
    lens.unembed_hash, lens.made_for = config["unembed_hash"], trained_for
    return lens.to(map_location)
