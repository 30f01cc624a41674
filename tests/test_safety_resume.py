"""Resuming never runs code, never starts afresh without a word, never loses a trained lens and
never ignores a setting (issue 26, sections 1, 3 and 4)."""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lenscope.cli import train
from lenscope.training import callbacks
from lenscope.training.checkpoint_io import AtomicCheckpointIO, CheckpointReadError, read_checkpoint
from tests.conftest import fit_args

ROOT = Path(__file__).resolve().parents[1]


class WritesAMarker:
    """Unpickled, it would call ``os.system`` to create a file: what a hostile checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like a lenscope checkpoint (the keys the preflight looks for) that runs code when unpickled."""
    torch.save({"state_dict": {}, "lenscope": {}, "global_step": 1, "payload": WritesAMarker(marker)}, path)
    return path


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def run_train(capsys, args: list[str]) -> tuple[int, str]:
    """``train.main(args)`` in this process: its exit status (0 if it returned) and what it wrote to stderr."""
    try:
        train.main(args)
        status = 0
    except SystemExit as stop:
        status = stop.code
    return status, capsys.readouterr().err


# --- 1. a checkpoint never executes code ------------------------------------------------------------
@pytest.mark.subprocess
@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_a_checkpoint_that_would_run_code_is_refused_unrun(zygote, tmp_path, tiny_model_dir, corpus, subcommand):
    marker = tmp_path / "code-ran"
    hostile = hostile_checkpoint(tmp_path / "shared.ckpt", marker)
    args = fit_args(tmp_path / "run", tiny_model_dir, corpus, "--ckpt_path", str(hostile))
    result = zygote.run(ROOT / "train.py", [subcommand, *args[1:]], tmp_path, dict(os.environ), timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and f"{hostile} is not a lenscope checkpoint and was not loaded" in errors[0], result.stderr
    assert "posix.system" in errors[0]
    assert not marker.exists(), "the checkpoint's code ran"


def test_lightnings_own_restore_reads_through_the_same_refusal(tmp_path):
    # Lightning restores fit/validate(ckpt_path=...) and SLURM's requeue checkpoint through the
    # checkpoint IO, whatever weights_only it asks for.
    marker = tmp_path / "code-ran"
    hostile = hostile_checkpoint(tmp_path / "shared.ckpt", marker)
    for weights_only in (None, False):
        with pytest.raises(CheckpointReadError, match="is not a lenscope checkpoint and was not loaded"):
            AtomicCheckpointIO().load_checkpoint(hostile, weights_only=weights_only)
    assert not marker.exists()


def test_lightning_resumes_the_checkpoint_the_preflight_read(tmp_path, tiny_model_dir, finished_4_steps):
    # Lightning resolves --ckpt_path last to the newest last*.ckpt in the folder; a hostile
    # last-v9.ckpt written after last.ckpt would be the one it loaded (under FSDP with its own
    # unrestricted unpickler). lenscope hands it the last.ckpt it read and checked.
    run, corpus = finished_4_steps("tuned")
    shutil.copytree(run, tmp_path / "run")
    marker = tmp_path / "code-ran"
    hostile = hostile_checkpoint(tmp_path / "run" / "ckpt" / "last-v9.ckpt", marker)
    os.utime(hostile, (os.path.getmtime(hostile) + 60,) * 2)
    train.main(fit_args(tmp_path / "run", tiny_model_dir, corpus, "--ckpt_path", "last", steps=6))
    assert not marker.exists()
    assert read_checkpoint(tmp_path / "run" / "ckpt" / "last.ckpt")["global_step"] == 6


@pytest.mark.parametrize("lens_type", ["affine", "learned_prompt"])
def test_every_kind_of_checkpoint_reads_without_an_allow_list(tmp_path, tiny_model_dir, corpus, lens_type):
    # The tuned lens's checkpoints are read on every resume in test_train_cli / test_fault_tolerance;
    # the other kinds hold more (normal equations, Adam's state): still only tensors and plain values.
    train.main(fit_args(tmp_path, tiny_model_dir, corpus, "--model.lens_type", lens_type,
                        "--model.prompt_positions", "2"))
    checkpoint = read_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert checkpoint["global_step"] == 4 and checkpoint["state_dict"]


# --- 2. a resume that finds nothing to resume refuses --------------------------------------------------
@pytest.mark.parametrize("found", ["cut-short", "empty", "other"])
def test_ckpt_path_last_with_nothing_to_resume_refuses(tmp_path, tiny_model_dir, corpus, capsys, found):
    folder = tmp_path / "ckpt"
    expected = {"cut-short": "holds only .last.ckpt.k1ll3d.tmp, a checkpoint cut short while it was being written",
                "empty": "holds no checkpoint",
                "other": "holds step=2.ckpt but no last.ckpt (pass one of them as --ckpt_path)"}[found]
    folder.mkdir()
    if found == "cut-short":
        (folder / ".last.ckpt.k1ll3d.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")
    if found == "other":
        (folder / "step=2.ckpt").write_bytes(b"")
    status, stderr = run_train(capsys, fit_args(tmp_path, tiny_model_dir, corpus, "--ckpt_path", "last"))
    errors = error_lines(stderr)
    assert status == 2 and len(errors) == 1, stderr
    assert f"--ckpt_path last found nothing to resume: {folder} {expected}; drop --ckpt_path to start a new run" in errors[0]
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".lenscope.lock"], "nothing was started"


