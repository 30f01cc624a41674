"""Multi-process training on Lightning's own DDP (gloo on this CPU machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lenses.artifact import load_lens

ROOT = Path(__file__).resolve().parents[1]


def fit(tmp_path: Path, model_dir: Path, corpus: Path, devices: int, batch_size: int) -> Path:
    out = tmp_path / f"ddp{devices}"
    cmd = [
        sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs/debug/fast.yaml"),
        "--config", str(ROOT / "configs/trainer/ddp.yaml"),
        "--model.name", str(model_dir), "--data.source", str(corpus),
        # Trimming gives one sample (one read position) per document, so a global batch is the same
        # set of documents however it is split across ranks, and every rank has as many tokens.
        "--data.mode", "trim", "--data.seq_len", "64", "--data.batch_size", str(batch_size),
        "--trainer.devices", str(devices), "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(out),
        "--trainer.callbacks+=training.callbacks.LensArtifactWriter", f"--trainer.callbacks.dirpath={out / 'out'}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "LENSCOPE_COMPILE": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "out" / "tuned"


def test_two_process_ddp_trains_the_same_lens_as_one_process(tmp_path, tiny_model_dir, corpus):
    one_dir = fit(tmp_path, tiny_model_dir, corpus, devices=1, batch_size=8)
    two_dir = fit(tmp_path, tiny_model_dir, corpus, devices=2, batch_size=4)
    one, two = load_lens(one_dir), load_lens(two_dir)
    assert one.weight.abs().max() > 1e-6, "the lens must have trained"
    torch.testing.assert_close(one.weight, two.weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(one.bias, two.bias, atol=1e-5, rtol=0)
    # Validation is split across the ranks and its metrics reduced: the same held-out numbers.
    a = json.loads((one_dir.parent / "results.json").read_text())
    b = json.loads((two_dir.parent / "results.json").read_text())
    for lens in ("logit", "tuned"):
        for metric in ("kl_nats", "ce_nats"):
            assert b[lens][metric] == pytest.approx(a[lens][metric], rel=1e-3), (lens, metric)


def test_fsdp_policy_shards_the_frozen_blocks_and_keeps_the_lenses_whole(tiny_model_dir):
    from torch.distributed.fsdp import ShardingStrategy

    from training.fsdp import LensShardingPolicy
    from training.lens_module import LensTrainingModule

    module = LensTrainingModule(name=str(tiny_model_dir), offsets=[0, 1])
    units = LensShardingPolicy()._run_policy(module, set(), {"sharding_strategy": ShardingStrategy.FULL_SHARD})
    blocks = list(module.adapter.blocks)
    assert set(units) == {*blocks, module.lenses}
    assert all(units[b]["sharding_strategy"] == ShardingStrategy.FULL_SHARD for b in blocks)
    assert units[module.lenses]["sharding_strategy"] == ShardingStrategy.NO_SHARD
    # The head and final norm are in no unit of their own: they stay in the root, gathered per step.
    assert module.base.get_output_embeddings() not in units


def test_fsdp_config_parses_and_names_the_policy(tmp_path, tiny_model_dir, corpus):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs/debug/fast.yaml"),
         "--config", str(ROOT / "configs/trainer/fsdp.yaml"), "--model.name", str(tiny_model_dir),
         "--data.source", str(corpus), "--print_config"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lightning.pytorch.strategies.FSDPStrategy" in result.stdout
    assert "training.fsdp.LensShardingPolicy" in result.stdout


def evaluate_run(tmp_path: Path, model_dir: Path, corpus: Path, devices: int) -> dict:
    out = tmp_path / f"eval{devices}"
    cmd = [
        sys.executable, str(ROOT / "evaluate.py"), "--config", str(ROOT / "configs/eval/patchscopes.yaml"),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
        "--trainer.devices", str(devices), *(["--trainer.strategy", "ddp"] if devices > 1 else []),
        "--model.name", str(model_dir), "--model.output_dir", str(out), "--data.source", str(corpus),
        "--data.n_fit", "40", "--data.n_eval", "25", "--data.batch_size", "4",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "LENSCOPE_COMPILE": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
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
