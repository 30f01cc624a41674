"""Bad inputs through the real command line: one line ``error: …`` naming the problem, exit status 2,
no Python traceback. The catalogue of these inputs is docs/bad-inputs.md (keep the two in step).

Every case runs ``train.py fit`` in its own process, from a temporary working directory, with every
output path under ``tmp_path``, forked from the test zygote (tests/zygote.py: a process that
imported the libraries once; ``LENSCOPE_TEST_FRESH_CLI=1`` starts fresh interpreters instead). The
final-norm case needs to change the model's structure and runs in-process.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zstandard
from transformers import AutoModelForCausalLM, LlamaConfig

from lenscope.cli import train
from lenscope.lenses.artifact import LensArtifactError, save_lens
from lenscope.lenses.lens import TunedLens
from lenscope.model.loading import tensor_fingerprint
from tests.conftest import WORDS, make_tokenizer, tiny_llama, write_corpus
from tests.conftest import fit_args as cli_fit_args
from tests.zygote import Result

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.subprocess
TRAIN = ROOT / "train.py"
TIMEOUT_S = 300  # per run; a case that hangs (e.g. an endless run) fails instead of blocking the suite

def cli_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "LENSCOPE_COMPILE": "0", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
            "LENSCOPE_CACHE": str(tmp_path / "lenscope-cache")}


@pytest.fixture
def cli(zygote, tmp_path):
    """Run ``train.py <argv>`` from a fresh working directory under ``tmp_path``."""

    def run(*argv: str, env: dict[str, str] | None = None) -> Result:
        result = zygote.run(TRAIN, list(argv), tmp_path / "cwd", env or cli_env(tmp_path), timeout=TIMEOUT_S)
        assert not result.timed_out, f"train.py {' '.join(argv)} ran past {TIMEOUT_S} s"
        return result

    return run


def fit_args(tmp_path: Path, model_dir: Path, source: Path | str, *extra: str, steps: int = 2) -> list[str]:
    """``fit`` checkpointing every step and writing the lens artifact, all under ``tmp_path``."""
    return cli_fit_args(tmp_path, model_dir, source, *extra, steps=steps, checkpoint_every=1)


def assert_one_line_error(result: Result, expected: str) -> str:
    tail = f"\n--- stderr (tail) ---\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, tail
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected one 'error:' line, got {errors}{tail}"
    assert expected in errors[0], f"{expected!r} not in {errors[0]!r}{tail}"
    assert result.returncode == 2, f"exit status {result.returncode}{tail}"
    return errors[0]


def nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out" / "tuned").exists(), "a lens artifact was written"
    assert not list(tmp_path.rglob("*.ckpt")), "a checkpoint was written"


# --- inputs ------------------------------------------------------------------------------------------
def write_jsonl_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def good_line(i: int = 0) -> bytes:
    return json.dumps({"text": " ".join(WORDS[i:i + 30])}).encode()


def zst_corpus(tmp_path: Path) -> bytes:
    """A one-frame zstd corpus of ~60 kB compressed, so that half of it ends inside the frame."""
    plain = write_corpus(tmp_path / "big.jsonl", 1500, words=(40, 80))
    data = zstandard.ZstdCompressor().compress(plain.read_bytes())
    assert len(data) > 20_000
    return data


def bad_corpus(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / ("corpus.jsonl.zst" if kind.endswith("zst") else "corpus.jsonl")
    if kind == "empty":
        return write_jsonl_lines(path, [json.dumps({"text": t}).encode() for t in ("", "   ", "\n\t ", " ")])
    if kind == "corrupt-zst":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "truncated-zst":
        data = zst_corpus(tmp_path)
        path.write_bytes(data[: len(data) // 2])
    elif kind == "no-text-field":
        write_jsonl_lines(path, [good_line(0), json.dumps({"content": "w1 w2 w3"}).encode(), good_line(5)])
    elif kind == "non-string-text":
        write_jsonl_lines(path, [good_line(0), good_line(3), json.dumps({"text": ["w1", "w2"]}).encode()])
    elif kind == "invalid-utf8":
        write_jsonl_lines(path, [good_line(0), b'{"text": "w1 \xff\xfe w2"}', good_line(5)])
    elif kind == "all-bad-skipped":
        write_jsonl_lines(path, [b'{"content": "w1"}', b"not json", b'{"text": 7}', b"[1, 2]", b'{"text": "  "}'])
    else:  # pragma: no cover
        raise ValueError(kind)
    return path


DATA_CASES = [
    # (id, corpus kind or None for a good corpus, extra flags, expected substring of the error line)
    ("missing-data-path", "missing", [], "no data found at"),
    ("empty-corpus", "empty", [], "yields no train samples (skipped: {'empty text': 4})"),
    ("corrupt-zst", "corrupt-zst", [], "is not a valid zstd file"),
    ("truncated-zst", "truncated-zst", [], "is truncated (its last zstd frame is incomplete)"),
    ("record-without-text-field", "no-text-field", [], "corpus.jsonl:2: record has no 'text' field"),
    ("non-string-text", "non-string-text", [], "corpus.jsonl:3: 'text' is a list, not a string"),
    ("invalid-utf8", "invalid-utf8", [], "corpus.jsonl:2: line is not valid UTF-8"),
    ("all-records-bad-with-skip", "all-bad-skipped", ["--data.on_bad_record", "skip"],
     "yields no train samples (skipped: {"),
    ("unknown-bad-record-policy", None, ["--data.on_bad_record", "ignore"],
     "--data.on_bad_record must be 'error' or 'skip', got 'ignore'"),
    ("seq-len-beyond-context", None, ["--data.seq_len", "1000"],
     "--data.seq_len is 1000 but the model's context is 256"),
    ("unknown-data-mode", None, ["--data.mode", "sideways"], "--data.mode must be one of ('pack', 'trim'), got 'sideways'"),
    ("zero-batch-size", None, ["--data.batch_size", "0"], "--data.batch_size must be at least 1, got 0"),
    ("zero-max-steps", None, ["--trainer.max_steps", "0"], "--trainer.max_steps must be a positive number of steps, got 0"),
    # Lightning reads -1 as "no limit"; the training stream is endless, so that would never stop.
    ("max-steps-minus-one", None, ["--trainer.max_steps", "-1"],
     "--trainer.max_steps must be a positive number of steps, got -1"),
    ("negative-max-steps", None, ["--trainer.max_steps", "-5"], "--trainer.max_steps must be a positive number of steps, got -5"),
    ("zero-gradient-accumulation", None, ["--trainer.accumulate_grad_batches", "0"],
     "--trainer.accumulate_grad_batches must be a whole number of batches >= 1, got 0"),
    ("unknown-lens-type", None, ["--model.lens_type", "quantum"], "--model.lens_type 'quantum' is unknown"),
    ("unknown-model-dtype", None, ["--model.base.dtype", "float8"], "unknown dtype 'float8'"),
    ("fsdp-on-cpu", None, ["--config", str(ROOT / "configs/trainer/fsdp.yaml"), "--trainer.accelerator", "cpu"],
     "invalid --trainer setting: The strategy `fsdp` requires a GPU accelerator"),
]


@pytest.mark.parametrize(("kind", "extra", "expected"), [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data_or_setting(cli, tmp_path, tiny_model_dir, corpus, kind, extra, expected):
    if kind == "missing":
        source = tmp_path / "no-such-corpus.jsonl"
    else:
        source = bad_corpus(tmp_path, kind) if kind else corpus
    result = cli(*fit_args(tmp_path, tiny_model_dir, source, *extra))
    assert_one_line_error(result, expected)
    nothing_written(tmp_path)


# --- the base model --------------------------------------------------------------------------------
def test_model_folder_that_does_not_exist(cli, tmp_path, corpus):
    missing = tmp_path / "no-such-model"
    result = cli(*fit_args(tmp_path, missing, corpus))
    assert_one_line_error(result, f"model folder {missing} does not exist")
    nothing_written(tmp_path)


def test_model_folder_without_config(cli, tmp_path, tiny_model_dir, corpus):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name != "config.json":
            (folder / f.name).write_bytes(f.read_bytes())
    result = cli(*fit_args(tmp_path, folder, corpus))
    assert_one_line_error(result, f"model folder {folder} has no config.json")
    nothing_written(tmp_path)


def test_final_norm_that_cannot_be_found(tmp_path, tiny_model_dir, corpus, monkeypatch, capsys):
    """A model that applies its final norm as a plain function, not as a module: nothing runs between
    the last block and the head, so the adapter cannot find the norm. Runs in-process, because the
    model's structure is changed after loading."""
    import lenscope.model.frozen as frozen

    real_load = frozen.load_base_model

    def load_with_functional_norm(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        inner = loaded.model.model
        norm = inner._modules.pop("norm")
        inner.__dict__["norm"] = norm.forward  # still applied, but no module call the hooks can see
        return loaded

    monkeypatch.setattr(frozen, "load_base_model", load_with_functional_norm)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(TRAIN)])  # as if run from the command line
    with pytest.raises(SystemExit) as exit_:
        train.main(fit_args(tmp_path, tiny_model_dir, corpus))
    captured = capsys.readouterr()
    assert_one_line_error(Result(exit_.value.code, captured.out, captured.err),
                          "could not find the final norm of LlamaForCausalLM: no module runs between "
                          "its last decoder block (model.layers.2) and its unembedding (lm_head)")
    nothing_written(tmp_path)


