"""Documents for the Patchscopes next-token protocol (Ghandeharioun et al. 2024, REFERENCE.md §4).

Filter (< ``max_words`` space-separated words, < ``max_chars`` characters), shuffle with a seeded
buffer (seed 42 by default), take the first ``n_fit`` documents to fit mappings and the next
``n_eval`` to evaluate, and read ONE random position per document, chosen by an RNG seeded with the
seed and the document's ordinal: a rerun gives the same positions and so the same numbers. The
position rule, the samples and the batches are training's (``lenscope.datamodules.preprocessing``).

With ``holdout_every`` n ≥ 2 the split follows ``train.py``'s instead: fitting documents come from
the training share (ordinal mod n ≠ 0) and evaluation documents from the held-out share
(ordinal mod n = 0), so lenses trained with ``--data.holdout_every n`` on the same source never saw
an evaluation document.

Each sample keeps the tokens up to ``position + max_offset + 1``: the model's own predictions at
t, t+1, …, t+max_offset (teacher-forced on the real text) and the real tokens after them are what
future lenses are scored against. The document is only cut there, so the choice of position is the
paper's (uniform over the document), and an offset whose target lies past the end is not scored.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader

from lenscope.batching import cheapest_passes
from lenscope.datamodules.lens_data import bind_from_trainer, in_share, seeded_shuffle
from lenscope.datamodules.preprocessing import (
    IGNORE,
    TrimSettings,
    collate,
    keep_for_trimming,
    trim_sample,
)
from lenscope.datamodules.sources import DataSourceError, DocumentSource
from lenscope.errors import ConfigError

log = logging.getLogger(__name__)


def document_sample(tokens: list[int], ordinal: int, settings: TrimSettings, seed: int, max_offset: int) -> dict | None:
    """A document's evaluation sample, by training's trimming rule: ``settings.positions_per_doc``
    read positions (the paper: one), uniform over those with a next token, drawn by an RNG seeded
    by ``seed`` and the ordinal; up to ``max_offset`` more tokens are kept after the last one (the
    targets of future offsets). None for a document with no such position."""
    sample = trim_sample(tokens, random.Random(f"{seed}/{ordinal}"), settings, len(tokens), lookahead=max_offset)
    return None if sample is None else {"doc": ordinal, **sample}


def whole_document_sample(tokens: list[int], ordinal: int) -> dict:
    """A document with every position read (``--data.fit_positions all``)."""
    return {"doc": ordinal, "input_ids": tokens, "positions": list(range(len(tokens))), "labels": [*tokens[1:], IGNORE]}


PASS_COST_SLOTS = 256
"""What one more batch costs beyond its tokens, in padded token slots: the fixed part of its model
pass and of what follows it (the affine fit's float64 sums, each method's decoding), about 0.3 s on
a 2-core CPU, where a token slot of the embedded model's pass costs about 1 ms."""


def length_batches(lengths: list[int], max_batch: int, pass_cost: int = PASS_COST_SLOTS) -> list[list[int]]:
    """Batches (lists of indices) of documents of these lengths: sorted by length (stably: documents
    of one length stay in protocol order) and cut into runs of at most ``max_batch`` with the fewest
    padded token slots (a batch pads to its longest document) plus ``pass_cost`` per batch, so that
    a long document does not pad many short ones, nor does every document cost a pass of its own."""
    return cheapest_passes(lengths, max_batch, pass_cost)