def test_a_copied_run_folder_resumes_into_last_ckpt_and_leftovers_are_removed(tmp_path, tiny_model_dir, corpus):
    original = tmp_path / "original"
    train.main(fit_args(original, tiny_model_dir, corpus))
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    leftover = copy / "ckpt" / ".last.ckpt.d3ad.tmp"  # a writer killed mid-write in the copied folder
    leftover.write_bytes(b"PK\x03\x04 half a checkpoint")
    train.main(fit_args(copy, tiny_model_dir, corpus, "--ckpt_path", "last", steps=6))
    # Lightning would write last-v1.ckpt (the last.ckpt there was not written by this process)
    # and leave last.ckpt at step 4, so that the next --ckpt_path last went back two steps.
    assert sorted(p.name for p in (copy / "ckpt").iterdir()) == [".lenscope.lock", "last.ckpt"]
    assert read_checkpoint(copy / "ckpt" / "last.ckpt")["global_step"] == 6


# --- 3. a crash after the last checkpoint loses no lens ------------------------------------------------
def fail_writing_artifacts(monkeypatch) -> None:
    """The fault: the disk fills up as the artifact is written, after the final checkpoint."""
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(callbacks, "save_lens", full_disk)


@pytest.mark.parametrize("artifact", ["missing", "older"])
def test_a_run_cut_short_before_its_artifact_writes_it_from_the_final_checkpoint(
        tmp_path, tiny_model_dir, corpus, capsys, caplog, monkeypatch, artifact):
    run = tmp_path / "run"
    if artifact == "older":  # a finished 4-step run, continued to 6 steps
        train.main(fit_args(run, tiny_model_dir, corpus, steps=4))
    fail_writing_artifacts(monkeypatch)
    resume = ("--ckpt_path", "last") if artifact == "older" else ()
    status, stderr = run_train(capsys, fit_args(run, tiny_model_dir, corpus, *resume, steps=6))
    monkeypatch.undo()
    assert status == 2 and "No space left" in stderr, stderr
    final = read_checkpoint(run / "ckpt" / "last.ckpt")
    assert final["global_step"] == 6
    if artifact == "older":
        assert json.loads((run / "out" / "tuned" / "config.json").read_text())["trained_steps"] == 4
    else:
        assert not (run / "out" / "tuned").exists()

    # The rerun writes the artifact (and the results) from the checkpoint: what the run would have written.
    caplog.clear()
    status, _ = run_train(capsys, fit_args(run, tiny_model_dir, corpus, "--ckpt_path", "last", steps=6))
    assert status == 0
    said = [r.getMessage() for r in caplog.records if "holds the final lens" in r.getMessage()]
    assert said == [f"{run / 'ckpt' / 'last.ckpt'} holds the final lens (step 6) of a run that stopped before writing "
                    "its lens artifacts: writing them from it, and its held-out results, instead of training"]
    written = json.loads((run / "out" / "tuned" / "config.json").read_text())
    assert written["trained_steps"] == 6 and written["held_out"]["step"] == 6
    assert written["tokens_seen"] == sum(final["lenscope"]["tokens_seen_by_rank"])
    lens = load_file(run / "out" / "tuned" / "lens.safetensors")
    assert torch.equal(lens["weight"], final["state_dict"]["lenses.tuned.weight"])
    results = json.loads((run / "out" / "results.json").read_text())
    assert results["step"] == 6 and written["held_out"]["kl_bits"] == results["tuned"]["kl_bits"]
    if artifact == "missing":  # the same artifact and results as a run that was not cut short
        reference = tmp_path / "reference"
        train.main(fit_args(reference, tiny_model_dir, corpus, steps=6))
        expected = json.loads((reference / "out" / "tuned" / "config.json").read_text())
        for key in ("trained_steps", "tokens_seen", "warm_start_batches", "training_data", "held_out", "lenscope_lens_dtype"):
            assert written[key] == expected[key], key
        torch.testing.assert_close(lens["weight"], load_file(reference / "out" / "tuned" / "lens.safetensors")["weight"],
                                   atol=1e-6, rtol=0)
        expected_results = json.loads((reference / "out" / "results.json").read_text())
        assert results["tuned"]["kl_nats"] == pytest.approx(expected_results["tuned"]["kl_nats"], rel=1e-6)

    # Now the lens is in its artifact, and only now does the refusal say so.
    status, stderr = run_train(capsys, fit_args(run, tiny_model_dir, corpus, "--ckpt_path", "last", steps=6))
    assert status == 2 and "the lens of step 6 is already in" in stderr, stderr


