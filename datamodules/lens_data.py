"""The ``LightningDataModule`` for lens training: stream, filter, shuffle, shard, tokenise, batch.

Pipeline (identical in every dataloader worker of every rank, so it needs no coordination):

1. read documents from the source in its fixed order, numbering them (``ordinal``);
2. hold out every ``holdout_every``-th document for validation (by ordinal, so the split does not
   depend on shuffling, workers or ranks);
3. in trimming mode, drop documents that are too long (Patchscopes filter);
4. shuffle with a seeded buffer (a buffer at least as large as the corpus is a full shuffle);
5. give the n-th surviving document to slot ``n mod (world_size × workers)``: each document is read
   by exactly one worker of one rank per pass;
6. tokenise (in the worker) and trim or pack.

The training stream repeats the same order pass after pass: that keeps batch counts equal across
DDP ranks (Lightning stops on ``max_steps``) and lets the hidden-state cache hit from the second
pass on. Each worker's position (pass, documents consumed, packing carry-over) is its state; the
``StatefulDataLoader`` puts it into every checkpoint and resumes from it, replaying the
deterministic stream up to that point without tokenising anything.

The state also holds a fingerprint of what the worker has read (``read_fingerprint``: its documents'
texts, chained in order) and of its whole share in the last complete pass. A resumed stream reads the
same documents again on its way to the position, and stops with one line if they are not the ones
the checkpoint's run read (a corpus edited in place, same path); each later pass is checked against
the one before it, so an edit anywhere in what was read is caught by the end of the pass at the latest.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import logging
import multiprocessing
import os
import random
import signal
from collections.abc import Iterator
from functools import partial

import lightning as L
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from lenscope.datamodules.preprocessing import (
    Packer,
    TrimSettings,
    collate,
    keep_for_trimming,
    token_ids,
    trim_sample,
)
from lenscope.datamodules.sources import DataSourceError, DocumentSource
from lenscope.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("pack", "trim")


def in_share(ordinal: int, holdout_every: int, held_out: bool) -> bool:
    """Whether document ``ordinal`` belongs to the held-out share (every ``holdout_every``-th
    document) or to the rest; ``holdout_every`` 0 keeps every document in both."""
    return not holdout_every or (ordinal % holdout_every == 0) == held_out


def bind_from_trainer(datamodule: L.LightningDataModule) -> None:
    """Bind a data module to the frozen model's tokenizer and context under a Trainer (the
    LightningModule's ``frozen``, a ``FrozenModel``), unless bound already."""
    if datamodule.tokenizer is not None:
        return
    module = datamodule.trainer.lightning_module if datamodule.trainer else None
    frozen = getattr(module, "frozen", None)
    if frozen is None:
        raise ConfigError(f"{type(datamodule).__name__}.bind(tokenizer, max_context) must be called before setup")
    datamodule.bind(frozen.tokenizer, frozen.context_length)


def _exit_if_main_is_exiting(main_exiting, signum, frame) -> None:
    if main_exiting.is_set():
        os._exit(0)


class WorkerSignals:
    """``worker_init_fn``: how a data-loader worker treats the signals that stop or requeue a run.

    Ctrl-C in a terminal, a scheduler's SIGTERM and SLURM's requeue signal (SIGUSR1 by default)
    reach every process of the job. The main process handles them (lenscope/training/stops.py): a worker
    dying of one, or running the main process's handler, would end the run with a traceback. So a
    worker ignores them, except for the SIGTERM with which the main process's own exit ends the
    workers still running: that one it obeys, once the main process has said it is exiting.
    """

    def __init__(self) -> None:
        self.main_exiting = multiprocessing.Event()
        # atexit runs its handlers last-registered first: this one before multiprocessing's own,
        # which terminates the remaining workers.
        atexit.register(self.main_exiting.set)

    def __call__(self, worker_id: int) -> None:
        for signum in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(signum, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, partial(_exit_if_main_is_exiting, self.main_exiting))


def seeded_shuffle(items: Iterator, buffer_size: int, seed: int) -> Iterator:
    """Buffered shuffle with its own RNG: the same input and seed give the same order."""
    rng = random.Random(seed)
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def read_fingerprint(before: str, text: str) -> str:
    """The fingerprint of a worker's documents so far, ``before``, followed by ``text`` (hex; "" for none).
    A chain rather than one running hash object, whose state a checkpoint could not hold."""
    chained = hashlib.sha256(bytes.fromhex(before))
    chained.update(text.encode("utf-8", "surrogatepass"))
    return chained.hexdigest()