def collate_documents(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Training's batch (``collate``) with each row's document ordinal (``doc``)."""
    return {**collate(samples, pad_id), "doc": torch.tensor([s["doc"] for s in samples])}


class PatchscopeDataModule(L.LightningDataModule):
    """Fitting and evaluation documents of the Patchscopes protocol, one read position each.

    ``test_dataloader`` gives this rank's share of the evaluation documents (each document on
    exactly one rank); ``fit_dataloader`` gives this rank's share of the fitting documents.
    ``fit_tokens`` holds the whole tokenised fitting documents (all ranks), for the bigram baseline.
    """

    def __init__(
        self,
        source: str = "demo",
        text_field: str = "text",
        split: str = "train",
        seed: int = 42,
        n_fit: int = 10_000,
        n_eval: int = 2_000,
        max_words: int = 250,
        max_chars: int = 2000,
        seq_len: int | None = None,
        max_offset: int = 3,
        holdout_every: int = 0,
        fit_positions: str = "one",
        batch_size: int = 16,
        by_length: bool = True,
        shuffle_buffer: int = 100_000,
        on_bad_record: str = "error",
    ):
        """
        Args:
            source: ``.jsonl``/``.jsonl.zst`` file, folder or glob; ``demo``; or ``hub:<dataset id>``.
            text_field: JSON field holding the document text.
            split: split name for hub datasets.
            seed: seeds the shuffle and every document's read position (the paper: 42).
            n_fit: documents to fit mappings on (least-squares affine lens, bigram table).
            n_eval: documents to evaluate on (one position each).
            max_words: keep documents with fewer space-separated words.
            max_chars: keep documents with fewer characters.
            seq_len: longest prefix fed to the model, in tokens (positions are chosen within it);
                default: the model's context (the filtered documents are shorter than that anyway).
            max_offset: furthest future offset scored (tokens kept after the read position).
            holdout_every: 0: the paper's split (first n_fit, next n_eval after the shuffle);
                n ≥ 2: train.py's split (evaluate on the held-out share, ordinal mod n = 0).
            fit_positions: ``one`` (the paper: the fitting document's one read position) or ``all``
                (every position of the fitting documents: more positions from fewer documents, for
                corpora much smaller than the paper's 10,000 fitting documents; d_model + 1
                unknowns per output need far more than d_model positions).
            batch_size: documents per model pass (at most, with ``by_length``).
            by_length: batch documents of similar length together, cut where padding would cost
                more than another pass (``length_batches``; their order does not enter the results:
                the fit sums, the metrics average). On the Pile sample the padded token slots fall
                2.4× (fitting, every position) and 4.1× (evaluation); False keeps the protocol's
                order, batch_size documents at a time.
            shuffle_buffer: documents in the shuffle buffer (≥ corpus size: a full shuffle).
            on_bad_record: ``error`` or ``skip`` for records without a string text field.
        """
        super().__init__()
        self.save_hyperparameters()
        for flag in ("n_fit", "n_eval", "seq_len", "batch_size", "shuffle_buffer"):
            if self.hparams[flag] is not None and self.hparams[flag] < 1:
                raise ConfigError(f"--data.{flag} must be at least 1, got {self.hparams[flag]}")
        if max_offset < 0:
            raise ConfigError(f"--data.max_offset must be >= 0, got {max_offset}")
        if holdout_every == 1 or holdout_every < 0:
            raise ConfigError(f"--data.holdout_every must be 0 (the paper's split) or at least 2, got {holdout_every}")
        if fit_positions not in ("one", "all"):
            raise ConfigError(f"--data.fit_positions must be 'one' or 'all', got {fit_positions!r}")
        self.trim = TrimSettings(max_words=max_words, max_chars=max_chars, positions_per_doc=1)
        self.tokenizer = None
        self.fit_samples: list[dict] = []
        self.eval_samples: list[dict] = []
        self.fit_tokens: list[list[int]] = []

    def bind(self, tokenizer, max_context: int | None) -> None:
        if max_context is not None and self.hparams.seq_len is not None and self.hparams.seq_len > max_context:
            raise ConfigError(f"--data.seq_len is {self.hparams.seq_len} but the model's context is {max_context}; "
                              "lower --data.seq_len")
        self.tokenizer = tokenizer
        self.seq_len = self.hparams.seq_len or max_context or 1024

    # --- the protocol --------------------------------------------------------------------------------
    def _selected(self, source: DocumentSource, share: str | None) -> Iterator[tuple[int, str]]:
        for ordinal, text in enumerate(source):
            held_out = share == "eval"
            if in_share(ordinal, self.hparams.holdout_every, held_out) and keep_for_trimming(text, self.trim):
                yield ordinal, text

    def _shuffled(self, source: DocumentSource, share: str | None) -> Iterator[tuple[int, str]]:
        return seeded_shuffle(self._selected(source, share), self.hparams.shuffle_buffer, self.hparams.seed)

    def documents(self) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        """(ordinal, text) of the fitting and the evaluation documents, in protocol order."""
        hp = self.hparams
        source = DocumentSource(hp.source, hp.text_field, hp.split, hp.on_bad_record)
        source.check()
        if hp.holdout_every:
            fit = list(itertools.islice(self._shuffled(source, "fit"), hp.n_fit))
            evaluation = list(itertools.islice(self._shuffled(source, "eval"), hp.n_eval))
        else:
            docs = list(itertools.islice(self._shuffled(source, None), hp.n_fit + hp.n_eval))
            fit, evaluation = docs[: hp.n_fit], docs[hp.n_fit:]
        if not evaluation:
            raise DataSourceError(
                f"{hp.source!r} has no evaluation documents after the filter (< {hp.max_words} words, "
                f"< {hp.max_chars} characters) and the first {hp.n_fit} fitting documents; "
                "add data, lower --data.n_fit or relax --data.max_words/max_chars"
            )
        if len(evaluation) < hp.n_eval or len(fit) < hp.n_fit:
            log.warning("the source has fewer documents than asked for: %d fitting (asked %d), %d evaluation (asked %d)",
                        len(fit), hp.n_fit, len(evaluation), hp.n_eval)
        return fit, evaluation

    def _samples(self, docs: list[tuple[int, str]], whole: bool = False) -> tuple[list[dict], list[list[int]]]:
        """One sample per document; ``whole``: the whole document, every position read."""
        samples, token_lists = [], []
        for ordinal, text in docs:
            tokens = self.tokenizer(text)["input_ids"][: self.seq_len]
            if len(tokens) < 2:
                continue  # no position with a next token
            if whole:
                samples.append(whole_document_sample(tokens, ordinal))
            else:
                samples.append(document_sample(tokens, ordinal, self.trim, self.hparams.seed, self.hparams.max_offset))
            token_lists.append(tokens)
        return samples, token_lists

    def setup(self, stage: str | None = None) -> None:
        bind_from_trainer(self)
        if self.eval_samples:
            return
        fit, evaluation = self.documents()
        self.fit_samples, self.fit_tokens = self._samples(fit, whole=self.hparams.fit_positions == "all")
        self.eval_samples, _ = self._samples(evaluation)
        log.info("Patchscopes protocol: %d fitting and %d evaluation documents from %s",
                 len(self.fit_samples), len(self.eval_samples), self.hparams.source)

    # --- loaders: each rank takes every world_size-th document ---------------------------------------
    def _shard(self, samples: list[dict]) -> list[dict]:
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        return samples[rank::world]

    def _loader(self, samples: list[dict]) -> DataLoader:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        collate_fn = lambda batch: collate_documents(batch, pad)  # noqa: E731
        if not self.hparams.by_length:
            return DataLoader(samples, batch_size=self.hparams.batch_size, shuffle=False, collate_fn=collate_fn)
        batches = length_batches([len(s["input_ids"]) for s in samples], self.hparams.batch_size)
        return DataLoader(samples, batch_sampler=batches, collate_fn=collate_fn)

    def fit_dataloader(self) -> DataLoader:
        return self._loader(self._shard(self.fit_samples))

    def test_samples(self) -> list[dict]:
        """This rank's evaluation samples: the ones ``test_dataloader`` batches."""
        return self._shard(self.eval_samples)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_samples())