def overflowing_llama_dir(path: Path) -> Path:
    """A tiny LLaMA whose hidden states overflow in fp16 after block 0 for ordinary words.

    The embeddings of the corpus words are 6e4 (just inside fp16's range, max 65504) and block 0's
    MLP adds a bias of 2e4, so the residual after block 0 is inf. The five tokens the architecture
    probe feeds the model keep small embeddings, so the model still loads.
    """
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(WORDS) + 4, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False, mlp_bias=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    probe_ids = {(i * 7 + 3) % config.vocab_size for i in range(5)}  # see lenscope.model.adapter._probe
    with torch.no_grad():
        rows = [i for i in range(4, config.vocab_size) if i not in probe_ids]
        model.model.embed_tokens.weight[rows] = 6e4
        model.model.layers[0].mlp.down_proj.bias.fill_(2e4)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_nan_or_inf_hidden_states(cli, tmp_path, corpus):
    model_dir = overflowing_llama_dir(tmp_path / "overflowing-llama")
    result = cli(*fit_args(tmp_path, model_dir, corpus, "--model.base.dtype", "float16"))
    assert_one_line_error(result, "hidden states contain NaN or inf at the output of block 0 (residual index 1)")
    nothing_written(tmp_path)


# --- lens artifacts passed as --model.init_lens ----------------------------------------------------------
def unembed_hash_of(model_dir: Path) -> str:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return tensor_fingerprint(model.get_output_embeddings().weight)


