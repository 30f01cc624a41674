"""A cache of the frozen model's residual streams, so that the model runs once per batch, ever.

Entries are keyed by the content of the batch (token ids, attention mask, read positions), so any
later identical batch — the next pass over the corpus, a second lens, a later run — is a hit,
however it was produced. Each entry holds, for the N read positions of one batch, the residual at
every block boundary, (num_layers + 1, N, d_model): the lensed layers plus the last block's raw
output, from which the target distribution is recomputed (one matmul, instead of storing N × vocab
log-probabilities).

Kinds:
* ``device``: tensors kept where the model runs (GPU memory on a GPU), up to ``max_bytes``;
* ``disk``: one safetensors shard per batch under ``directory``, written to a temporary file and
  renamed, so a crash or two writers at once never leave a half shard; a shard that does not load
  is rebuilt. ``manifest.json`` records what the cache was made from (model, revision,
  unembedding, dtype, data settings); opening it with other settings is refused;
* ``none``: run the model every time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lenscope.errors import ConfigError, UserError
from lenscope.files import atomic_path, atomic_write

log = logging.getLogger(__name__)

KINDS = ("device", "disk", "none")


class CacheMismatchError(UserError):
    """An on-disk cache was made with other settings than the current run."""


def batch_key(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


class HiddenStateCache:
    def __init__(self, kind: str = "device", directory: str | Path | None = None,
                 manifest: dict | None = None, max_bytes: int = 8 << 30, dtype: torch.dtype | None = None):
        if kind not in KINDS:
            raise ConfigError(f"--model.cache must be one of {KINDS}, got {kind!r}")
        if kind == "disk" and directory is None:
            raise ConfigError("--model.cache disk needs --model.cache_dir")
        self.kind = kind
        self.max_bytes = max_bytes
        self.dtype = dtype
        self.memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        self.stored_bytes = 0
        self.stored_tokens = 0
        self.full = False
        self.directory = Path(directory) if directory is not None else None
        if kind == "disk":
            self._open_directory(manifest or {})

    def _open_directory(self, manifest: dict) -> None:
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "manifest.json"
        wanted = json.loads(json.dumps(manifest, sort_keys=True, default=str))
        if not path.exists():
            try:
                atomic_write(path, json.dumps(wanted, indent=2, sort_keys=True) + "\n")
            except OSError as err:
                raise CacheMismatchError(f"cannot write the hidden-state cache at {self.directory} ({err.strerror}); pass another --model.cache_dir") from None
        try:
            found = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise CacheMismatchError(f"{path} is damaged; delete {self.directory} or pass another --model.cache_dir") from None
        if found != wanted:
            differing = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            raise CacheMismatchError(
                f"the hidden-state cache at {self.directory} was made with other settings ({', '.join(differing)} differ); "
                "pass another --model.cache_dir or delete that folder"
            )

    # --- lookups -------------------------------------------------------------------------------------
    def get(self, key: str, device: torch.device) -> torch.Tensor | None:
        if self.kind == "none":
            self.misses += 1
            return None
        found = self.memory.get(key)
        if found is None and self.kind == "disk":
            found = self._read_shard(key, device)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        return found.to(device)

    def _read_shard(self, key: str, device: torch.device) -> torch.Tensor | None:
        path = self.directory / f"{key}.safetensors"
        if not path.exists():
            return None
        try:
            return load_file(path, device=str(device))["states"]
        except (SafetensorError, OSError, KeyError, RuntimeError) as err:
            warnings.warn(f"hidden-state cache shard {path} is damaged ({err}); rebuilding it", stacklevel=2)
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, states: torch.Tensor) -> None:
        """states: (num_layers + 1, N, d_model)."""
        if self.kind == "none":
            return
        if self.dtype is not None:
            states = states.to(self.dtype)
        size = states.numel() * states.element_size()
        if self.kind == "device":
            if self.stored_bytes + size > self.max_bytes:
                if not self.full:
                    log.warning("hidden-state cache is full (%.1f GiB); later batches run the model", self.stored_bytes / 2**30)
                self.full = True
                return
            self.memory[key] = states.detach()
        else:
            self._write_shard(key, states)
        self.stored_bytes += size
        self.stored_tokens += states.shape[1]

    def _write_shard(self, key: str, states: torch.Tensor) -> None:
        path = self.directory / f"{key}.safetensors"
        if path.exists():
            return
        try:
            with atomic_path(path, durable=False) as tmp:  # a lost shard is rebuilt
                save_file({"states": states.detach().to("cpu").contiguous()}, tmp)
        except OSError as err:
            raise OSError(err.errno, f"could not write the hidden-state cache at {self.directory} ({err.strerror}); "
                          "free disk space or pass another --model.cache_dir") from None

    # --- reporting -----------------------------------------------------------------------------------
    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.stored_bytes / self.stored_tokens if self.stored_tokens else 0.0
