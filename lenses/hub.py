"""Lenses on the Hugging Face Hub, both ways, through ``huggingface_hub``'s public API.

A lens on the Hub is named ``hub:<repo>[@<revision>][:<folder>]``:

* ``hub:AlignmentResearch/tuned-lens:lens/EleutherAI/pythia-160m`` — a folder of a repository;
  the repository is looked for as a model repo, then as a Space (the tuned-lens lenses live in a
  Space);
* ``hub:spaces/AlignmentResearch/tuned-lens:lens/gpt2`` or ``hub:models/...`` / ``hub:datasets/...``
  name the kind of repository;
* ``hub:me/smollm2-lenses@3f2a9c1:tuned`` pins a revision (commit, branch or tag).

Either format may be at that place: a lenscope artifact (``config.json`` + ``lens.safetensors``)
or a tuned-lens folder (``config.json`` + ``params.pt``). Files go through the Hugging Face cache
(``HF_HUB_CACHE``); with ``HF_HUB_OFFLINE=1`` nothing is fetched and the cache alone answers. Both
variables are read when a lens is pulled, not when ``huggingface_hub`` was imported.

``push_lens`` uploads an artifact folder with a generated model card (base model and revision,
training data, tokens seen, per-layer held-out KL) in one commit. What is uploaded identifies the
lens and never a local path (``public_config``): a base model that was a local folder is named by
the id it was converted from or the folder's name, a training corpus by its file name. It is a
thin call of ``HfApi.create_commit``; it needs a token (``hf auth login``) and a network.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lenscope.errors import UserError, one_line

PREFIX = "hub:"
CONFIG = "config.json"
LENSCOPE_WEIGHTS = "lens.safetensors"
TUNED_LENS_PARAMS = "params.pt"
README = "README.md"
_REPO_TYPES = {"models": "model", "spaces": "space", "datasets": "dataset"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # owner/name
# Where a model named by lenscope comes from on the Hub, for the card's ``base_model``.
_HUB_ORIGIN = {"embedded:smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


_MODEL_ID = re.compile(r"^(embedded:[\w.-]+|[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?)$")  # a Hub id or embedded:…


def is_model_id(name: object) -> bool:
    """``name`` has the shape of a model id (``owner/name``, a legacy ``gpt2``, ``embedded:…``)."""
    return isinstance(name, str) and bool(_MODEL_ID.match(name)) and ".." not in name


def is_local_path(name: object) -> bool:
    """``name`` is a path on this machine: absolute, ``~``, ``./`` or ``../``, anything not shaped
    like a model id that has a separator, or anything that exists here (a folder ``gpt2`` would be
    opened instead of the Hub's ``gpt2``). A ``hub:`` reference (a streamed dataset, a Hub lens)
    names the Hub, not this machine."""
    if not isinstance(name, str) or not name or name.startswith("hub:"):
        return False
    if name.startswith(("/", "~", "./", "../", "\\")) or Path(name).is_absolute():
        return True
    if not is_model_id(name) and ("/" in name or os.sep in name):
        return True
    try:
        return Path(name).exists()
    except OSError:  # a name too long to be a path
        return False


def local_model_name(name: str) -> str | None:
    """What a model named by a local path is called in a lens: the Hub id its folder was converted
    from (``_name_or_path`` of its config) when that is one, else the folder's name. None when
    ``name`` is not a local path (a Hub id or ``embedded:…``)."""
    if not is_local_path(name):
        return None
    folder = Path(name).expanduser()
    try:
        origin = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        origin = None
    return origin if isinstance(origin, str) and is_model_id(origin) else folder.resolve().name


def model_id(name: str) -> str:
    """How a lens names the model ``name``: as given for a Hub id or ``embedded:…``, by
    ``local_model_name`` for a local folder (a lens may be shared: it never holds the user's paths)."""
    return local_model_name(name) or name


class HubError(UserError):
    """A lens could not be pulled from or pushed to the Hub."""


@dataclass(frozen=True)
class HubRef:
    """Where a lens lives on the Hub. ``repo_type`` None: a model repo, else a Space."""

    repo_id: str
    repo_type: str | None = None
    revision: str | None = None
    folder: str = ""

    def __str__(self) -> str:
        kind = next((f"{plural}/" for plural, kind in _REPO_TYPES.items() if kind == self.repo_type), "")
        rev = f"@{self.revision}" if self.revision else ""
        return f"{PREFIX}{kind}{self.repo_id}{rev}" + (f":{self.folder}" if self.folder else "")


def is_hub_ref(path: object) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def parse_hub_ref(ref: str) -> HubRef:
    """``hub:[spaces/]owner/name[@revision][:folder]`` → :class:`HubRef`; one line if malformed."""
    usage = ("write a Hub lens as hub:<owner>/<repo>[@<revision>][:<folder>], e.g. "
             "hub:AlignmentResearch/tuned-lens:lens/EleutherAI/pythia-160m")
    if not is_hub_ref(ref):
        raise HubError(f"{ref!r} is not a Hub lens name; {usage}")
    body = ref[len(PREFIX):]
    repo, _, folder = body.partition(":")
    repo, _, revision = repo.partition("@")
    repo_type = None
    head, _, tail = repo.partition("/")
    if head in _REPO_TYPES and tail.count("/") == 1:
        repo_type, repo = _REPO_TYPES[head], tail
    folder = folder.strip("/")
    if not _REPO_ID.match(repo):
        raise HubError(f"{ref!r}: {repo!r} is not a repository id (owner/name); {usage}")
    if "@" in body.partition(":")[0] and not revision:
        raise HubError(f"{ref!r}: nothing after '@'; give a commit, branch or tag, or leave out the '@'")
    if any(part in ("", ".", "..") for part in PurePosixPath(folder).parts) and folder:
        raise HubError(f"{ref!r}: the folder {folder!r} must be a plain path inside the repository")
    return HubRef(repo, repo_type, revision or None, folder)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_settings() -> dict:
    """``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` as they are now (huggingface_hub reads them on import)."""
    from huggingface_hub import constants

    offline = (_truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))
               or constants.HF_HUB_OFFLINE)
    return {"local_files_only": offline, "cache_dir": os.environ.get("HF_HUB_CACHE") or None}