def test_the_artifact_is_said_to_hold_the_lens_only_when_it_does(tmp_path):
    from lenscope.training.preflight import ResumeError, check_resume

    checkpoint = {"global_step": 4, "state_dict": {"lenses.tuned.weight": torch.zeros(1)},
                  "lenscope": {"tokens_seen_by_rank": [300, 20]}}
    artifact = tmp_path / "out" / "tuned"
    artifact.mkdir(parents=True)

    def final(recorded: dict | None, folders=(tmp_path / "out",)) -> bool:
        if recorded is not None:
            (artifact / "config.json").write_text(json.dumps(recorded))
        return check_resume(tmp_path / "last.ckpt", checkpoint, {}, {}, {"max_steps": 4}, list(folders))

    assert final(None), "no artifact: written from the checkpoint"
    assert final({"trained_steps": 2, "tokens_seen": 200}), "an older artifact: written from the checkpoint"
    assert final({"trained_steps": 4, "tokens_seen": 999}), "as many steps on other tokens: another run's lens"
    with pytest.raises(ResumeError, match=r"nothing is left to train; raise --trainer.max_steps above 4 \(the lens of "
                                          r"step 4 is already in .*out\)"):
        final({"trained_steps": 4, "tokens_seen": 320})
    with pytest.raises(ResumeError, match=r"nothing is left to train; raise --trainer.max_steps above 4$"):
        final(None, folders=())  # no artifact writer: nothing to write, and nothing claimed


# --- 4. nothing ignored on resume -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_4_steps(tmp_path_factory, tiny_model_dir):
    """``finished_4_steps(kind)``: a finished 4-step run of that gradient-trained kind (``last.ckpt``
    at step 4; trained once per module) and its corpus, to be copied and resumed to 6 steps."""
    from tests.conftest import write_corpus

    runs: dict[str, tuple[Path, Path]] = {}

    def finished(kind: str) -> tuple[Path, Path]:
        if kind not in runs:
            base = tmp_path_factory.mktemp(f"finished-{kind}")
            corpus = write_corpus(base / "corpus.jsonl", 40)
            train.main(fit_args(base / "run", tiny_model_dir, corpus, "--model.lens_type", kind,
                                "--model.prompt_positions", "2"))
            runs[kind] = base / "run", corpus
        return runs[kind]

    return finished