def artifact(path: Path, *, unembed_hash: str, layers: int = 3, base_model: str = "tiny") -> Path:
    return save_lens(TunedLens(list(range(layers)), 32), path, base_model=base_model, revision="local",
                     unembed_hash=unembed_hash, num_hidden_layers=layers)


@pytest.mark.parametrize("case", ["other-model", "wrong-layer-count", "missing-weights", "unknown-lens-type"])
def test_bad_init_lens(cli, tmp_path, tiny_model_dir, corpus, case):
    good_hash = unembed_hash_of(tiny_model_dir)
    lens_dir = tmp_path / "lens"
    if case == "other-model":
        other = tiny_llama(seed=1)
        artifact(lens_dir, unembed_hash=tensor_fingerprint(other.get_output_embeddings().weight), base_model="other-llama")
        expected = f"{lens_dir} was trained for 'other-llama'"
    elif case == "wrong-layer-count":
        artifact(lens_dir, unembed_hash=good_hash, layers=5)
        expected = f"{lens_dir} has 5 layers but this model has 3"
    elif case == "missing-weights":
        artifact(lens_dir, unembed_hash=good_hash)
        (lens_dir / "lens.safetensors").unlink()
        expected = f"{lens_dir} has no lens.safetensors"
    else:
        artifact(lens_dir, unembed_hash=good_hash)
        config = json.loads((lens_dir / "config.json").read_text())
        (lens_dir / "config.json").write_text(json.dumps({**config, "lens_type": "quantum"}))
        expected = f"{lens_dir}: unknown lens type 'quantum'"
    result = cli(*fit_args(tmp_path, tiny_model_dir, corpus, "--model.init_lens", str(lens_dir)))
    assert_one_line_error(result, expected)
    nothing_written(tmp_path)


