"""Shared fixtures: tiny random models built from configs (no downloads), a word-level tokenizer,
and small JSON-lines corpora written on the fly."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny vocabularies gain nothing from compiling the loss kernel; the end-to-end tests on the real
# model run in subprocesses with compilation on.
os.environ.setdefault("LENSCOPE_COMPILE", "0")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One pytest worker per core (make test runs -n 2 on 2 cores): each worker, and every process it
    # starts, computes on one thread, so that workers do not fight over the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

SHARED_PILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "pile-sample.jsonl.zst"
WORDS = [f"w{i}" for i in range(200)]


TINY_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64)
"""Shape of the tiny random decoders the unit tests build (with their own vocabulary size)."""


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w0 … w199`` plus specials; ids 0-3 are specials."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def tiny_llama(seed: int = 0, layers: int = 3, d_model: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(WORDS) + 4,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                         tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).eval()
    # Guard against a misspelt config key silently giving a full-size model.
    assert sum(p.numel() for p in model.parameters()) < 200_000
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random LLaMA and its tokenizer saved as a Hugging Face folder."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    """A tiny random LLaMA of the same shape as ``tiny_model_dir``'s with other weights: a lens made
    for one fits the other, but means nothing there."""
    path = tmp_path_factory.mktemp("other-llama")
    tiny_llama(seed=1).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def other_model(other_model_dir):
    import lenscope

    return lenscope.load_model(str(other_model_dir))


def random_text(rng, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def write_corpus(path: Path, n_docs: int, seed: int = 0, words: tuple[int, int] = (20, 60)) -> Path:
    """A JSON-lines corpus of random word documents, each tagged with its id (``doc_<i>`` first word
    is avoided so tokenisation stays in-vocabulary: the id is in the ``id`` field)."""
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"id": i, "text": random_text(rng, rng.randint(*words))}) + "\n")
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.jsonl", 120)


ROOT = Path(__file__).resolve().parents[1]


def training_step(module, batch: dict) -> torch.Tensor:
    """The module's own ``training_step`` on one batch, outside a Trainer (its ``self.log`` calls
    then have nowhere to go, and Lightning says so; that warning is silenced here on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*self\.log.*")
        return module.training_step(iter([(batch, 0, 0)]))


def fit_args(out: Path, model_dir: Path, source: Path | str, *extra: str, steps: int = 4,
             checkpoint_every: int = 2, checkpoint: tuple[str, ...] = ()) -> list[str]:
    """``train.py fit`` on the debug preset with a ModelCheckpoint (``out/ckpt``, ``last.ckpt``)
    and the lens artifact writer (``out/out``): every output under ``out``. ``checkpoint`` adds
    arguments to the ModelCheckpoint entry; ``extra`` comes last and may override anything."""
    return [
        "fit", "--config", str(ROOT / "configs/debug/fast.yaml"), "--trainer.enable_progress_bar", "false",
        "--model.base.name", str(model_dir), "--data.source", str(source), "--data.seq_len", "16",
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
        "--trainer.default_root_dir", str(out / "runs"),
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={out / 'ckpt'}", "--trainer.callbacks.save_last=true",
        f"--trainer.callbacks.every_n_train_steps={checkpoint_every}", "--trainer.callbacks.save_top_k=0",
        *checkpoint,
        "--trainer.callbacks+=lenscope.training.callbacks.LensArtifactWriter", f"--trainer.callbacks.dirpath={out / 'out'}",
        *extra,
    ]


class WandbSpy:
    """What lenscope hands to W&B through its public API: every ``wandb.init`` call's arguments,
    every ``run.log`` payload, and the runs themselves (``run.summary``). W&B runs disabled
    (in-process, nothing written, no background service), so nothing depends on its files or timing."""

    def __init__(self):
        self.inits: list[dict] = []
        self.logged: list[dict] = []
        self.runs: list = []

    def keys(self) -> set[str]:
        return {key for payload in self.logged for key in payload}

    def last(self, key: str):
        return next(payload[key] for payload in reversed(self.logged) if key in payload)


@pytest.fixture
def wandb_spy(monkeypatch) -> WandbSpy:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "disabled")
    spy = WandbSpy()
    real_init = wandb.init

    def init(*args, **kwargs):
        spy.inits.append(dict(kwargs))
        run = real_init(*args, **{**kwargs, "mode": "disabled"})  # WandbLogger(offline=True) asks for "offline"
        real_log = run.log

        def log(data, *log_args, **log_kwargs):
            spy.logged.append(dict(data))
            return real_log(data, *log_args, **log_kwargs)

        run.log = log
        spy.runs.append(run)
        return run

    monkeypatch.setattr(wandb, "init", init)
    return spy


@pytest.fixture(scope="session")
def zygote():
    """Runs ``train.py`` / ``evaluate.py`` as processes of their own without re-importing the
    libraries each time (see tests/zygote.py): one per pytest worker."""
    from tests.zygote import Zygote

    z = Zygote({**os.environ, "LENSCOPE_COMPILE": "0", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"})
    yield z
    z.close()



def pytest_collection_modifyitems(config, items):
    """The longest tests first (the real model, then several processes, then the command line):
    under pytest-xdist the short unit tests then fill the gaps at the end, instead of a long test
    starting last while the other workers sit idle. The sort is stable: file order within a group."""
    def group(item) -> int:
        for rank, marker in enumerate(("slow", "distributed", "subprocess")):
            if item.get_closest_marker(marker):
                return rank
        return 3

    items.sort(key=group)