class DocumentStream(IterableDataset):
    """Samples for one split, sharded across DDP ranks and dataloader workers, with resumable state."""

    def __init__(self, source: DocumentSource, tokenizer, *, split: str, mode: str, seq_len: int,
                 seed: int, shuffle_buffer: int, holdout_every: int, trim: TrimSettings,
                 repeat: bool, max_docs: int | None = None, rank: int = 0, world_size: int = 1):
        self.source = source
        self.tokenizer = tokenizer
        self.split = split
        self.mode = mode
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.holdout_every = holdout_every
        self.trim = trim
        self.repeat = repeat
        self.max_docs = max_docs
        self.rank = rank
        self.world_size = world_size
        self._state = self._start()
        self.pad_to = 0  # samples every slot of a finite split hands out, padding included (pad_shares)

    # --- state: read and written inside the worker by StatefulDataLoader -------------------------
    @staticmethod
    def _start(pass_index: int = 0, whole_pass: str | None = None) -> dict:
        """The state at the start of a pass: nothing of it read yet. ``read``: the fingerprint of the
        documents this slot has read in this pass (the one in progress included); ``whole_pass``:
        that of its whole share in the last complete pass (None before one)."""
        return {"pass": pass_index, "docs": 0, "within": 0, "carry": [], "read": "", "whole_pass": whole_pass}

    def state_dict(self) -> dict:
        return {**self._state, "carry": list(self._state["carry"])}

    def load_state_dict(self, state: dict) -> None:
        # A checkpoint from before fingerprints has no "read": nothing to compare.
        self._state = {"pass": state["pass"], "docs": state["docs"], "within": state.get("within", 0),
                       "carry": list(state["carry"]), "read": state.get("read"), "whole_pass": state.get("whole_pass")}

    # --- the pipeline ----------------------------------------------------------------------------
    def selected(self) -> Iterator[tuple[int, str]]:
        """(ordinal, text) of this split, after the trimming filter, in source order."""
        for ordinal, text in enumerate(self.source):
            # holdout_every 0: the source is used whole (training and validation come from
            # separate sources); otherwise every n-th document is validation, the rest training.
            if not in_share(ordinal, self.holdout_every, held_out=self.split == "val"):
                continue
            if self.mode == "trim" and not keep_for_trimming(text, self.trim):
                continue
            yield ordinal, text

    def documents(self) -> Iterator[tuple[int, str]]:
        """(ordinal, text) of this split after the shuffle, for every slot."""
        docs = seeded_shuffle(self.selected(), self.shuffle_buffer, self.seed)
        return itertools.islice(docs, self.max_docs) if self.max_docs else docs

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self) -> Iterator[dict]:
        slot, n_slots = self._slot()
        # The state says where the last sample handed out came from: ``docs`` of this slot's
        # documents were fully used, then ``within`` samples of the next one, which is re-packed
        # from ``carry`` (the packing buffer before it). A finite split is always read whole.
        state = self._state if self.repeat else self._start()
        start_pass, skip_docs = state["pass"], state["docs"]
        skip_within, carry = state.get("within", 0), state["carry"]
        # The documents the checkpoint had read in its pass (the one it stopped inside included),
        # and their fingerprint then: read again on the way to the position, they must be the same.
        resume_at, expected, whole_pass = skip_docs + (1 if skip_within else 0), state.get("read"), state.get("whole_pass")
        passes = itertools.count(start_pass) if self.repeat else range(1)
        for pass_index in passes:
            resumed = skip_docs > 0 or skip_within > 0
            packer = Packer(self.seq_len, self.tokenizer.eos_token_id, carry)
            owned = produced = 0
            read = ""
            for n, (ordinal, text) in enumerate(self.documents()):
                if n % n_slots != slot:
                    continue
                owned += 1
                read = read_fingerprint(read, text)
                if owned == resume_at and expected is not None and read != expected:
                    self._refuse_changed(slot, n_slots, f"the {resume_at} documents the checkpoint's run had read")
                if owned <= skip_docs:  # resuming: used before the checkpoint, not even tokenised
                    continue
                carry_before = list(packer.buffer)
                for j, sample in enumerate(self._samples(ordinal, text, packer)):
                    produced += 1
                    if owned == skip_docs + 1 and j < skip_within:
                        continue  # resuming inside a document: handed out before the checkpoint
                    self._state = {"pass": pass_index, "docs": owned - 1, "within": j + 1, "carry": carry_before,
                                   "read": read, "whole_pass": whole_pass}
                    yield sample
                self._state = {"pass": pass_index, "docs": owned, "within": 0, "carry": list(packer.buffer),
                               "read": read, "whole_pass": whole_pass}
            if expected is not None and owned < resume_at:
                self._refuse_changed(slot, n_slots, f"the {resume_at} documents the checkpoint's run had read "
                                                    f"(only {owned} are left)")
            if self.repeat and produced == 0 and not resumed:
                # Nothing for this slot: an endless loop over an empty share would hang training.
                raise DataSourceError(
                    f"the {self.split} split of {self.source.source!r} gives no samples to worker slot "
                    f"{slot} of {n_slots}; add data, lower --data.num_workers or check --data.max_words/max_chars"
                )
            if whole_pass is not None and read != whole_pass:
                self._refuse_changed(slot, n_slots, f"its documents in pass {pass_index} of the stream, which were "
                                                    f"not those of pass {pass_index - 1}")
            skip_docs, skip_within, carry, expected, resume_at = 0, 0, [], None, 0
            whole_pass = read
            self._state = self._start(pass_index + 1, whole_pass)
        if not self.repeat:
            for _ in range(self.pad_to - produced):  # see pad_shares
                yield self.empty_sample()

    def _refuse_changed(self, slot: int, n_slots: int, what: str) -> None:
        whose = f" (worker slot {slot} of {n_slots})" if n_slots > 1 else ""
        raise DataSourceError(
            f"{self.source.source!r} is not the corpus this run has read: {what} differ now{whose}, so it was "
            "edited in place; restore it, or start a new run (without --ckpt_path) on the edited corpus"
        )

    def pad_shares(self, workers_per_rank: int) -> None:
        """Make every slot of this finite split hand out as many samples as the largest share, the
        rest padded with empty ones (no read positions: they count for nothing), so that every rank
        runs as many validation steps. Under FSDP each step's forward is a collective (the blocks
        are gathered), and a rank that stopped early would leave the others waiting. Counted once,
        before the loader's workers start (they inherit it)."""
        n_slots = self.world_size * max(1, workers_per_rank)
        if n_slots == 1:
            return
        counts = [0] * n_slots
        packers = [Packer(self.seq_len, self.tokenizer.eos_token_id) for _ in range(n_slots)]
        for n, (ordinal, text) in enumerate(self.documents()):
            counts[n % n_slots] += len(self._samples(ordinal, text, packers[n % n_slots]))
        self.pad_to = max(counts)

    def empty_sample(self) -> dict:
        """A one-token sample with no read positions: the model runs on it, nothing is scored."""
        tok = self.tokenizer
        token = next((t for t in (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) if t is not None), 0)
        return {"input_ids": [token], "positions": [], "labels": []}

    def _samples(self, ordinal: int, text: str, packer: Packer) -> list[dict]:
        if self.mode == "pack":
            return packer.add(token_ids(self.tokenizer, text))
        tokens = self.tokenizer(text)["input_ids"]
        rng = random.Random(f"{self.seed}/{ordinal}")  # position choice is seeded per document
        sample = trim_sample(tokens, rng, self.trim, self.seq_len)
        return [sample] if sample else []