# --- the hidden-state cache ---------------------------------------------------------------------------
def test_disk_cache_made_with_other_settings(cli, tmp_path, tiny_model_dir, corpus):
    cache = ["--model.cache", "disk", "--model.cache_dir", str(tmp_path / "hidden-cache")]
    first = cli(*fit_args(tmp_path / "first", tiny_model_dir, corpus, *cache))
    assert first.returncode == 0, first.stderr[-3000:]
    assert list((tmp_path / "hidden-cache").glob("*.safetensors")), "the first run cached nothing"
    second = cli(*fit_args(tmp_path / "second", tiny_model_dir, corpus, *cache, "--data.seq_len", "32"))
    assert_one_line_error(second, f"the hidden-state cache at {tmp_path / 'hidden-cache'} was made with other settings (data differ)")
    nothing_written(tmp_path / "second")


# --- settings that trained garbage or crashed ---------------------------------------------------------
def yaml_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    return path


SETTING_CASES = [
    # (id, extra flags, or a YAML text for --config; expected substring of the error line)
    ("nan-lr-in-yaml", "model:\n  lr: .nan\n", "--model.lr must be a finite number >= 0, got nan"),
    ("negative-lr", ["--model.lr", "-1"], "--model.lr must be a finite number >= 0, got -1.0"),
    ("momentum-one", ["--model.momentum", "1.0"], "--model.momentum must be a finite number >= 0 and < 1, got 1.0"),
    ("nesterov-without-momentum", ["--model.momentum", "0"], "--model.nesterov needs --model.momentum > 0"),
    ("nan-weight-decay", "model:\n  weight_decay: .nan\n", "--model.weight_decay must be a finite number >= 0, got nan"),
    ("negative-ridge", ["--model.ridge", "-1"], "--model.ridge must be a finite number >= 0, got -1.0"),
    ("zero-prompt-length", ["--model.prompt_length", "0"], "--model.prompt_length must be at least 1, got 0"),
    ("negative-cache-budget", ["--model.cache_max_gb", "-1"], "--model.cache_max_gb must be a finite number >= 0"),
    ("unknown-lens-dtype", ["--model.lens_dtype", "float8"], "--model.lens_dtype: unknown dtype 'float8'"),
    ("seq-len-one", ["--data.seq_len", "1"], "--data.seq_len must be at least 2"),
    ("zero-val-max-docs", ["--data.val_max_docs", "0"], "--data.val_max_docs must be at least 1, got 0"),
    ("validation-beyond-max-steps", ["--trainer.val_check_interval", "10"],
     "--trainer.val_check_interval 10 is beyond the 2 batches of --trainer.max_steps 2: no validation would run"),
    ("last-validation-before-the-end", ["--trainer.max_steps", "6", "--trainer.val_check_interval", "4"],
     "--trainer.max_steps 6 (6 batches) is not a multiple of --trainer.val_check_interval 4"),
    ("validation-as-a-fraction", ["--trainer.val_check_interval", "0.5"],
     "--trainer.val_check_interval must be a number of batches"),
    ("zero-gradient-accumulation-again", ["--trainer.accumulate_grad_batches", "0"],
     "--trainer.accumulate_grad_batches must be a whole number of batches >= 1, got 0"),
    ("mistyped-flag", ["--trainer.max_stepz", "3"], "unrecognized arguments: --trainer.max_stepz 3 (see `python train.py fit --help`)"),
    ("value-of-the-wrong-type", ["--model.lr", "fast"], "--model.lr: Expected a float. Got value: fast (see `python train.py fit --help`)"),
    ("missing-config-file", ["--config", "/nonexistent/settings.yaml"], "--config: File does not exist"),
]


