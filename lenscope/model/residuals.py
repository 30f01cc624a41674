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

from lenscope.errors import UserError
from lenscope.model.adapter import ArchitectureAdapter, _first_tensor


class HiddenStatesNotFiniteError(UserError):
    """The model computed NaN or inf hidden states: everything read from them (a lens's score, a
    patched state, a trajectory) would be meaningless, so nothing is."""


def all_finite(values: torch.Tensor) -> bool:
    """Whether every value is finite, in one fused reduction (the least and the greatest value at
    once; NaN propagates into both) that builds no tensor of the values' size:
    ``isfinite(values).all()`` builds a boolean copy first, and took 10× as long on CPU."""
    return values.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(values))).all())


def check_finite_states(residuals: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
    """Refuse residuals (num_layers + 1, batch, seq, d_model) with NaN or inf at a real token,
    naming the first residual index that has them. The one check every reader of the model's states
    goes through (training, evaluation, the patchscopes, steering, trajectories): a float16 model
    that overflows (Gemma 3 270M from block 11) otherwise decodes to uniform distributions that
    score as a perfect lens, and prints ``<unk>`` everywhere. Padding positions do not count."""
    if all_finite(residuals):  # the usual case, on every read
        return
    bad = ~torch.isfinite(residuals)
    if attention_mask is not None:
        bad &= attention_mask.bool()[None, :, :, None]
    per_layer = bad.flatten(1).any(-1)
    if not bool(per_layer.any()):
        return
    first = int(per_layer.nonzero()[0])
    where = "the embeddings" if first == 0 else f"the output of block {first - 1}"
    raise HiddenStatesNotFiniteError(
        f"the model's hidden states contain NaN or inf at {where} (residual index {first}); {dtype_advice(residuals.dtype)}")


def check_finite_logits(logits: torch.Tensor, reader: ResidualReader, input_ids: torch.Tensor | None,
                        attention_mask: torch.Tensor | None = None, written: bool = False) -> None:
    """Refuse NaN or inf ``logits`` of a pass over ``input_ids``, saying why: the model's own states
    (read again, ``check_finite_states`` names their first bad layer), else the states ``written``
    into the pass, else the final norm or the head. ``input_ids`` None: a pass that continues a
    key/value cache, whose states cannot be read alone. For the passes that do not read states
    through ``ResidualReader.read`` (a patched pass, generation, attention knockout): the check is
    one reduction over the logits; the second read happens only on the way to the error."""
    if all_finite(logits):
        return
    if input_ids is not None:
        reader.read(input_ids, attention_mask)  # raises HiddenStatesNotFiniteError, naming the layer
        if written:
            raise HiddenStatesNotFiniteError(
                "a patched pass gave NaN or inf logits while the model's own states are finite: the states written "
                "into it are NaN, inf or too large for its dtype; check the lens or mapping that made them")
    dtype = reader.adapter.unembedding_weight.dtype
    raise HiddenStatesNotFiniteError(f"the model's next-token logits contain NaN or inf; {dtype_advice(dtype)}")


def dtype_advice(dtype: torch.dtype) -> str:
    """What to do about NaN or inf the model computes in ``dtype``."""
    if dtype == torch.float16:
        return "with float16 weights this is overflow: use float32 or bfloat16 weights (--model.base.dtype)"
    wider = "" if dtype == torch.float32 else ", or load it in float32"
    return f"in {str(dtype).removeprefix('torch.')} this is not float16 overflow: check the model's weights{wider}"


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
        residuals = torch.stack([first] + [_first_tensor(o) for o in outputs])
        check_finite_states(residuals, attention_mask)
        return residuals