def _download(ref: HubRef, repo_type: str, filename: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(ref.repo_id, filename, subfolder=ref.folder or None, repo_type=repo_type,
                                revision=revision, **_hub_settings()))


def pull_lens(ref: str | HubRef) -> Path:
    """The local folder (in the Hugging Face cache) holding the lens ``ref`` names, fetched if need be."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    ref = parse_hub_ref(ref) if isinstance(ref, str) else ref
    where = f"{ref.folder!r} of " if ref.folder else ""
    failures = []
    for repo_type in ([ref.repo_type] if ref.repo_type else ["model", "space"]):
        try:
            config = _download(ref, repo_type, CONFIG, ref.revision)
            break
        except (RepositoryNotFoundError, LocalEntryNotFoundError) as err:
            failures.append(err)
        except RevisionNotFoundError:
            raise HubError(f"{ref}: {ref.repo_id} has no revision {ref.revision!r}; give a commit, branch or tag "
                           "that exists") from None
        except EntryNotFoundError:
            raise HubError(f"{ref}: no {CONFIG} in {where}{repo_type} repo {ref.repo_id}, so no lens there; check "
                           "the folder after ':'") from None
        except OSError as err:
            raise HubError(f"{ref}: could not fetch it ({one_line(err)}); check the network or set HF_HUB_OFFLINE=1 "
                           "to use the cache") from None
    else:
        kinds = "a " + ref.repo_type if ref.repo_type else "a model repo or a Space"
        settings = _hub_settings()
        if settings["local_files_only"] or all(isinstance(err, LocalEntryNotFoundError) for err in failures):
            why = "HF_HUB_OFFLINE is set" if settings["local_files_only"] else "the Hub could not be reached"
            raise HubError(f"{ref} is not in the Hugging Face cache ({settings['cache_dir'] or 'the default'}) and "
                           f"{why}; pull it once with a network (unset HF_HUB_OFFLINE) or point HF_HUB_CACHE at a "
                           "cache that has it") from None
        raise HubError(f"{ref}: no {kinds} {ref.repo_id} on the Hub (or it is private: log in with `hf auth login`); "
                       "check the name (a Space can be named hub:spaces/<owner>/<name>)") from None
    folder = config.parent
    # The other files at the commit the config came from (a branch may move between two requests).
    commit = folder.parents[len(PurePosixPath(ref.folder).parts) - 1].name if ref.folder else folder.name
    for name in _weights_of(config):
        try:
            _download(ref, repo_type, name, commit if re.fullmatch(r"[0-9a-f]{40}", commit) else ref.revision)
        except (EntryNotFoundError, LocalEntryNotFoundError):
            raise HubError(f"{ref}: {where}{ref.repo_id} has {CONFIG} but no {name} (in the cache, when offline); "
                           "the lens there is incomplete or was never fully downloaded") from None
    return folder


def _weights_of(config_path: Path) -> list[str]:
    """The files a lens folder needs besides its config: a lenscope artifact's weights file (unless
    its manifest lists none: a lens without parameters); a tuned-lens folder's ``params.pt``. Only
    those names: the manifest's keys are chosen by whoever wrote the config (its seal is a checksum,
    not a signature), and a key such as ``/home/me/.ssh/id_rsa`` would be uploaded by a push."""
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return []  # load_lens says what is wrong with it
    if isinstance(config, dict) and "format_version" in config:
        files = config.get("files")
        return [LENSCOPE_WEIGHTS] if not isinstance(files, dict) or LENSCOPE_WEIGHTS in files else []
    return [TUNED_LENS_PARAMS]


# --- push ------------------------------------------------------------------------------------------

def _warm_start(config: dict) -> str:
    batches = config.get("warm_start_batches")
    if not isinstance(batches, int):
        return "not recorded"
    return f"on the first {batches} batches, before the optimizer steps" if batches else "none (the steps started elsewhere)"


def _without_local_paths(value):
    """``value`` (a config's JSON) with every string that is a path on this machine cut to its last
    part: a training corpus ``/home/me/data/pile.jsonl.zst`` is published as ``pile.jsonl.zst``."""
    if isinstance(value, dict):
        return {k: _without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(v) for v in value]
    if isinstance(value, str) and is_local_path(value):
        return Path(value).expanduser().name
    return value


def public_config(config: dict) -> dict:
    """What of a lens's config is published: what identifies the lens (model id, revision,
    unembedding fingerprint, recipe), never a local path. A base model given as a local folder is
    named as ``local_model_name`` says (the id it was converted from, or the folder's name); a
    lenscope config is sealed again over what is published (format 1 is published sealed)."""
    base = config.get("base_model_name_or_path")
    local = local_model_name(base) if isinstance(base, str) else None
    public = _without_local_paths(config)
    if local is not None:
        public["base_model_name_or_path"] = local
        if "format_version" in config:
            public["base_model_local"] = True
    if "format_version" in config:
        from lenscope.lenses.artifact import sealed

        public = sealed(public)
    return public


def _local_base(config: dict) -> bool:
    return config.get("base_model_local") is True or not is_model_id(config.get("base_model_name_or_path"))


def model_card(folder: str | Path, repo_id: str, path_in_repo: str = "") -> str:
    """A Hub model card (README.md with YAML metadata) for the lens artifact in ``folder``: what it
    is, how to load it, what it was trained on and its held-out KL per layer. It says what
    ``public_config`` publishes: no local path."""
    from huggingface_hub import ModelCardData

    from lenscope.lenses.artifact import read_config
    from lenscope.lenses.metrics import per_layer_table

    config = public_config(read_config(folder))
    base = config.get("base_model_name_or_path", "unknown")
    revision = config.get("base_model_revision", "unknown")
    kind = config.get("lens_type", "tuned")
    local = _local_base(config)
    origin = _HUB_ORIGIN.get(base, base if _REPO_ID.match(str(base)) else None)
    metadata = ModelCardData(library_name="lenscope", base_model=origin,
                             tags=["lenscope", "interpretability", f"{kind}-lens", "logit-lens"])
    name = f"hub:{repo_id}" + (f":{path_in_repo}" if path_in_repo else "")
    data = config.get("training_data") or {}
    data_text = ", ".join(f"{k} {v}" for k, v in data.items()) if data else "not recorded"
    tokens = config.get("tokens_seen")
    layers, total = config.get("layers") or [], config.get("num_hidden_layers")
    rows = [
        ("lens", f"{kind}" + (f" (predicts the token {config['offset']} ahead)" if config.get("offset") else "")),
        ("base model", f"`{base}`" + (" (a local copy)" if local else "")
         + (f" (from [{origin}](https://huggingface.co/{origin}))" if origin and origin != base else "")),
        ("base model revision", f"`{revision}`"),
        ("unembedding fingerprint", f"`{config.get('unembed_hash', 'unknown')}`"),
        ("residuals lensed", f"{len(layers)} of {total + 1}" if isinstance(total, int) else str(len(layers))),
        ("training data", data_text),
        ("tokens seen", f"{tokens:,}" if isinstance(tokens, int) else "not recorded"),
        ("optimizer steps", str(config.get("trained_steps", "not recorded"))),
        ("least-squares warm start", _warm_start(config)),
    ]
    lines = [
        "---", metadata.to_yaml(), "---", "",
        f"# {kind.capitalize()} lens for {base}", "",
        "Per-layer maps from the residual stream of the base model to its vocabulary, trained with "
        "lenscope: at every layer, what the model would predict if it stopped there.", "",
        "```python", "import lenscope",
        f'model = lenscope.load_model("path/to/{base}")  # the local model the lens was trained on' if local
        else f'model = lenscope.load_model("{base}")',
        f'lens = lenscope.load_lens("{name}", model)',
        'print(lens.trajectory(model, "The capital of France is"))', "```", "",
        "## Training", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
    ]
    held_out = config.get("held_out")
    if isinstance(held_out, dict) and held_out.get("kl_bits"):
        lines += [f"## Held-out KL per layer (step {held_out.get('step', '?')})", "",
                  "KL(model ‖ lens) and cross-entropy against the real next token, in bits per token, on documents "
                  "held out from training.", "",
                  per_layer_table(layers, {"KL (bits)": held_out["kl_bits"],
                                           "CE (bits)": held_out.get("ce_bits") or [None] * len(layers)}),
                  ""]
    return "\n".join(lines)


def push_lens(folder: str | Path, repo_id: str, *, path_in_repo: str = "", revision: str | None = None,
              private: bool | None = None, token: str | None = None, commit_message: str | None = None) -> str:
    """Upload the lens artifact in ``folder`` to ``repo_id`` (created if missing) under
    ``path_in_repo``, with a generated model card, in one commit. Returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from lenscope.lenses.artifact import load_lens

    if not _REPO_ID.match(repo_id):
        raise HubError(f"{repo_id!r} is not a repository id; give owner/name, e.g. me/smollm2-lenses")
    folder = Path(folder)
    load_lens(folder)  # refuse to publish a damaged artifact
    prefix = path_in_repo.strip("/")
    target = lambda name: f"{prefix}/{name}" if prefix else name  # noqa: E731
    # Only the lens's own files: its config as published (no local path) and the weights it lists.
    config = public_config(json.loads((folder / CONFIG).read_text()))
    operations = [CommitOperationAdd(target(CONFIG), (json.dumps(config, indent=2) + "\n").encode())]
    operations += [CommitOperationAdd(target(name), str(folder / name)) for name in _weights_of(folder / CONFIG)]
    operations.append(CommitOperationAdd(target(README), model_card(folder, repo_id, prefix).encode()))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.create_commit(repo_id, operations, revision=revision,
                                 commit_message=commit_message or f"lenscope: upload the lens {folder.name}")
    except Exception as err:  # network, token, permission: every failure of the upload reads the same way
        raise HubError(f"could not push {folder} to {repo_id}: {one_line(err)}; log in with a write token "
                       "(`hf auth login`) and check the network") from None
    return info.commit_url