CHANGED = {  # lens kind, flag, new value, the refusal's words for it
    "lr": ("tuned", "--model.lr", "0.5", "--model.lr 1.0 (this run: 0.5)"),
    "momentum": ("tuned", "--model.momentum", "0.5", "--model.momentum 0.9 (this run: 0.5)"),
    "nesterov": ("tuned", "--model.nesterov", "false", "--model.nesterov True (this run: False)"),
    "weight-decay": ("tuned", "--model.weight_decay", "0.1", "--model.weight_decay 0.001 (this run: 0.1)"),
    "warmup": ("tuned", "--model.warmup_steps", "2", "--model.warmup_steps 0 (this run: 2)"),
    "warm-start": ("tuned", "--model.warm_start_batches", "3", "--model.warm_start_batches 16 (this run: 3)"),
    "ridge": ("tuned", "--model.ridge", "0.1", "--model.ridge 0.001 (this run: 0.1)"),
    "clip": ("tuned", "--trainer.gradient_clip_val", "0.5", "--trainer.gradient_clip_val 1.0 (this run: 0.5)"),
    "clip-kind": ("tuned", "--trainer.gradient_clip_algorithm", "value",
                  "--trainer.gradient_clip_algorithm 'norm' (this run: 'value')"),
    "accumulate": ("tuned", "--trainer.accumulate_grad_batches", "2", "--trainer.accumulate_grad_batches 1 (this run: 2)"),
    "prompt-lr": ("learned_prompt", "--model.prompt_lr", "0.01", "--model.prompt_lr 0.001 (this run: 0.01)"),
    "prompt-positions": ("learned_prompt", "--model.prompt_positions", "3", "--model.prompt_positions 2 (this run: 3)"),
    "warmup-prompt": ("learned_prompt", "--model.warmup_steps", "2", "--model.warmup_steps 0 (this run: 2)"),
}


@pytest.mark.parametrize("case", list(CHANGED))
def test_a_changed_training_setting_is_refused_on_resume(tmp_path, tiny_model_dir, finished_4_steps, capsys, case):
    # Resumed, the checkpoint's optimizer state (lr, momentum, ...) and warm start would win over
    # the command line while runs/config.yaml recorded the new value: refused, naming both.
    kind, flag, value, words = CHANGED[case]
    run, corpus = finished_4_steps(kind)
    shutil.copytree(run, tmp_path / "run")
    recorded = (tmp_path / "run" / "runs" / "config.yaml").read_bytes()
    status, stderr = run_train(capsys, fit_args(tmp_path / "run", tiny_model_dir, corpus, "--model.lens_type", kind,
                                                "--model.prompt_positions", "2", "--ckpt_path", "last", flag, value,
                                                steps=6))
    errors = error_lines(stderr)
    assert status == 2 and len(errors) == 1, stderr
    assert "was trained with other settings, so it cannot resume exactly: the checkpoint has " + words in errors[0]
    assert (tmp_path / "run" / "runs" / "config.yaml").read_bytes() == recorded, "the recorded config must be what ran"
    assert read_checkpoint(tmp_path / "run" / "ckpt" / "last.ckpt")["global_step"] == 4


@pytest.mark.parametrize("kind", ["tuned", "learned_prompt"])
def test_raising_max_steps_on_resume_says_how_the_schedule_changes(tmp_path, tiny_model_dir, finished_4_steps, caplog,
                                                                     kind):
    run, corpus = finished_4_steps(kind)
    shutil.copytree(run, tmp_path / "run")
    caplog.clear()
    train.main(fit_args(tmp_path / "run", tiny_model_dir, corpus, "--model.lens_type", kind,
                        "--model.prompt_positions", "2", "--ckpt_path", "last", steps=6))
    said = [r.getMessage() for r in caplog.records if "--trainer.max_steps 6" in r.getMessage()]
    # The 4-step run's schedule reached 0 at step 4; stretched to 6 steps, step 4 gets a third of the lr.
    assert said == ["--trainer.max_steps 6 (the checkpoint's run had 4): the learning rate now decays to 0 at step 6, "
                    "so from step 4 it is 0.333× the configured one (it would have been 0×)"]
    assert read_checkpoint(tmp_path / "run" / "ckpt" / "last.ckpt")["global_step"] == 6


