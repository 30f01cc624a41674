"""The tuned-lens format (the reference implementation, ``tuned-lens`` 0.2; the lenses published in
the Hugging Face Space ``AlignmentResearch/tuned-lens`` under ``lens/<model id>/``), both ways.

A folder holds ``config.json`` and ``params.pt``: the state dict of the per-layer translators,
keys ``"{i}.weight"`` (d × d) and ``"{i}.bias"`` (d) for i = 0 … L − 1, each translator applied
residually, ``h + W h + b``, to the residual at index i (0 = the embeddings) — exactly lenscope's
``TunedLens``. Config shapes found in published lenses are all read:

* tuned-lens 0.2: ``base_model_name_or_path``, ``d_model``, ``num_hidden_layers``, ``bias``,
  ``base_model_revision``, ``unembed_hash``, ``lens_type`` (``linear_tuned_lens``);
* tuned-lens 0.1, which spelt the hash key ``unemebd_hash``;
* the legacy shape ``{bias, include_input, d_model, num_layers, vocab_size}`` of tuned-lens ≤ 0.0.5,
  whose ``params.pt`` is the whole module's state: ``input_translator.*`` (residual 0),
  ``layer_translators.{i}.*`` (residual i + 1), and a copy of the model's decoder
  (``unembedding.*``, ``layer_norm.*``), which is ignored: lenscope decodes with the model itself.
  (This mapping follows the tuned-lens ≤ 0.0.5 source; no such file was at hand to test.)

``params.pt`` is read with ``torch.load(weights_only=True)``: tensors only, never code. A lens in
this format is matched to a model by its number of layers and width, and by tuned-lens's own hash
of the unembedding where the config has one (a mismatch warns, as tuned-lens does).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lenscope.files import atomic_dir
from lenscope.lenses.hub import model_id
from lenscope.lenses.lens import TunedLens

if TYPE_CHECKING:
    from lenscope.model.frozen import FrozenModel

PARAMS = "params.pt"
CONFIG = "config.json"
TUNED_LENS_TYPE = "linear_tuned_lens"
_KEY = re.compile(r"^(\d+)\.(weight|bias)$")  # tuned-lens 0.1 and 0.2: translator i acts on residual i
_LEGACY_LAYER = re.compile(r"^layer_translators\.(\d+)\.(weight|bias)$")  # ≤ 0.0.5: residual i + 1
_LEGACY_INPUT = re.compile(r"^input_translator\.(weight|bias)$")  # ≤ 0.0.5: residual 0
_LEGACY_DECODER = re.compile(r"^(unembedding|layer_norm)\.")  # ≤ 0.0.5's copy of the model's decoder


def tuned_lens_hash(unembedding: torch.Tensor) -> str:
    """tuned-lens's fingerprint of an unembedding matrix (``tuned_lens.utils.tensor_hash``: sha256 of
    numpy's one-decimal summary of the float32 matrix), under numpy's default print options."""
    with np.printoptions(precision=1, threshold=1000, edgeitems=3, linewidth=75, suppress=False,
                         floatmode="maxprec", sign="-", legacy=False):
        text = np.array_str(unembedding.detach().to("cpu", torch.float32).numpy(), precision=1)
    return hashlib.sha256(text.encode()).hexdigest()


def is_tuned_lens_folder(path: str | Path) -> bool:
    """A folder in the tuned-lens format (``params.pt`` beside ``config.json``)."""
    path = Path(path)
    return path.is_dir() and (path / PARAMS).is_file()


def read_tuned_lens(path: str | Path, error: type[Exception]) -> tuple[TunedLens, dict]:
    """The lens in a tuned-lens folder and what its config says (``base_model_name_or_path``,
    ``num_hidden_layers``, ...). Anything malformed raises ``error`` with one line."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise error(f"{path} has {PARAMS} but no {CONFIG}; copy the whole tuned-lens folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise error(f"{path / CONFIG} is not valid JSON; re-download or re-copy the lens") from None
    if not isinstance(config, dict) or not isinstance(config.get("d_model"), int):
        raise error(f"{path / CONFIG} is not a tuned-lens config (no integer d_model); re-download or re-copy the lens")
    lens_type = config.get("lens_type", TUNED_LENS_TYPE)
    if lens_type != TUNED_LENS_TYPE:
        raise error(f"{path} holds a tuned-lens {lens_type!r}; lenscope reads the {TUNED_LENS_TYPE!r} kind")
    try:
        state = torch.load(path / PARAMS, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise error(f"{path / PARAMS} cannot be read as tensors ({first[:160]}); re-download or re-copy the lens") from None
    if not isinstance(state, dict):
        raise error(f"{path / PARAMS} is not a state dict of translators; re-download or re-copy the lens")
    weights, biases = {}, {}
    d = config["d_model"]
    for key, value in state.items():
        key = str(key)
        if _LEGACY_DECODER.match(key):
            continue
        if (match := _KEY.match(key)) is not None:
            index, kind = int(match[1]), match[2]
        elif (match := _LEGACY_LAYER.match(key)) is not None:
            index, kind = int(match[1]) + 1, match[2]
        elif (match := _LEGACY_INPUT.match(key)) is not None:
            index, kind = 0, match[1]
        else:
            match = None
        if match is None or not isinstance(value, torch.Tensor):
            raise error(f"{path / PARAMS} has an entry {key!r} that is not a translator's weight or bias")
        (weights if kind == "weight" else biases)[index] = value
    if weights and 0 not in weights and "num_layers" in config:  # legacy without include_input: residual 0 as is
        weights[0] = torch.zeros(d, d)
        if biases:
            biases[0] = torch.zeros(d)
    n = len(weights)
    if sorted(weights) != list(range(n)) or (biases and sorted(biases) != list(range(n))) or n == 0:
        raise error(f"{path / PARAMS} does not hold translators 0 … L-1 with a weight each; re-download or re-copy the lens")
    if any(w.shape != (d, d) for w in weights.values()) or any(b.shape != (d,) for b in biases.values()):
        raise error(f"{path / PARAMS} does not fit d_model {d} of {path / CONFIG}; re-download or re-copy the lens")
    lens = TunedLens(layers=list(range(n)), d_model=d, bias=bool(biases))
    with torch.no_grad():
        lens.weight.copy_(torch.stack([weights[i].float() for i in range(n)]))
        if biases:
            lens.bias.copy_(torch.stack([biases[i].float() for i in range(n)]))
    if not all(torch.isfinite(t).all() for t in lens.state_dict().values()):
        raise error(f"{path / PARAMS} holds NaN or inf; re-download or retrain the lens")
    info = {
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "base_model_revision": config.get("base_model_revision"),
        "num_hidden_layers": config.get("num_hidden_layers", config.get("num_layers")),
        "tuned_lens_unembed_hash": config.get("unembed_hash", config.get("unemebd_hash")),
    }
    return lens, info


def check_hash(path: Path, info: dict, model: FrozenModel) -> None:
    """Warn (as tuned-lens does) when the lens's config names another unembedding than the model's."""
    recorded = info.get("tuned_lens_unembed_hash")
    if recorded and recorded != tuned_lens_hash(model.adapter.unembedding_weight):
        warnings.warn(f"{path} was trained for {info.get('base_model_name_or_path')!r}, whose unembedding differs "
                      "from this model's (tuned-lens hash); its predictions here may be meaningless", stacklevel=3)


def save_tuned_lens(lens: TunedLens, path: str | Path, model: FrozenModel) -> Path:
    """Write ``lens`` (a tuned or least-squares affine lens of offset 0) as a tuned-lens folder that
    ``tuned_lens.TunedLens.from_model_and_pretrained`` loads. The bias is always written (zeros for
    a lens without one): tuned-lens 0.2 cannot build a translator without a bias."""
    if not isinstance(lens, TunedLens) or lens.offset != 0:
        raise ValueError("only a tuned or affine lens of offset 0 has a tuned-lens equivalent")
    if lens.layers != model.layers or lens.d_model != model.d_model:
        raise ValueError(f"the lens (layers {lens.layers[0]}..{lens.layers[-1]}, width {lens.d_model}) does not "
                         f"fit the model (layers 0..{model.num_layers - 1}, width {model.d_model})")
    state = {}
    for i in range(lens.num_layers):
        state[f"{i}.weight"] = lens.weight[i].detach().to("cpu", torch.float32).clone()
        bias = lens.bias[i] if lens.bias is not None else torch.zeros(lens.d_model)
        state[f"{i}.bias"] = bias.detach().to("cpu", torch.float32).clone()
    config = {
        "base_model_name_or_path": model_id(model.name),  # never a local path: the folder may be shared
        "d_model": lens.d_model,
        "num_hidden_layers": lens.num_layers,
        "bias": True,
        "base_model_revision": model.revision,
        "unembed_hash": tuned_lens_hash(model.adapter.unembedding_weight),
        "lens_type": TUNED_LENS_TYPE,
    }
    with atomic_dir(path) as tmp:
        torch.save(state, tmp / PARAMS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(path)
