"""Stopping a run on a signal: SIGTERM (what SLURM and other schedulers send before pre-emption),
Ctrl-C (SIGINT), and SLURM's requeue signal.

Training stops at the end of the optimizer step in progress (with gradient accumulation: the end of
the accumulation; at a step that validates: the end of the validation), writes ``last.ckpt`` into
the run's checkpoint folder, and the command exits with status 128 + the signal's number and one
line::

    error: stopped by SIGTERM at step 37; resume with --ckpt_path last

Everywhere else (loading the model, ``validate``, ``evaluate.py``) there is nothing to keep and the
run stops at once, with the same kind of line. A second Ctrl-C also stops at once.

Lightning handles SIGTERM itself by stopping at the end of the batch *without* a checkpoint and
then exiting with status 0, as if the run had finished; under several processes it broadcasts from
inside the signal handler. While lenscope trains, its own handler replaces Lightning's, and the
ranks agree at each step end (one all-reduce) on whether any of them was signalled, so they stop
together at the same step.

SLURM requeue stays Lightning's own plugin (``SLURMEnvironment(auto_requeue=True)``, on by default
under SLURM): its handler for the requeue signal writes ``hpc_ckpt_<n>.ckpt`` into
``--trainer.default_root_dir`` and calls ``scontrol requeue``, and the requeued job resumes from that
checkpoint by itself. lenscope only defers that handler to the end of the step in progress, so the
checkpoint is taken between steps (exact resume), never in the middle of one.

Data-loader workers ignore SIGINT and SIGTERM (``lenscope.datamodules.lens_data.WorkerSignals``): a signal sent to the whole
process group (Ctrl-C in a terminal, ``scancel``) is the main process's to handle; a worker that died
of it would make the main process fail with a traceback instead of stopping cleanly.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class StoppedBySignal(BaseException):
    """Raised to end a run on a signal. A ``BaseException`` (like ``KeyboardInterrupt``) so that no
    ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class _State:
    """The process's pending stop: set by the handler, read at step ends."""

    def __init__(self) -> None:
        self.pending: int | None = None  # a stop signal received while training
        self.requeue: list[int] = []  # requeue signals received while training, handled at the step end
        self.graceful = False  # a training step is running: stop at its end
        self.after_last_step = False  # training is done: its final validation and artifact are being written
        self.where = "before training started; nothing was trained"


STATE = _State()


def _say(text: str) -> None:
    # A signal handler may interrupt a print in progress: write to the file descriptor directly.
    os.write(2, (text + "\n").encode(errors="replace"))


def _on_stop_signal(signum, frame) -> None:
    if STATE.graceful and STATE.pending is None:
        STATE.pending = signum
        if STATE.after_last_step:
            plan = "training is done: finishing its validation and writing its results"
        else:
            plan = "stopping at the end of this step and writing a checkpoint"
        _say(f"{signal_name(signum)} received: {plan} (a second signal stops at once)")
        return
    raise StoppedBySignal(signum, f"stopped by {signal_name(signum)} {STATE.where}")


def install_handlers(where: str) -> None:
    """Process-wide handlers for SIGTERM and SIGINT (entry points call this first); ``where`` ends
    the line printed for a stop outside training ("during the evaluation; ...")."""
    STATE.where = where
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread (e.g. a notebook's worker)
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_stop_signal)


_deferred: dict[int, object] = {}
"""The handlers Lightning set for the requeue signals, run at the end of the step instead."""


def _defer_requeue(signum, frame) -> None:
    STATE.requeue.append(signum)


class GracefulStop(L.Callback):
    """Stops training at the end of a step on SIGTERM / SIGINT, with a checkpoint; runs SLURM's
    requeue handler between steps. ``train.py`` adds it to every run."""

    def __init__(self) -> None:
        self.saved_step: int | None = None
        self._seen_step: int | None = None
        self._after_validation: tuple[int, int] | None = None  # (stop, requeue) signals agreed at a validating step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning has installed its own handlers by now (``_SignalConnector``): take over
        # SIGTERM and SIGINT, defer whatever it set for the requeue signals. Lightning restores
        # what was there before the run when it ends.
        self._seen_step = trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            signal.signal(signum, _on_stop_signal)
        for signum in REQUEUE_SIGNALS:
            handler = signal.getsignal(signum)
            if callable(handler) and handler is not _defer_requeue:
                _deferred[signum] = handler
                signal.signal(signum, _defer_requeue)
        STATE.pending, STATE.requeue, STATE.graceful, STATE.after_last_step = None, [], True, False
        STATE.where = f"at step {trainer.global_step}"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        STATE.graceful = False
        STATE.where = "after training, before its results were written"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        STATE.graceful = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._seen_step:
            return  # inside a gradient accumulation: no optimizer step yet, nothing a checkpoint could resume
        self._seen_step = trainer.global_step
        STATE.where = f"at step {trainer.global_step}" + (
            f" (last checkpoint: step {self.saved_step})" if self.saved_step is not None else " (no checkpoint yet)")
        if trainer.global_step >= trainer.max_steps:
            STATE.after_last_step = True  # the run finishes normally, results and artifact included
            return
        signals = self._agreed(trainer, [STATE.pending or 0, STATE.requeue[0] if STATE.requeue else 0])
        if not any(signals):
            return
        if self._validates_now(trainer):
            # Lightning validates after this hook; a checkpoint taken now would resume past that
            # validation without running it. Act once it is done (on_validation_end).
            self._after_validation = (signals[0], signals[1])
            return
        self._act(trainer, *signals)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._after_validation is not None and not trainer.sanity_checking:
            signals, self._after_validation = self._after_validation, None
            self._act(trainer, *signals)

    def _act(self, trainer: L.Trainer, signum: int, requeue: int) -> None:
        """On every process alike: run SLURM's requeue handler, then stop with a checkpoint."""
        if requeue:
            STATE.requeue = []
            handler = _deferred.get(requeue)
            if callable(handler):
                handler(requeue, None)  # Lightning's handler saves collectively
        if not signum:
            return
        STATE.graceful = False
        path = self._last_checkpoint_path(trainer)
        if path is not None:
            trainer.save_checkpoint(path, weights_only=False)
            stop = f"stopped by {signal_name(signum)} at step {trainer.global_step}; resume with --ckpt_path last"
        else:
            stop = (f"stopped by {signal_name(signum)} at step {trainer.global_step}; the run has no checkpoint "
                    "folder (--trainer.enable_checkpointing false), so it cannot be resumed")
        raise StoppedBySignal(signum, stop)

    @staticmethod
    def _validates_now(trainer: L.Trainer) -> bool:
        """Whether Lightning runs a validation right after this step (every ``val_check_batch``
        batches; lenscope's training stream is one endless epoch)."""
        every = trainer.val_check_batch
        if not trainer.limit_val_batches or not isinstance(every, int):
            return False
        return (trainer.global_step * trainer.accumulate_grad_batches) % every == 0

    @staticmethod
    def _agreed(trainer: L.Trainer, values: list[int]) -> list[int]:
        """Each of ``values``, the largest over all processes (0: no process was signalled)."""
        if trainer.world_size == 1:
            return values
        local = torch.tensor([float(v) for v in values], device=trainer.strategy.root_device)
        return [int(v) for v in trainer.strategy.reduce(local, reduce_op="max").tolist()]

    @staticmethod
    def _last_checkpoint_path(trainer: L.Trainer) -> Path | None:
        """``last.ckpt`` in the run's checkpoint folder, where ``--ckpt_path last`` finds it."""
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                return Path(callback.dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
        return None
