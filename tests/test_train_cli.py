"""The training command line, end to end, on a tiny random model (fast) and the embedded model (slow)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from lenscope.cli import train
from lenscope.files import dir_mode, file_mode
from lenscope.lenses.artifact import load_lens
from tests.conftest import SHARED_PILE, fit_args, write_corpus

ROOT = Path(__file__).resolve().parents[1]


def test_fit_writes_artifact_results_and_lens_only_checkpoint(tmp_path, tiny_model_dir, corpus, capsys):
    train.main([*fit_args(tmp_path, tiny_model_dir, corpus), "--trainer.enable_progress_bar", "true"])
    # The run's last words say where its files went (after the progress bar has closed).
    tail = capsys.readouterr().out.replace("\r", "\n").rstrip().splitlines()[-3:]
    assert [line.split(":")[0] for line in tail] == ["Lens artifacts", "Results", "Checkpoint"], tail
    lens = load_lens(tmp_path / "out" / "tuned")
    assert lens.num_layers == 3 and lens.weight.abs().sum() > 0  # trained away from zero
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for lens_name in ("logit", "tuned"):
        assert len(results[lens_name]["kl_bits"]) == 3
        assert all(v >= 0 and v == v for v in results[lens_name]["kl_nats"])
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert set(ckpt["state_dict"]) == {"lenses.tuned.weight", "lenses.tuned.bias"}, "checkpoint must hold the lens only"
    assert ckpt["global_step"] == 4
    loader_state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["dataset_state"]["docs"] > 0, "the data position must be checkpointed"
    # Everything written gets the user's usual permissions (umask), not mkstemp's 0600.
    for path in (tmp_path / "out" / "tuned" / "lens.safetensors", tmp_path / "out" / "tuned" / "config.json",
                 tmp_path / "out" / "results.json", tmp_path / "out" / "results.md", tmp_path / "ckpt" / "last.ckpt"):
        assert stat.S_IMODE(path.stat().st_mode) == file_mode(), path
    assert stat.S_IMODE((tmp_path / "out" / "tuned").stat().st_mode) == dir_mode()


def test_several_offsets_train_in_one_run_as_they_would_alone(tmp_path, tiny_model_dir, corpus):
    together = tmp_path / "together"
    train.main(fit_args(together, tiny_model_dir, corpus, "--model.offsets", "[0, 1, 3]"))
    results = json.loads((together / "out" / "results.json").read_text())
    assert results["lenses"] == ["logit", "tuned", "logit+1", "tuned+1", "logit+3", "tuned+3"]
    for name in ("tuned", "tuned+1", "tuned+3"):
        assert load_lens(together / "out" / name).offset == int(name.partition("+")[2] or 0)
    # Lenses of different offsets share the model pass but not their parameters, gradients or
    # clipping: offset 3 alone gives the same lens.
    alone = tmp_path / "alone"
    train.main(fit_args(alone, tiny_model_dir, corpus, "--model.offsets", "[3]"))
    torch.testing.assert_close(load_lens(alone / "out" / "tuned+3").weight, load_lens(together / "out" / "tuned+3").weight,
                               atol=1e-6, rtol=0)
    assert load_lens(together / "out" / "tuned+3").weight.abs().max() > 0  # and it did train
    assert results["tuned+3"]["kl_nats"] != results["tuned"]["kl_nats"]


def test_validate_scores_a_checkpoint(tmp_path, tiny_model_dir, corpus):
    train.main(fit_args(tmp_path, tiny_model_dir, corpus))
    trained = json.loads((tmp_path / "out" / "results.json").read_text())
    (tmp_path / "out" / "results.json").unlink()
    args = fit_args(tmp_path, tiny_model_dir, corpus, "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"))
    train.main(["validate", *args[1:]])
    validated = json.loads((tmp_path / "out" / "results.json").read_text())
    # Same checkpoint, same held-out data: the same numbers (and not the untrained lens's).
    assert validated["tuned"]["kl_nats"] == pytest.approx(trained["tuned"]["kl_nats"], rel=1e-6)
    assert validated["tuned"]["kl_nats"] != pytest.approx(validated["logit"]["kl_nats"], rel=1e-6)


def test_resume_from_last_matches_uninterrupted_run(tmp_path, tiny_model_dir, corpus):
    full = tmp_path / "full"
    train.main(fit_args(full, tiny_model_dir, corpus, steps=6, checkpoint=(
        "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename={step}")))
    # The step-4 checkpoint is exactly what a run killed between steps 4 and 6 leaves as last.ckpt.
    part = tmp_path / "part"
    (part / "ckpt").mkdir(parents=True)
    shutil.copy(full / "ckpt" / "step=4.ckpt", part / "ckpt" / "last.ckpt")
    # Resuming must restore optimizer, schedule, step and data position to give the same lens.
    train.main(fit_args(part, tiny_model_dir, corpus, "--ckpt_path", "last", steps=6))
    a = load_lens(full / "out" / "tuned")
    b = load_lens(part / "out" / "tuned")
    torch.testing.assert_close(a.weight, b.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.bias, b.bias, atol=1e-6, rtol=0)
    # ... and not trivially: the last two steps changed the lens.
    c = torch.load(full / "ckpt" / "step=4.ckpt", weights_only=False)["state_dict"]["lenses.tuned.weight"]
    assert (c - a.weight).abs().max() > 1e-5
    # The tokens a lens was trained on are counted across the resume (its model card says how many).
    configs = [json.loads((run / "out" / "tuned" / "config.json").read_text()) for run in (full, part)]
    at_4 = torch.load(full / "ckpt" / "step=4.ckpt", weights_only=False)["lenscope"]["tokens_seen_by_rank"]
    per_batch = at_4[0] // (16 + 4)  # the 16 batches of the least-squares warm start, then 4 KL steps
    assert configs[0]["tokens_seen"] == configs[1]["tokens_seen"] == at_4[0] + 2 * per_batch > 0
    results = json.loads((full / "out" / "results.json").read_text())
    assert configs[0]["held_out"] == {"step": 6, "kl_bits": results["tuned"]["kl_bits"], "ce_bits": results["tuned"]["ce_bits"]}
    assert configs[0]["training_data"]["source"] == str(corpus) and configs[0]["training_data"]["seq_len"] == 16
    assert configs[0]["warm_start_batches"] == configs[1]["warm_start_batches"] == 16


def test_wandb_receives_per_layer_metrics_and_table(tmp_path, tiny_model_dir, corpus, wandb_spy):
    args = fit_args(tmp_path, tiny_model_dir, corpus)
    args += ["--trainer.logger=lightning.pytorch.loggers.WandbLogger", "--trainer.logger.offline=true",
             f"--trainer.logger.save_dir={tmp_path / 'wb'}", "--trainer.logger.project=lenscope-test"]
    train.main(args)
    assert len(wandb_spy.inits) == 1 and wandb_spy.inits[0]["project"] == "lenscope-test"
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "train/tuned/kl_mean" in wandb_spy.keys() and "train/tokens" in wandb_spy.keys()
    # The per-layer validation numbers W&B receives are the ones results.json records.
    for lens in ("logit", "tuned"):
        for i, layer in enumerate(results["layers"]):
            logged = float(wandb_spy.last(f"val/{lens}/kl_bits/layer_{layer:02d}"))
            assert logged == pytest.approx(results[lens]["kl_bits"][i], rel=1e-6)
    table = wandb_spy.last("val/per_layer")
    assert table.columns == ["residual", "layer", "logit_kl_bits", "tuned_kl_bits", "logit_ce_bits", "tuned_ce_bits"]
    assert [row[0] for row in table.data] == results["layers"]
    assert [row[3] for row in table.data] == pytest.approx(results["tuned"]["kl_bits"])
    # The run id is kept in the checkpoint, so that a resumed run logs into the same run.
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["lenscope"]["wandb_run_id"] == wandb_spy.runs[0].id


@pytest.fixture
def run_cli(zygote, tmp_path):
    """``train.py`` in a process of its own (forked from the test zygote), from an empty working
    folder: paths a config gives relative to it (runs/, artifacts/) never touch the checkout's."""
    def run(*args: str, env: dict | None = None):
        result = zygote.run(ROOT / "train.py", list(args), tmp_path / "cwd", {**os.environ, **(env or {})}, timeout=600)
        assert not result.timed_out, f"train.py {' '.join(args)} ran past 600 s"
        return result

    return run


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--data.source", "/nonexistent/corpus.jsonl"], "no data found at '/nonexistent/corpus.jsonl'"),
        (["--data.seq_len", "100000"], "--data.seq_len is 100000 but the model's context is 256"),
        (["--model.lens_type", "quantum"], "--model.lens_type 'quantum' is unknown"),
        (["--trainer.max_steps", "0"], "--trainer.max_steps must be a positive number"),
        (["--model.offsets", "[0, 16]"], "--model.offsets has 16 but --data.seq_len is 16"),
    ],
)
def test_bad_input_gives_one_line_error(run_cli, tmp_path, tiny_model_dir, corpus, override, expected):
    result = run_cli(*fit_args(tmp_path, tiny_model_dir, corpus), *override)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]


