"""Runs that are killed, or fail to write, lose nothing: exact resume and intact checkpoints.

Every run is ``train.py`` in a process of its own, forked from the test zygote (tests/zygote.py)
rather than started as a fresh interpreter: the same process, signals and exit status, without
paying the imports each time."""

from __future__ import annotations

import errno
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from lenscope.lenses.artifact import load_lens
from lenscope.training.checkpoint_io import HOLD_ENV, AtomicCheckpointIO, CheckpointWriteError
from tests.conftest import fit_args
from tests.zygote import Spawned

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.subprocess
STEPS = 24


_zygote = None


@pytest.fixture(autouse=True)
def _use_the_zygote(zygote):
    _set_zygote(zygote)


def _set_zygote(zygote) -> None:
    global _zygote
    _zygote = zygote


def command(out: Path, model_dir: Path, corpus: Path, *extra: str, checkpoint_every: int = 1) -> list[str]:
    """``train.py``'s arguments for a run writing under ``out``."""
    return [*fit_args(
        out, model_dir, corpus,
        "--data.num_workers", "1",  # the data position lives in a worker process: the hard case
        # W&B runs disabled (WANDB_MODE in ENV): the run id still travels through the checkpoints.
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
        f"--trainer.logger.save_dir={out / 'wb'}", "--trainer.logger.project=lenscope-test",
        *extra, steps=STEPS, checkpoint_every=checkpoint_every,
    )]


def spawn(args: list[str], env: dict, cwd: Path) -> Spawned:
    """``train.py args`` started in its own process group, as a terminal or a scheduler starts it:
    signals to the group reach its data-loader workers too."""
    return _zygote.spawn(ROOT / "train.py", args, cwd, env, session=True)


ENV = {**os.environ, "LENSCOPE_COMPILE": "0", "WANDB_MODE": "disabled"}


def run_to_end(args: list[str], cwd: Path, env: dict | None = None) -> None:
    result = _zygote.run(ROOT / "train.py", args, cwd, env or ENV, timeout=600, session=True)
    assert result.returncode == 0 and not result.timed_out, result.stderr[-3000:]


def saved_step(path: Path) -> int:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["global_step"]
    except Exception:  # not there yet
        return -1


def wandb_run_id(path: Path) -> str | None:
    return torch.load(path, map_location="cpu", weights_only=False)["lenscope"].get("wandb_run_id")


def kill_when(args: list[str], ready, env: dict, cwd: Path) -> None:
    process = spawn(args, env, cwd)
    try:
        deadline = time.monotonic() + 300  # a guard against a hang, not a timing assumption
        while not ready():
            assert process.poll() is None, f"the run ended before it could be killed: {process.stderr()[-3000:]}"
            assert time.monotonic() < deadline, "timed out waiting for the kill point"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)  # the trainer alone, as the OOM killer would
    finally:
        process.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, zygote):
    from tests.conftest import write_corpus

    _set_zygote(zygote)  # module fixtures run before the autouse one

    base = tmp_path_factory.mktemp("uninterrupted")
    corpus = write_corpus(base / "corpus.jsonl", 120)
    run_to_end(command(base / "run", tiny_model_dir, corpus), base)
    return corpus, load_lens(base / "run" / "out" / "tuned")


def assert_same_lens(a, b) -> None:
    torch.testing.assert_close(a.weight, b.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.bias, b.bias, atol=1e-6, rtol=0)


def test_sigkill_at_a_random_step_then_resume(tmp_path, tiny_model_dir, uninterrupted):
    corpus, reference = uninterrupted
    kill_at = random.Random(7).randrange(3, STEPS - 6)
    out = tmp_path / "run"
    last = out / "ckpt" / "last.ckpt"
    # Held at the end of step kill_at (tests/signal_helpers.py), before that step's checkpoint is written.
    markers = tmp_path / "markers"
    kill_when(command(out, tiny_model_dir, corpus, *hold_at(markers, kill_at)),
              lambda: (markers / f"step-{kill_at}").exists(), ENV, tmp_path)
    assert saved_step(last) == kill_at - 1
    run_id = wandb_run_id(last)
    run_to_end(command(out, tiny_model_dir, corpus, "--ckpt_path", "last"), tmp_path)
    assert_same_lens(reference, load_lens(out / "out" / "tuned"))
    # The resumed run logs into the same W&B run: it was handed the id, and keeps it.
    assert run_id and wandb_run_id(last) == run_id


