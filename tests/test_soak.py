"""Soak: many steps over a long stream with the disk cache; resident memory must stay flat.

Excluded from the default test command (`-m "not soak"`); run with `pytest -m soak`.
"""

from __future__ import annotations

import os

import lightning as L
import pytest

from lenscope.datamodules.lens_data import LensDataModule
from lenscope.training.lens_module import LensTrainingModule
from tests.conftest import write_corpus

pytestmark = pytest.mark.soak
STEPS = int(os.environ.get("LENSCOPE_SOAK_STEPS", "600"))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssProbe(L.Callback):
    def __init__(self):
        self.samples: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step % 50 == 0:
            self.samples.append((trainer.global_step, rss_mib()))


def test_resident_memory_stays_flat(tmp_path, tiny_model_dir):
    # Far more documents than the run reads: every batch is new, every batch goes to the disk cache.
    corpus = write_corpus(tmp_path / "big.jsonl", 40_000, words=(40, 120))
    module = LensTrainingModule(base=str(tiny_model_dir), lens_dtype="float32", cache="disk",
                                cache_dir=str(tmp_path / "cache"))
    data = LensDataModule(source=str(corpus), seq_len=64, batch_size=8, val_max_docs=4, num_workers=1)
    probe = RssProbe()
    trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, val_check_interval=STEPS, check_val_every_n_epoch=None,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[probe])
    trainer.fit(module, datamodule=data)
    shards = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(shards) >= STEPS - 1, "every batch was cached on disk"
    warm = [rss for step, rss in probe.samples if step >= 100]
    growth = max(warm) - min(warm)
    print(f"\nresident memory after warm-up: {min(warm):.0f}-{max(warm):.0f} MiB over {STEPS} steps "
          f"({len(shards)} cache shards, {sum(p.stat().st_size for p in shards) / 2**20:.0f} MiB on disk)")
    assert growth < 64, f"resident memory grew by {growth:.0f} MiB: {probe.samples}"