# --- 5. a corpus edited in place is not resumed --------------------------------------------------------
def test_a_resume_on_a_corpus_edited_in_place_is_refused(tmp_path, tiny_model_dir, capsys):
    from tests.conftest import write_corpus

    corpus = write_corpus(tmp_path / "corpus.jsonl", 40)
    train.main(fit_args(tmp_path, tiny_model_dir, corpus))
    write_corpus(corpus, 40, seed=1)  # same path, same number of documents, other texts
    status, stderr = run_train(capsys, fit_args(tmp_path, tiny_model_dir, corpus, "--ckpt_path", "last", steps=6))
    errors = error_lines(stderr)
    assert status == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr
    assert f"{str(corpus)!r} is not the corpus this run has read: the " in errors[0]
    assert "documents the checkpoint's run had read differ now, so it was edited in place" in errors[0]
    assert read_checkpoint(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 4, "nothing was trained on the edit"


def stream_of(path: Path):
    from lenscope.datamodules.lens_data import DocumentStream
    from lenscope.datamodules.preprocessing import TrimSettings
    from lenscope.datamodules.sources import DocumentSource
    from tests.conftest import make_tokenizer

    return DocumentStream(DocumentSource(str(path)), make_tokenizer(), split="train", mode="pack", seq_len=64, seed=0,
                          shuffle_buffer=1000, holdout_every=10, trim=TrimSettings(), repeat=True)


def edit_document(path: Path, ordinal: int) -> None:
    lines = path.read_text().splitlines()
    record = json.loads(lines[ordinal])
    record["text"] = " ".join(reversed(record["text"].split()))
    lines[ordinal] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("edited", ["read-in-this-pass", "read-in-an-earlier-pass"])
def test_the_stream_checks_what_it_reads_again(tmp_path, num_workers, edited):
    # A resumed stream reads the documents before its position again: an edit there stops it at once.
    # An edit in a document read only in an earlier pass is caught when the pass it is in ends.
    from functools import partial

    from torchdata.stateful_dataloader import StatefulDataLoader

    from lenscope.datamodules.preprocessing import collate
    from lenscope.datamodules.sources import DataSourceError
    from tests.conftest import write_corpus

    corpus = write_corpus(tmp_path / "corpus.jsonl", 40)
    order = [ordinal for ordinal, _ in stream_of(corpus).documents()]  # the training documents, in reading order

    def loader():
        return StatefulDataLoader(stream_of(corpus), batch_size=3, num_workers=num_workers,
                                  collate_fn=partial(collate, pad_id=3))

    first = loader()
    batches = iter(first)
    for _ in range(5 if edited == "read-in-this-pass" else 9):  # 9 batches: into the second pass (~23 chunks a pass)
        next(batches)
    state = first.state_dict()
    del batches
    edit_document(corpus, order[0] if edited == "read-in-this-pass" else order[-1])
    resumed = loader()
    resumed.load_state_dict(state)
    read_again, refused = iter(resumed), None
    try:
        if edited == "read-in-this-pass":
            with pytest.raises(Exception, match="the .* documents the checkpoint's run had read differ now") as refused:
                next(read_again)
        else:
            next(read_again)  # the documents before the position are unchanged: it resumes
            with pytest.raises(Exception, match="its documents in pass 1 of the stream, which were not those of "
                                                "pass 0") as refused:
                for _ in range(100):  # a guard: the pass ends within ~8 batches
                    next(read_again)
        assert isinstance(refused.value, DataSourceError) or "DataSourceError" in str(refused.value)
    finally:
        # Its worker process ends with the iterator: now, not whenever a garbage collection frees the
        # exception's frames, which hold it (a live worker holds the pipes it inherited, the test
        # zygote's included, and the zygote would wait for it at the end of the session).
        del read_again, refused
        gc.collect()