def test_sigkill_during_a_checkpoint_write_then_resume(tmp_path, tiny_model_dir, uninterrupted):
    corpus, reference = uninterrupted
    out = tmp_path / "run"
    ckpt_dir = out / "ckpt"
    # The step-4 checkpoint is written to its temporary file, then the writer holds (HOLD_ENV) until killed.
    held = {**ENV, HOLD_ENV: "4"}

    def writing_step_4() -> bool:
        return any(ckpt_dir.glob(".last.ckpt.*.tmp.held"))

    kill_when(command(out, tiny_model_dir, corpus), writing_step_4, held, tmp_path)
    assert saved_step(ckpt_dir / "last.ckpt") == 3, "the previous checkpoint must be intact and loadable"
    run_to_end(command(out, tiny_model_dir, corpus, "--ckpt_path", "last"), tmp_path)
    assert_same_lens(reference, load_lens(out / "out" / "tuned"))


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(CheckpointWriteError, match="the disk is full"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary file left behind"


def test_a_damaged_checkpoint_is_refused_with_one_line(tmp_path, tiny_model_dir, uninterrupted):
    corpus, _ = uninterrupted
    out = tmp_path / "run"
    (out / "ckpt").mkdir(parents=True)
    (out / "ckpt" / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")
    result = _zygote.run(ROOT / "train.py", command(out, tiny_model_dir, corpus, "--ckpt_path", "last"), tmp_path, ENV,
                         timeout=600, session=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "does not load" in result.stderr and "pass an earlier --ckpt_path" in result.stderr


WRITE_SHARDS = """
import sys
import torch
from lenscope.model.hidden_cache import HiddenStateCache, batch_key

directory, seed = sys.argv[1], int(sys.argv[2])
cache = HiddenStateCache("disk", directory, manifest={"same": "settings"})
for i in range(40):  # both writers write the same keys, in different orders
    j = i if seed == 0 else 39 - i
    cache.put(batch_key(torch.tensor([j])), torch.full((2, 64, 16), float(j)))
"""


def test_two_processes_writing_one_disk_cache_do_not_corrupt_it(tmp_path):
    from lenscope.model.hidden_cache import HiddenStateCache, batch_key

    script = tmp_path / "write_shards.py"
    script.write_text(WRITE_SHARDS)
    writers = [_zygote.spawn(script, [str(tmp_path / "cache"), str(seed)], tmp_path / f"w{seed}", ENV) for seed in (0, 1)]
    for w in writers:
        result = w.wait(timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
    cache = HiddenStateCache("disk", tmp_path / "cache", manifest={"same": "settings"})
    for j in range(40):
        states = cache.get(batch_key(torch.tensor([j])), torch.device("cpu"))
        assert states is not None and torch.equal(states, torch.full((2, 64, 16), float(j)))
    assert not list((tmp_path / "cache").glob(".*")), "no temporary files left behind"


# --- stops by signal ---------------------------------------------------------------------------------
def hold_at(markers: Path, *steps: int) -> list[str]:
    """Arguments adding ``tests.signal_helpers.HoldAtSteps``: training waits at these step ends
    until the signal the test sends has arrived, so the stop step is known on any machine."""
    return ["--trainer.callbacks+=tests.signal_helpers.HoldAtSteps", f"--trainer.callbacks.marker_dir={markers}",
            f"--trainer.callbacks.steps=[{', '.join(map(str, steps))}]"]


def signal_at_marker(process: Spawned, marker: Path, signum: int) -> None:
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert process.poll() is None, f"the run ended before {marker.name}: {process.stderr()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {marker.name}"
        time.sleep(0.02)
    os.killpg(process.pid, signum)


STOP_CASES = {
    "SIGTERM": (signal.SIGTERM, []),
    "SIGINT": (signal.SIGINT, []),
    # Step 8 validates (after the step's end hook): the stop waits for the validation to finish.
    "SIGTERM-at-a-validating-step": (signal.SIGTERM, ["--trainer.val_check_interval", "8"]),
}


@pytest.mark.parametrize("case", list(STOP_CASES))
def test_a_signal_to_the_process_group_stops_with_a_checkpoint_then_resumes_exactly(
        tmp_path, tiny_model_dir, uninterrupted, case):
    corpus, reference = uninterrupted
    signum, extra = STOP_CASES[case]
    step = 8 if extra else 7
    out = tmp_path / "run"
    # Scheduled checkpoints every 5 steps; the stop must write its own.
    process = spawn(command(out, tiny_model_dir, corpus, *extra, *hold_at(tmp_path / "markers", step),
                            checkpoint_every=5), ENV, tmp_path)
    signal_at_marker(process, tmp_path / "markers" / f"step-{step}", signum)
    stderr = process.wait(timeout=300).stderr
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: stopped by {name} at step {step}; resume with --ckpt_path last"], stderr[-3000:]
    assert saved_step(out / "ckpt" / "last.ckpt") == step
    assert not (out / "out" / "tuned").exists(), "a stopped run writes no lens artifact"
    run_to_end(command(out, tiny_model_dir, corpus, *extra, "--ckpt_path", "last", checkpoint_every=5), tmp_path)
    assert_same_lens(reference, load_lens(out / "out" / "tuned"))


def test_a_stop_during_gradient_accumulation_waits_for_the_optimizer_step(tmp_path, tiny_model_dir):
    """Two batches per step: the signal arrives after a step's first batch, and the stop comes at the
    end of that step, so the checkpoint holds no half-accumulated gradient and the resumed run is exact."""
    from tests.conftest import write_corpus

    corpus = write_corpus(tmp_path / "corpus.jsonl", 120)
    accumulate = ["--trainer.accumulate_grad_batches", "2", "--trainer.val_check_interval", str(2 * STEPS)]
    run_to_end(command(tmp_path / "full", tiny_model_dir, corpus, *accumulate), tmp_path)
    out = tmp_path / "run"
    # Batch 11 is the first of step 6's two: held there, the stop comes at the end of step 6.
    hold = ["--trainer.callbacks+=tests.signal_helpers.HoldAtSteps", f"--trainer.callbacks.marker_dir={tmp_path / 'm'}",
            "--trainer.callbacks.batches=[11]"]
    process = spawn(command(out, tiny_model_dir, corpus, *accumulate, *hold, checkpoint_every=4), ENV, tmp_path)
    signal_at_marker(process, tmp_path / "m" / "batch-11", signal.SIGTERM)
    stderr = process.wait(timeout=300).stderr
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM at step 6;" in stderr
    assert saved_step(out / "ckpt" / "last.ckpt") == 6
    run_to_end(command(out, tiny_model_dir, corpus, *accumulate, "--ckpt_path", "last", checkpoint_every=4), tmp_path)
    assert_same_lens(load_lens(tmp_path / "full" / "out" / "tuned"), load_lens(out / "out" / "tuned"))


def test_slurm_requeue_checkpoints_between_steps_and_the_requeued_job_resumes_exactly(
        tmp_path, tiny_model_dir, uninterrupted):
    """Lightning's own SLURM plugin (auto-requeue, on by default under SLURM), on a simulated SLURM
    job: the requeue signal is handled at a step end, writes ``hpc_ckpt_1.ckpt`` and calls
    ``scontrol requeue``; the job is then stopped by SIGTERM, and the same command, started again
    by SLURM without --ckpt_path, resumes from the requeue checkpoint."""
    corpus, reference = uninterrupted
    out = tmp_path / "run"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(0o755)
    slurm = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_JOB_NAME": "lenscope-test", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_NNODES": "1"}
    cmd = command(out, tiny_model_dir, corpus, "--trainer.default_root_dir", str(out / "root"), checkpoint_every=5)
    process = spawn([*cmd, *hold_at(tmp_path / "markers", 9, 11)], slurm, tmp_path)
    signal_at_marker(process, tmp_path / "markers" / "step-9", signal.SIGUSR1)
    signal_at_marker(process, tmp_path / "markers" / "step-11", signal.SIGTERM)
    stderr = process.wait(timeout=300).stderr
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert saved_step(out / "root" / "hpc_ckpt_1.ckpt") == 9
    run_to_end(cmd, tmp_path, env=slurm)  # the requeued job: same command, no --ckpt_path
    assert_same_lens(reference, load_lens(out / "out" / "tuned"))