@pytest.mark.parametrize(("extra", "expected"), [c[1:] for c in SETTING_CASES], ids=[c[0] for c in SETTING_CASES])
def test_bad_setting(cli, tmp_path, tiny_model_dir, corpus, extra, expected):
    if isinstance(extra, str):
        extra = ["--config", str(yaml_config(tmp_path, extra))]
    result = cli(*fit_args(tmp_path, tiny_model_dir, corpus, *extra))
    assert_one_line_error(result, expected)
    assert "usage:" not in result.stderr, "a parse error prints its one line, not the usage"
    nothing_written(tmp_path)


def test_a_diverging_run_stops_before_writing_a_nan_lens(cli, tmp_path, tiny_model_dir, corpus):
    result = cli(*fit_args(tmp_path, tiny_model_dir, corpus, "--model.lr", "1e30", steps=6))
    assert_one_line_error(result, "the lens weights became NaN or inf; lower --model.lr")
    assert not (tmp_path / "out" / "tuned").exists()
    for ckpt in tmp_path.rglob("*.ckpt"):  # the steps before the divergence were finite
        state = torch.load(ckpt, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), ckpt


# --- the base model ------------------------------------------------------------------------------------
def test_truncated_model_weights(cli, tmp_path, tiny_model_dir, corpus):
    folder = tmp_path / "cut-model"
    folder.mkdir()
    for f in tiny_model_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = cli(*fit_args(tmp_path, folder, corpus))
    assert_one_line_error(result, f"could not load the weights of model '{folder}'")
    nothing_written(tmp_path)


def test_encoder_decoder_model(cli, tmp_path, corpus):
    from transformers import T5Config, T5ForConditionalGeneration

    folder = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                        vocab_size=len(WORDS) + 4)).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    result = cli(*fit_args(tmp_path, folder, corpus))
    assert_one_line_error(result, f"model '{folder}' is an encoder-decoder (t5); lenscope reads decoder-only")
    nothing_written(tmp_path)


def test_mistyped_local_model_folder_is_not_sent_to_the_hub(cli, tmp_path, corpus):
    (tmp_path / "cwd" / "models").mkdir(parents=True)
    result = cli(*fit_args(tmp_path, Path("models/tiny-lama"), corpus))
    assert_one_line_error(result, "model folder models/tiny-lama does not exist")


def test_a_lens_artifact_given_as_the_model(cli, tmp_path, tiny_model_dir, corpus):
    lens_dir = artifact(tmp_path / "lens", unembed_hash=unembed_hash_of(tiny_model_dir))
    result = cli(*fit_args(tmp_path, lens_dir, corpus))
    assert_one_line_error(result, f"{lens_dir} is a lens artifact, not a model folder; pass its base model")


def test_wandb_online_without_a_login(cli, tmp_path, tiny_model_dir, corpus):
    home = tmp_path / "home"  # no ~/.netrc, no W&B settings
    home.mkdir()
    env = {k: v for k, v in cli_env(tmp_path).items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), WANDB_CONFIG_DIR=str(home / ".config" / "wandb"))
    result = cli(*fit_args(tmp_path, tiny_model_dir, corpus, "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
                           f"--trainer.logger.save_dir={tmp_path / 'wb'}"), env=env)
    assert_one_line_error(result, "W&B: No API key configured")
    assert "--trainer.logger.offline true" in result.stderr
    nothing_written(tmp_path)


# --- damaged lens artifacts ------------------------------------------------------------------------------
def edit_config(lens_dir: Path, edit) -> None:
    config = json.loads((lens_dir / "config.json").read_text())
    (lens_dir / "config.json").write_text(json.dumps(edit(config)))


