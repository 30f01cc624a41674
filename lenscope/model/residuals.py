"""Read (and later write) the residual stream through nnsight.

Layer numbering (REFERENCE.md): index 0 is the input to block 0 (the embeddings, after any scaling
or position embeddings the model adds), index i+1 is the raw output of block i. Unlike
``output_hidden_states``, the last entry is the last block's raw output, before the final norm: a
lens decodes it with the final norm itself, and the tuned lens's target is recomputed from it.
"""

from __future__ import annotations

import nnsight
import torch
from nnsight.modeling.transformers import TransformersModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lenscope.model.adapter import ArchitectureAdapter, _first_tensor


def envoy_at(root, path: str):
    """The nnsight Envoy of the submodule at a dotted path (``model.layers`` → root.model.layers)."""
    node = root
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


class ResidualReader:
    """Runs the frozen model once and returns the residual stream at every block boundary."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, adapter: ArchitectureAdapter):
        self.adapter = adapter
        self.traced = TransformersModel(model, tokenizer=tokenizer)
        self._blocks = envoy_at(self.traced, adapter.block_path)

    @torch.no_grad()
    def read(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Residual stream of every block boundary.

        input_ids, attention_mask: (batch, seq). Returns (num_layers + 1, batch, seq, d_model).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        blocks = self._blocks
        n = len(self.adapter.blocks)
        with self.traced.trace({"input_ids": input_ids, "attention_mask": attention_mask}) as tracer:
            args, kwargs = blocks[0].inputs
            first = nnsight.save(args[0] if args else kwargs["hidden_states"])
            outputs = nnsight.save([blocks[i].output for i in range(n)])
            # Nothing after the last block is needed: skip the final norm and the (large) head.
            tracer.stop()
        return torch.stack([first] + [_first_tensor(o) for o in outputs])
