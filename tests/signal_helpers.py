"""A callback for the stop tests, given to ``train.py`` on its command line: it holds training at
chosen step ends until the process has received the signal the test sends, so that every stop
happens at a known step, whatever the machine's speed (no timing in the tests)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L

from lenscope.training.stops import STATE


class HoldAtSteps(L.Callback):
    def __init__(self, marker_dir: str, steps: list[int] = (), batches: list[int] = (), limit_s: float = 600.0):
        """At the end of each step in ``steps`` (optimizer steps) and of each batch in ``batches``
        (counted from this process's first), touch ``<marker_dir>/step-<n>`` / ``batch-<n>`` and
        wait until a stop or requeue signal has arrived (at most ``limit_s``, then fail rather than hang)."""
        self.marker_dir = Path(marker_dir)
        self.steps = set(steps)
        self.batches = set(batches)
        self.batches_seen = 0
        self.held_steps: set[int] = set()
        self.limit_s = limit_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches_seen += 1
        step = trainer.global_step
        if self.batches_seen in self.batches:
            self._hold(f"batch-{self.batches_seen}")
        elif step in self.steps and step not in self.held_steps:  # a step's end, not a later micro-batch
            self.held_steps.add(step)
            self._hold(f"step-{step}")

    def _hold(self, name: str) -> None:
        seen = (STATE.pending, len(STATE.requeue))
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        (self.marker_dir / name).touch()
        deadline = time.monotonic() + self.limit_s
        while (STATE.pending, len(STATE.requeue)) == seen:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no signal arrived at {name} within {self.limit_s} s")
            time.sleep(0.01)
