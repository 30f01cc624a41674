"""Multi-process training on Lightning's own DDP (gloo on this CPU machine)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from lenscope.lenses.artifact import load_lens
from tests.conftest import fit_args, write_corpus

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed


def strategy_config(tmp_path: Path, strategy: str) -> Path:
    """``configs/trainer/<strategy>.yaml``; for FSDP with Lightning's strategy class swapped for its
    CPU-enabled subclass (tests/cpu_fsdp.py), everything else as shipped."""
    shipped = ROOT / "configs" / "trainer" / f"{strategy}.yaml"
    if strategy != "fsdp":
        return shipped
    config = yaml.safe_load(shipped.read_text())
    assert config["trainer"]["strategy"]["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    config["trainer"]["strategy"]["class_path"] = "tests.cpu_fsdp.CPUFSDPStrategy"
    path = tmp_path / "fsdp_on_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


_zygote = None


@pytest.fixture(autouse=True)
def _use_the_zygote(zygote):
    """Every run below is forked from the test zygote (rank 0; Lightning starts the other ranks as
    fresh interpreters, as in production)."""
    global _zygote
    _zygote = zygote


def run_train(args: list[str], cwd: Path, timeout: float = 300, succeed: bool = True, script: str = "train.py",
              env: dict | None = None) -> str:
    """``train.py`` (or ``script``) in a process group of its own, so that a hang (ranks waiting on
    each other) fails the test after ``timeout`` seconds and leaves no rank behind. Asserts it exits
    with 0 (``succeed``) or with an error; returns its stderr."""
    result = _zygote.run(ROOT / script, args, cwd, {**os.environ, "LENSCOPE_COMPILE": "0", "PYTHONPATH": str(ROOT),
                                                    **(env or {})}, timeout=timeout, session=True)
    if result.timed_out:
        pytest.fail(f"{script} {' '.join(args[:1])} hung for {timeout} s: {result.stderr[-2000:]}")
    assert (result.returncode == 0) == succeed, result.stderr[-3000:]
    return result.stderr


def fit(tmp_path: Path, model_dir: Path, corpus: Path, devices: int, batch_size: int, strategy: str = "ddp",
        lens_type: str = "tuned") -> Path:
    out = tmp_path / f"{strategy}{devices}"
    run_train([
        "fit", "--config", str(ROOT / "configs/debug/fast.yaml"),
        *(["--config", str(strategy_config(tmp_path, strategy))] if devices > 1 else []),
        "--model.base.name", str(model_dir), "--data.source", str(corpus),
        # Trimming gives one sample (one read position) per document, so a global batch is the same
        # set of documents however it is split across ranks, and every rank has as many tokens.
        "--data.mode", "trim", "--data.seq_len", "64", "--data.batch_size", str(batch_size),
        "--trainer.devices", str(devices), "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(out),
        "--trainer.callbacks+=lenscope.training.callbacks.LensArtifactWriter", f"--trainer.callbacks.dirpath={out / 'out'}",
        "--model.lens_type", lens_type,
    ], cwd=tmp_path)
    return out / "out" / lens_type


@pytest.mark.parametrize("strategy, lens_type", [("ddp", "tuned"), ("fsdp", "tuned"), ("ddp", "affine")])
def test_two_processes_train_the_same_lens_as_one_process(tmp_path, tiny_model_dir, corpus, strategy, lens_type):
    """DDP replicates the frozen model; FSDP shards its blocks (gathered as each runs, through the
    nnsight hooks) and keeps the lenses whole with their gradients all-reduced: the same lens. The
    least-squares lens sums every rank's normal equations before solving: the same fit."""
    one_dir = fit(tmp_path, tiny_model_dir, corpus, devices=1, batch_size=8, lens_type=lens_type)
    two_dir = fit(tmp_path, tiny_model_dir, corpus, devices=2, batch_size=4, strategy=strategy, lens_type=lens_type)
    one, two = load_lens(one_dir), load_lens(two_dir)
    assert one.weight.abs().max() > 1e-6, "the lens must have trained"
    torch.testing.assert_close(one.weight, two.weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(one.bias, two.bias, atol=1e-5, rtol=0)
    # Validation is split across the ranks and its metrics reduced: the same held-out numbers.
    a = json.loads((one_dir.parent / "results.json").read_text())
    b = json.loads((two_dir.parent / "results.json").read_text())
    for lens in ("logit", lens_type):
        for metric in ("kl_nats", "ce_nats"):
            assert b[lens][metric] == pytest.approx(a[lens][metric], rel=1e-3), (lens, metric)


@pytest.mark.parametrize("strategy, lens_type", [("ddp", "tuned"), ("fsdp", "tuned"), ("fsdp", "affine")])
def test_two_process_run_resumes_exactly(tmp_path, tiny_model_dir, corpus, strategy, lens_type):
    """A 2-process run resumed from its step-4 checkpoint ends with the lens of the uninterrupted
    run: optimizer, schedule, each rank's own place in its share of the data (Lightning keeps rank
    0's alone), and for the least-squares lens the fit so far of all ranks. Under FSDP the
    checkpoint is the lenses alone: no block is gathered for it."""
    two = ("--config", str(strategy_config(tmp_path, strategy)), "--trainer.devices", "2",
           "--model.lens_type", lens_type)
    full = tmp_path / "full"
    run_train(fit_args(full, tiny_model_dir, corpus, *two, steps=6, checkpoint=(
        "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename={step}")), cwd=tmp_path)
    step4 = torch.load(full / "ckpt" / "step=4.ckpt", weights_only=False)
    assert set(step4["state_dict"]) == {f"lenses.{lens_type}.weight", f"lenses.{lens_type}.bias"}
    positions = [state[0]["dataset_state"] for state in step4["lenscope"]["loader_state_by_rank"]]
    assert len(positions) == 2 and positions[0] != positions[1], "each rank is somewhere else in its share"
    part = tmp_path / "part"
    (part / "ckpt").mkdir(parents=True)
    shutil.copy(full / "ckpt" / "step=4.ckpt", part / "ckpt" / "last.ckpt")
    run_train(fit_args(part, tiny_model_dir, corpus, *two, "--ckpt_path", "last", steps=6), cwd=tmp_path)
    a, b = load_lens(full / "out" / lens_type), load_lens(part / "out" / lens_type)
    torch.testing.assert_close(a.weight, b.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.bias, b.bias, atol=1e-6, rtol=0)
    assert (step4["state_dict"][f"lenses.{lens_type}.weight"] - a.weight).abs().max() > 1e-5, "the last steps must count"
    if strategy == "ddp":  # resuming on another number of processes cannot put each share back
        stderr = run_train(fit_args(part, tiny_model_dir, corpus, "--ckpt_path", "last", steps=8), cwd=tmp_path,
                           succeed=False)
        assert "Traceback" not in stderr
        assert "written by 2 processes and this run has 1" in stderr.strip().splitlines()[-1]


def test_fsdp_ranks_run_the_model_together_when_their_cache_hits_differ(tmp_path, tiny_model_dir):
    """A tiny corpus makes each rank's share repeat at its own pace, so one rank's batch is cached
    while the other's is not. Under FSDP both must still run the model (its forward gathers the
    blocks from both), and the cached states must train the same lens as no cache."""
    small = write_corpus(tmp_path / "small.jsonl", 9, seed=3)
    fsdp = ("--config", str(strategy_config(tmp_path, "fsdp")), "--trainer.devices", "2")
    record = ("--trainer.callbacks+=tests.cpu_fsdp.CacheHitRecorder", f"--trainer.callbacks.dirpath={tmp_path / 'hits'}")
    # From zero: a warm start's batches would fill both ranks' caches before the first recorded step.
    fsdp = (*fsdp, "--model.warm_start_batches", "0")
    run_train(fit_args(tmp_path / "cached", tiny_model_dir, small, *fsdp, *record, steps=12), cwd=tmp_path)
    hits = [json.loads((tmp_path / "hits" / f"hits_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(hits[0]) == len(hits[1]) == 12
    # What the test is about: some step where one rank's batch was cached and the other's was not.
    assert any(a != b for a, b in zip(*hits, strict=True)), hits
    run_train(fit_args(tmp_path / "uncached", tiny_model_dir, small, *fsdp, "--model.cache", "none", steps=12),
              cwd=tmp_path)
    a, b = load_lens(tmp_path / "cached" / "out" / "tuned"), load_lens(tmp_path / "uncached" / "out" / "tuned")
    torch.testing.assert_close(a.weight, b.weight, atol=0, rtol=0)


def test_learned_prompt_under_fsdp_is_refused_with_one_line(tmp_path, tiny_model_dir, corpus):
    """Its passes through the frozen model depend on each rank's batch: under FSDP ranks would hang."""
    args = fit_args(tmp_path, tiny_model_dir, corpus, "--config", str(strategy_config(tmp_path, "fsdp")),
                    "--trainer.devices", "2", "--model.lens_type", "learned_prompt", "--model.offsets", "[1]")
    stderr = run_train(args, cwd=tmp_path, succeed=False)
    assert "Traceback" not in stderr
    # One line, from before Lightning starts the second rank (not one per rank, racing each other).
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        "error: --model.lens_type learned_prompt cannot train under FSDP (configs/trainer/fsdp.yaml); "
        "use configs/trainer/ddp.yaml"]


def test_fsdp_policy_shards_the_frozen_blocks_and_keeps_the_lenses_whole(tiny_model_dir):
    from torch.distributed.fsdp import ShardingStrategy

    from lenscope.training.fsdp import LensShardingPolicy
    from lenscope.training.lens_module import LensTrainingModule

    module = LensTrainingModule(base=str(tiny_model_dir), offsets=[0, 1])
    units = LensShardingPolicy()._run_policy(module, set(), {"sharding_strategy": ShardingStrategy.FULL_SHARD})
    blocks = list(module.frozen.adapter.blocks)
    assert set(units) == {*blocks, module.base}
    assert all(units[b]["sharding_strategy"] == ShardingStrategy.FULL_SHARD for b in blocks)
    # The rest of the frozen model (embeddings, final norm, head) is one whole unit, so that the
    # root unit, which the step runs in and whose gradients are all-reduced, holds the lenses alone.
    assert units[module.base]["sharding_strategy"] == ShardingStrategy.NO_SHARD
    assert not any(lens in units for lens in module.lenses.modules())


def test_fsdp_config_parses_and_names_the_policy(tmp_path, tiny_model_dir, corpus):
    result = _zygote.run(ROOT / "train.py", [
        "fit", "--config", str(ROOT / "configs/debug/fast.yaml"), "--config", str(ROOT / "configs/trainer/fsdp.yaml"),
        "--model.base.name", str(tiny_model_dir), "--data.source", str(corpus), "--print_config"], tmp_path, dict(os.environ))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lightning.pytorch.strategies.FSDPStrategy" in result.stdout
    assert "lenscope.training.fsdp.LensShardingPolicy" in result.stdout


def evaluate_run(tmp_path: Path, model_dir: Path, corpus: Path, devices: int) -> dict:
    out = tmp_path / f"eval{devices}"
    run_train([
        "--config", str(ROOT / "configs/eval/patchscopes.yaml"),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
        "--trainer.devices", str(devices), *(["--trainer.strategy", "ddp"] if devices > 1 else []),
        "--model.base.name", str(model_dir), "--model.output_dir", str(out), "--data.source", str(corpus),
        "--data.n_fit", "40", "--data.n_eval", "25", "--data.batch_size", "4",
    ], cwd=tmp_path, timeout=600, script="evaluate.py")
    return json.loads((out / "results.json").read_text())


def test_two_process_evaluation_gives_the_same_numbers_as_one(tmp_path, tiny_model_dir, corpus):
    """Each rank evaluates its own documents and fits on its own share of the fitting documents;
    the affine normal equations and the metric states are summed across ranks."""
    one = evaluate_run(tmp_path, tiny_model_dir, corpus, devices=1)
    two = evaluate_run(tmp_path, tiny_model_dir, corpus, devices=2)
    assert two["counts"] == one["counts"] and one["counts"]["precision@1"]["logit"] == 25  # odd: uneven shards
    for metric, by_method in one["metrics"].items():
        for method, values in by_method.items():
            assert two["metrics"][metric][method] == pytest.approx(values, abs=1e-6), (metric, method)
