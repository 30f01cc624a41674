"""Turning documents into samples, and samples into batches: Patchscopes trimming, tuned-lens
packing, and the one pairing of a read position t with t + k.

A sample is a dict of plain Python lists (cheap to pickle out of a dataloader worker):
``input_ids`` (tokens fed to the model), ``positions`` (where residuals are read) and ``labels``
(the real next token at each position, -100 where the text does not say). Training and the
Patchscopes evaluation use the same samples, batches (``collate``) and pairing (``offset_pairs``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass(frozen=True)
class TrimSettings:
    """Patchscopes trimming (Ghandeharioun et al. 2024, next-token experiment)."""

    max_words: int = 250
    """Keep documents with fewer space-separated words than this."""
    max_chars: int = 2000
    """Keep documents with fewer characters than this."""
    positions_per_doc: int = 1
    """Random positions read per document (the paper uses one)."""


def keep_for_trimming(text: str, settings: TrimSettings) -> bool:
    return len(text) < settings.max_chars and len(text.split(" ")) < settings.max_words


def trim_sample(tokens: list[int], rng: random.Random, settings: TrimSettings, seq_len: int,
                lookahead: int = 0) -> dict | None:
    """Choose ``positions_per_doc`` positions of one tokenised document, uniformly among those that
    have a next token: the one position rule of training (``--data.trim``) and the Patchscopes
    evaluation (one position per document, ``rng`` seeded by the document).

    Reading position i of the whole document is the same as cutting the text after token i, under
    causal attention, so one forward pass over the prefix serves every chosen position. A position
    needs a next token (the label), hence i ≤ len - 2; and i < seq_len - 1 so the sample fits. The
    sample keeps ``lookahead`` more tokens after the last label where the document has them (the
    model's predictions at t + 1 … t + lookahead, for future lenses).
    """
    last = min(len(tokens), seq_len) - 2
    if last < 0:
        return None
    k = min(settings.positions_per_doc, last + 1)
    positions = sorted(rng.sample(range(last + 1), k))
    end = min(positions[-1] + 2 + lookahead, len(tokens), seq_len)
    return {"input_ids": tokens[:end], "positions": positions, "labels": [tokens[i + 1] for i in positions]}


LONG_TEXT = 1 << 20
"""Characters from which a document is tokenised piece by piece (see ``token_ids``)."""


def token_ids(tokenizer, text: str, piece_chars: int = LONG_TEXT) -> list[int]:
    """Token ids of ``text`` without special tokens, for packing.

    A document longer than ``piece_chars`` characters is tokenised in pieces cut just before a
    whitespace character (so a word is never split; the whitespace starts the next piece, as
    pre-tokenisers expect): a tokenizer holds offsets and token strings for its whole input, about
    0.5 KB per token, which for one 50 MB document is several GB. Tokens at the cuts may differ from
    tokenising the whole text at once, deterministically, which packing does not mind.
    """
    if len(text) <= piece_chars:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    start = 0
    while start < len(text):
        end = min(start + piece_chars, len(text))
        if end < len(text):
            cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
            end = cut if cut > start else end
        ids += tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
        start = end
    return ids


class Packer:
    """Tuned-lens packing: documents joined with EOS, cut into fixed-length chunks (the reference
    packs to 2048 tokens). The tokens left over after the last chunk are part of the resumable state.

    Linear in the document's length: chunks are cut at increasing offsets of one buffer, which is
    trimmed once per document (slicing the rest off after every chunk would copy a long document
    once per chunk, quadratic in its length).
    """

    def __init__(self, seq_len: int, eos_id: int, carry: list[int] | None = None):
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.buffer: list[int] = list(carry or [])

    def add(self, tokens: list[int]) -> list[dict]:
        buffer = self.buffer
        buffer.extend(tokens)
        buffer.append(self.eos_id)
        n = self.seq_len
        ends = range(n, len(buffer) + 1, n)
        chunks = [{"input_ids": (chunk := buffer[end - n:end]), "positions": list(range(n)), "labels": chunk[1:] + [IGNORE]}
                  for end in ends]
        self.buffer = buffer[len(chunks) * n:]
        return chunks


def collate(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples into tensors: input_ids/attention_mask (B, T);
    positions/labels (B, P) with -1 / -100 where a sample has fewer positions."""
    width = max(len(s["input_ids"]) for s in samples)
    n_pos = max(len(s["positions"]) for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    positions = torch.full((batch, n_pos), -1, dtype=torch.long)
    labels = torch.full((batch, n_pos), IGNORE, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[i, :n] = torch.tensor(s["input_ids"])
        attention_mask[i, :n] = 1
        positions[i, : len(s["positions"])] = torch.tensor(s["positions"])
        labels[i, : len(s["labels"])] = torch.tensor(s["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "positions": positions, "labels": labels}


@dataclass(frozen=True)
class OffsetPairs:
    """Read positions t of a batch paired with t + k (see ``offset_pairs``); M pairs, all tensors (M,)."""

    rows: torch.Tensor
    """The pair's row of the batch."""
    source: torch.Tensor
    """Index of (row, t) among the batch's read positions, in row-major order: where h(t) is in
    states gathered at the read positions."""
    at: torch.Tensor
    """t + k, the target position."""
    target: torch.Tensor
    """Index of (row, t + k) among the read positions, -1 where t + k is not read."""
    next_token: torch.Tensor
    """The real token after t + k, -100 where the sample does not have it."""


def offset_pairs(batch: dict[str, torch.Tensor], k: int) -> OffsetPairs:
    """Every read position t of the batch whose t + k is in its document, paired with t + k.

    The one t → t + k pairing: training takes the model's output at t + k from the states it read
    (``target``; a pair whose t + k was not read is dropped there), the Patchscopes evaluation from
    the residual stream at ``at``; both score against ``next_token``.
    """
    positions, mask, input_ids = batch["positions"], batch["attention_mask"].bool(), batch["input_ids"]
    width = input_ids.shape[1]
    all_rows, all_cols = (positions >= 0).nonzero(as_tuple=True)
    read_at = positions[all_rows, all_cols]  # every read position t, row-major: the order of gathered states
    index = torch.full((positions.shape[0], width), -1, dtype=torch.long, device=positions.device)
    index[all_rows, read_at] = torch.arange(len(read_at), device=positions.device)

    def in_document(rows: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        return (at < width) & mask[rows, at.clamp(max=width - 1)]

    keep = in_document(all_rows, read_at + k)
    rows, at = all_rows[keep], read_at[keep] + k
    source = keep.nonzero(as_tuple=True)[0]
    has_next = in_document(rows, at + 1)
    next_token = torch.where(has_next, input_ids[rows, (at + 1).clamp(max=width - 1)], IGNORE)
    return OffsetPairs(rows=rows, source=source, at=at, target=index[rows, at], next_token=next_token)