class LensDataModule(L.LightningDataModule):
    """Streams documents for lens training and validation.

    The tokenizer and the model's context length are only known once the model is loaded: they are
    bound late, by ``bind()``; under a Trainer, ``setup`` binds them from the LightningModule's
    ``tokenizer`` and ``context_length`` if nobody did before.
    """

    def __init__(
        self,
        source: str = "demo",
        val_source: str | None = None,
        text_field: str = "text",
        split: str = "train",
        mode: str = "pack",
        seq_len: int = 128,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        val_max_docs: int | None = 200,
        holdout_every: int = 10,
        seed: int = 0,
        shuffle_buffer: int = 10_000,
        max_words: int = 250,
        max_chars: int = 2000,
        positions_per_doc: int = 1,
        num_workers: int = 1,
        on_bad_record: str = "error",
    ):
        """
        Args:
            source: ``.jsonl``/``.jsonl.zst`` file, folder or glob; ``demo`` (embedded demo corpus);
                or ``hub:<dataset id>`` (streamed with 🤗 datasets, never downloaded whole).
            val_source: where validation documents come from; default: the held-out share of ``source``.
            text_field: JSON field holding the document text.
            split: split name for hub datasets.
            mode: ``pack`` (tuned-lens: EOS-joined chunks of ``seq_len`` tokens) or ``trim``
                (Patchscopes: filtered documents cut at random positions).
            seq_len: chunk length (pack) or maximum prefix length (trim), in tokens.
            batch_size: samples per training step, per device.
            val_batch_size: samples per validation step (default: ``batch_size``).
            val_max_docs: documents in the validation set (null: the whole held-out share).
            holdout_every: every n-th document of ``source`` is held out for validation.
            seed: seeds the shuffle and the trimming positions.
            shuffle_buffer: documents in the shuffle buffer (≥ corpus size: a full shuffle).
            max_words: trimming filter: keep documents with fewer space-separated words.
            max_chars: trimming filter: keep documents with fewer characters.
            positions_per_doc: trimming: random positions read per document.
            num_workers: dataloader worker processes (tokenisation runs there).
            on_bad_record: ``error`` (stop, naming file and line) or ``skip`` (count and go on) for
                records that are not JSON objects with a string text field.
        """
        super().__init__()
        self.save_hyperparameters()
        if mode not in MODES:
            raise ConfigError(f"--data.mode must be one of {MODES}, got {mode!r}")
        for flag, value in (("batch_size", batch_size), ("holdout_every", holdout_every),
                            ("shuffle_buffer", shuffle_buffer), ("positions_per_doc", positions_per_doc),
                            ("val_batch_size", val_batch_size), ("val_max_docs", val_max_docs)):
            if value is not None and value < 1:
                raise ConfigError(f"--data.{flag} must be at least 1, got {value}")
        if seq_len < 2:
            raise ConfigError(f"--data.seq_len must be at least 2 (a read position needs the next token as its "
                              f"label), got {seq_len}")
        if holdout_every < 2 and val_source is None:
            raise ConfigError("--data.holdout_every must be at least 2 (or pass --data.val_source)")
        if num_workers < 0:
            raise ConfigError(f"--data.num_workers must be >= 0, got {num_workers}")
        self.trim = TrimSettings(max_words=max_words, max_chars=max_chars, positions_per_doc=positions_per_doc)
        self.tokenizer = None
        self.max_context: int | None = None
        self.worker_signals = WorkerSignals()

    # --- late binding ----------------------------------------------------------------------------
    def bind(self, tokenizer, max_context: int | None) -> None:
        """Attach the model's tokenizer and check settings that depend on the model."""
        if max_context is not None and self.hparams.seq_len > max_context:
            raise ConfigError(
                f"--data.seq_len is {self.hparams.seq_len} but the model's context is {max_context}; lower --data.seq_len"
            )
        if self.hparams.mode == "pack" and tokenizer.eos_token_id is None:
            raise ConfigError("packing needs an EOS token but the tokenizer has none; use --data.mode trim")
        self.tokenizer = tokenizer
        self.max_context = max_context

    def _source(self, which: str) -> DocumentSource:
        name = self.hparams.source if which == "train" or self.hparams.val_source is None else self.hparams.val_source
        return DocumentSource(name, self.hparams.text_field, self.hparams.split, self.hparams.on_bad_record)

    def describe(self) -> dict:
        """Everything that determines the samples, for hidden-state cache keys."""
        settings = {k: v for k, v in self.hparams.items() if k not in ("num_workers", "on_bad_record")}
        return {"settings": settings, "source": self._source("train").describe(),
                "val_source": self._source("val").describe()}

    def setup(self, stage: str | None = None) -> None:
        bind_from_trainer(self)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        self.train_stream = self._stream("train", rank, world)
        self.val_stream = self._stream("val", rank, world)
        self.val_stream.pad_shares(self.hparams.num_workers)
        self._check_not_empty(self.train_stream)

    def _stream(self, split: str, rank: int, world: int) -> DocumentStream:
        source = self._source(split)
        source.check()
        # With a separate validation source, both sources are used whole: no hold-out split.
        holdout_every = self.hparams.holdout_every if self.hparams.val_source is None else 0
        return DocumentStream(
            source, self.tokenizer, split=split, mode=self.hparams.mode,
            seq_len=self.hparams.seq_len, seed=self.hparams.seed, shuffle_buffer=self.hparams.shuffle_buffer,
            holdout_every=holdout_every, trim=self.trim, repeat=split == "train",
            max_docs=self.hparams.val_max_docs if split == "val" else None, rank=rank, world_size=world,
        )

    def _check_not_empty(self, stream: DocumentStream) -> None:
        """Fail in the main process, with a clear message, before any model work starts. Only
        counts tokens (packing would build every chunk of a possibly huge document just to see one)."""
        total = 0
        for ordinal, text in stream.selected():
            if stream.mode == "trim":
                if stream._samples(ordinal, text, None):
                    return
                continue
            # A token covers at least one character: a long document's prefix tells as much.
            head = text[: 64 * stream.seq_len]
            total += len(stream.tokenizer(head, add_special_tokens=False)["input_ids"]) + 1  # + EOS separator
            if total >= stream.seq_len:
                return
        raise DataSourceError(
            f"{stream.source.source!r} yields no {stream.split} samples (skipped: {dict(stream.source.skipped.counts) or 'none'}); "
            "check the path, --data.text_field and the trimming filter"
        )

    def _loader(self, stream: DocumentStream, batch_size: int) -> StatefulDataLoader:
        workers = self.hparams.num_workers
        return StatefulDataLoader(
            stream, batch_size=batch_size, num_workers=workers,
            collate_fn=partial(collate, pad_id=self.tokenizer.pad_token_id or 0),
            persistent_workers=False, prefetch_factor=4 if workers else None,
            worker_init_fn=self.worker_signals,  # Ctrl-C / SIGTERM to the process group: the main process stops the run
        )

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_stream, self.hparams.batch_size)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.val_stream, self.hparams.val_batch_size or self.hparams.batch_size)