@pytest.mark.subprocess
def test_empty_corpus_is_an_error(run_cli, tmp_path, tiny_model_dir):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text(json.dumps({"text": "   "}) + "\n")
    result = run_cli(*fit_args(tmp_path, tiny_model_dir, corpus))
    assert result.returncode == 2 and "yields no train samples" in result.stderr


@pytest.mark.slow
@pytest.mark.subprocess
def test_embedded_model_lens_beats_logit_lens(run_cli, tmp_path):
    """The real 135M model on the demo corpus, the quickstart's recipe on a smaller budget: the
    tuned lens beats the logit lens on held-out text at every layer (the logit lens of this model
    is poor at every layer)."""
    out = tmp_path / "out"
    result = run_cli(
        "fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "2", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        # A warm start on 8 batches and 2 KL steps, of 128 tokens each: about a minute on one core
        # without native bf16 (fp32 lens matmuls there).
        "--model.warm_start_batches", "8",
        "--data.batch_size", "2", "--data.seq_len", "64", "--data.val_max_docs", "1", "--data.num_workers", "0",
        "--trainer.default_root_dir", str(tmp_path / "runs"),
        "--trainer.callbacks+=lenscope.training.callbacks.LensArtifactWriter", f"--trainer.callbacks.dirpath={out}",
        env={"LENSCOPE_COMPILE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    logit, tuned = results["logit"]["kl_nats"], results["tuned"]["kl_nats"]
    assert len(tuned) == 30
    worse = [i for i, (a, b) in enumerate(zip(logit, tuned, strict=True)) if not b < a]
    assert not worse, f"tuned lens not better than the logit lens at residuals {worse}"


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_PILE.exists(), reason="shared Pile sample not present (only on the project's machines)")
def test_pile_sample_streams(tmp_path):
    from lenscope.datamodules.sources import DocumentSource

    docs = list(DocumentSource(str(SHARED_PILE)))
    assert len(docs) > 600 and all(isinstance(d, str) and d.strip() for d in docs)


def test_write_corpus_helper_is_deterministic(tmp_path):
    a = write_corpus(tmp_path / "a.jsonl", 5, seed=3).read_text()
    b = write_corpus(tmp_path / "b.jsonl", 5, seed=3).read_text()
    assert a == b


def test_affine_lens_fits_in_closed_form_and_warm_starts_a_tuned_lens(tmp_path, tiny_model_dir, corpus):
    affine = tmp_path / "affine"
    train.main(fit_args(affine, tiny_model_dir, corpus, "--model.lens_type", "affine"))
    fitted = load_lens(affine / "out" / "affine")
    assert fitted.lens_type == "affine" and fitted.weight.abs().max() > 1e-3
    assert torch.isfinite(fitted.weight).all() and torch.isfinite(fitted.bias).all()
    warm = tmp_path / "warm"
    train.main(fit_args(warm, tiny_model_dir, corpus, "--model.init_lens", str(affine / "out" / "affine"),
                        "--model.lr", "0.0"))
    started = load_lens(warm / "out" / "tuned")
    assert started.lens_type == "tuned"
    torch.testing.assert_close(started.weight, fitted.weight, atol=1e-6, rtol=0)  # lr 0: still the fit