def cut_weights_with_matching_manifest(lens_dir: Path) -> None:
    weights = lens_dir / "lens.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    edit_config(lens_dir, lambda c: {**c, "files": {"lens.safetensors": {
        "bytes": weights.stat().st_size, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}}})


def nan_weights_with_matching_manifest(lens_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = lens_dir / "lens.safetensors"
    state = load_file(weights)
    state["weight"][0, 0, 0] = float("nan")
    save_file(state, weights)
    edit_config(lens_dir, lambda c: {**c, "files": {"lens.safetensors": {
        "bytes": weights.stat().st_size, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}}})


ARTIFACT_DAMAGE = {
    "config-is-a-list": (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json holds a JSON list, not an object"),
    "config-without-layers": (lambda d: edit_config(d, lambda c: {k: v for k, v in c.items() if k != "layers"}),
                              "config.json: no 'layers'"),
    "edited-layers": (lambda d: edit_config(d, lambda c: {**c, "layers": [0, 1]}), "does not fit"),
    "edited-d-model": (lambda d: edit_config(d, lambda c: {**c, "d_model": 64}), "does not fit"),
    "layers-out-of-range": (lambda d: edit_config(d, lambda c: {**c, "layers": [0, 1, 9]}),
                            "'layers' must be distinct residual indices 0..3"),
    "weights-cut-with-matching-manifest": (cut_weights_with_matching_manifest, "lens.safetensors is damaged"),
    "nan-weights": (nan_weights_with_matching_manifest, "holds NaN or inf in weight"),
}


@pytest.mark.parametrize("case", list(ARTIFACT_DAMAGE))
def test_damaged_init_lens(cli, tmp_path, tiny_model_dir, corpus, case):
    lens_dir = artifact(tmp_path / "lens", unembed_hash=unembed_hash_of(tiny_model_dir))
    damage, expected = ARTIFACT_DAMAGE[case]
    damage(lens_dir)
    result = cli(*fit_args(tmp_path, tiny_model_dir, corpus, "--model.init_lens", str(lens_dir)))
    assert_one_line_error(result, expected)
    nothing_written(tmp_path)


def test_refuses_to_write_a_lens_with_nan_weights(tmp_path):
    lens = TunedLens([0, 1], 8)
    with torch.no_grad():
        lens.weight[1, 2, 3] = float("inf")
    with pytest.raises(LensArtifactError, match="refusing to write .* contain NaN or inf"):
        save_lens(lens, tmp_path / "lens", base_model="m", revision="r", unembed_hash="h", num_hidden_layers=2)
    assert not (tmp_path / "lens").exists()


# --- checkpoints and resuming ---------------------------------------------------------------------------------
@pytest.fixture
def finished_run(cli, tmp_path, tiny_model_dir, corpus) -> Path:
    """A 2-step run under ``tmp_path`` (checkpoint ``ckpt/last.ckpt``, artifact ``out/tuned``)."""
    result = cli(*fit_args(tmp_path, tiny_model_dir, corpus))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path


RESUME_CASES = [
    ("nothing-left-to-train", ["--trainer.max_steps", "1", "--trainer.val_check_interval", "1"],
     "is at step 2 and --trainer.max_steps is 1: nothing is left to train"),
    ("other-lens-type", ["--model.lens_type", "affine"], "holds lenses of other settings: the checkpoint has --model.lens_type 'tuned' (this run: 'affine')"),
    ("other-offsets", ["--model.offsets", "[0, 1]"], "the checkpoint has --model.offsets [0] (this run: [0, 1])"),
    ("other-batch-size", ["--data.batch_size", "4"], "cannot resume exactly: the checkpoint has --data.batch_size 2 (this run: 4)"),
    ("other-seq-len", ["--data.seq_len", "32"], "the checkpoint has --data.seq_len 16 (this run: 32)"),
    ("other-model-dtype", ["--model.base.dtype", "bfloat16"], "the checkpoint has --model.base.dtype 'float32' (this run: 'bfloat16')"),
]


@pytest.mark.parametrize(("extra", "expected"), [c[1:] for c in RESUME_CASES], ids=[c[0] for c in RESUME_CASES])
def test_resume_that_cannot_be_exact(cli, finished_run, tiny_model_dir, corpus, extra, expected):
    before = (finished_run / "out" / "tuned" / "lens.safetensors").read_bytes()
    result = cli(*fit_args(finished_run, tiny_model_dir, corpus, "--ckpt_path", "last", "--trainer.max_steps", "4",
                           "--trainer.val_check_interval", "4", *extra))
    assert_one_line_error(result, expected)
    assert (finished_run / "out" / "tuned" / "lens.safetensors").read_bytes() == before, "the artifact was rewritten"


@pytest.mark.parametrize("case", ["lens-file", "lens-folder", "missing", "not-a-checkpoint"])
def test_ckpt_path_that_is_not_a_checkpoint(cli, finished_run, tiny_model_dir, corpus, case):
    target, expected = {
        "lens-file": (finished_run / "out" / "tuned" / "lens.safetensors", "is a safetensors weights file, not a training checkpoint"),
        "lens-folder": (finished_run / "out" / "tuned", "is a folder, not a checkpoint file (it is a lens artifact"),
        "missing": (finished_run / "ckpt" / "step=9.ckpt", "does not exist"),
        "not-a-checkpoint": (finished_run / "other.ckpt", "is not a lenscope training checkpoint"),
    }[case]
    if case == "not-a-checkpoint":
        torch.save({"weights": torch.zeros(2)}, target)
    result = cli(*fit_args(finished_run / "again", tiny_model_dir, corpus, "--ckpt_path", str(target)))
    assert_one_line_error(result, expected)


def test_validate_without_a_checkpoint_keeps_the_results(cli, finished_run, tiny_model_dir, corpus):
    before = (finished_run / "out" / "results.json").read_text()
    result = cli("validate", *fit_args(finished_run, tiny_model_dir, corpus)[1:])
    assert_one_line_error(result, "train.py validate scores a trained lens: pass --ckpt_path")
    assert (finished_run / "out" / "results.json").read_text() == before


def test_a_new_run_into_a_finished_runs_folders(cli, finished_run, tiny_model_dir, corpus):
    before = (finished_run / "out" / "tuned" / "lens.safetensors").read_bytes()
    again = cli(*fit_args(finished_run, tiny_model_dir, corpus, steps=4))
    assert_one_line_error(again, "already holds an earlier run's results (tuned/, results.json, results.md); pass "
                                 "--ckpt_path last to continue that run, --overwrite true to replace them")
    assert (finished_run / "out" / "tuned" / "lens.safetensors").read_bytes() == before
    replaced = cli(*fit_args(finished_run, tiny_model_dir, corpus, "--overwrite", "true", steps=4))
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert json.loads((finished_run / "out" / "tuned" / "config.json").read_text())["trained_steps"] == 4


def test_a_second_run_into_the_same_folders_at_once(tmp_path, tiny_model_dir, corpus):
    """The first run is held at step 1 (tests/signal_helpers.py) while the second starts."""
    env = cli_env(tmp_path)
    hold = ["--trainer.callbacks+=tests.signal_helpers.HoldAtSteps", f"--trainer.callbacks.marker_dir={tmp_path / 'm'}",
            "--trainer.callbacks.steps=[1]"]
    first = subprocess.Popen([sys.executable, str(TRAIN), *fit_args(tmp_path, tiny_model_dir, corpus, *hold)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while not (tmp_path / "m" / "step-1").exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.02)
        second = subprocess.run([sys.executable, str(TRAIN), *fit_args(tmp_path, tiny_model_dir, corpus)],
                                capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
        assert_one_line_error(Result(second.returncode, second.stdout, second.stderr),
                              f"another run (pid {first.pid}) is writing to {tmp_path / 'out'}")
    finally:
        first.send_signal(signal.SIGTERM)  # stops at the held step with a checkpoint
        first.communicate(timeout=TIMEOUT_S)
    assert first.returncode == 128 + signal.SIGTERM


# --- output folders -----------------------------------------------------------------------------------------------
def unwritable_folder(tmp_path: Path) -> Path:
    """A folder nobody may write to: a read-only one, or, for root (who may write anywhere), sysfs."""
    if os.geteuid() == 0:
        return Path("/sys/lenscope-results")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "out"


@pytest.mark.parametrize("case", ["a-file", "under-a-file", "read-only"])
def test_output_folder_that_cannot_be_written(cli, tmp_path, tiny_model_dir, corpus, case):
    (tmp_path / "taken").write_text("a file")
    folder = {"a-file": tmp_path / "taken", "under-a-file": tmp_path / "taken" / "out",
              "read-only": unwritable_folder(tmp_path)}[case]
    expected = {"a-file": f"output folder {folder} is a file", "under-a-file": "which is a file",
                "read-only": f"cannot write output folder {folder}"}[case]
    result = cli(*fit_args(tmp_path, tiny_model_dir, corpus, "--trainer.callbacks+=lenscope.training.callbacks.LensArtifactWriter",
                           f"--trainer.callbacks.dirpath={folder}"))
    assert_one_line_error(result, expected)
    assert "the LensArtifactWriter's dirpath" in result.stderr
    nothing_written(tmp_path)


# --- data in other shapes -----------------------------------------------------------------------------------------
def corpus_as(tmp_path: Path, corpus: Path, kind: str) -> Path:
    lines = corpus.read_bytes()
    if kind == "jsonl.gz":
        path = tmp_path / "corpus.jsonl.gz"
        path.write_bytes(gzip.compress(lines))
    elif kind == "json-array":
        path = tmp_path / "corpus.json"
        path.write_text(json.dumps([json.loads(line) for line in lines.splitlines()]))
    elif kind == "huge-first-document":  # one 8 MB line, first in the training share (ordinal 1)
        path = tmp_path / "huge.jsonl"
        rest = lines.splitlines(keepends=True)
        rng = random.Random(0)
        huge = json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(2_000_000))}).encode() + b"\n"
        path.write_bytes(rest[0] + huge + b"".join(rest[1:]))
    return path


@pytest.mark.parametrize("kind", ["jsonl.gz", "json-array", "huge-first-document"])
def test_corpora_in_other_shapes_train(cli, tmp_path, tiny_model_dir, corpus, kind):
    source = corpus_as(tmp_path, corpus, kind)
    result = cli(*fit_args(tmp_path, tiny_model_dir, source, "--data.shuffle_buffer", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "tuned" / "lens.safetensors").exists()


FORMAT_CASES = [
    ("csv", "corpus.csv", "text\nw1 w2\n", "is a CSV file; lenscope reads JSON lines"),
    ("parquet", "corpus.parquet", "PAR1", "is a Parquet file"),
    ("truncated-gzip", "corpus.jsonl.gz", None, "is truncated (its gzip stream ends early)"),
]


@pytest.mark.parametrize(("name", "content", "expected"), [c[1:] for c in FORMAT_CASES], ids=[c[0] for c in FORMAT_CASES])
def test_files_lenscope_does_not_read_are_named(cli, tmp_path, tiny_model_dir, corpus, name, content, expected):
    path = tmp_path / name
    if content is None:
        path.write_bytes(gzip.compress(corpus.read_bytes())[:300])
    else:
        path.write_text(content)
    result = cli(*fit_args(tmp_path, tiny_model_dir, path))
    assert_one_line_error(result, expected)
    nothing_written(tmp_path)


def test_a_folder_of_other_files_is_described(cli, tmp_path, tiny_model_dir):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(3):
        (folder / f"doc{i}.txt").write_text("w1 w2 w3")
    result = cli(*fit_args(tmp_path, tiny_model_dir, folder))
    assert_one_line_error(result, "holds no JSON files (it has 3 .txt)")
