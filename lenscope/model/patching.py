"""The patching engine: write hidden states into a target forward pass and read its output.

A patchscope (Ghandeharioun et al. 2024) takes a hidden state from a source pass at (layer ℓ,
position i), optionally maps it, writes it into a target pass at (layer ℓ*, position i*) and reads
the target's next-token distribution at a chosen position. Reading the source is
``ResidualReader.read``; this module does the writing, through nnsight.

Batched: row n of the target batch gets its own state, layer, write position and read position,
so one target forward pass evaluates many (example, layer) pairs. Reading and writing are separate
traces, so the source layer may come after the target layer (one trace cannot go back in time).

Layers are residual indices (REFERENCE.md): 0 = the input of block 0, j ≥ 1 = the output of block
j − 1. Writing at index L (the last block's output) leaves only the final norm and the head to act:
that is the logit lens as a patchscope.
"""

from __future__ import annotations

import inspect

import torch

from lenscope.model.residuals import ResidualReader


def cache_argument(model) -> str:
    """Name of the key/value cache argument of ``model.forward``: ``cache`` from transformers 5.x
    on (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class PatchingEngine:
    def __init__(self, reader: ResidualReader):
        self.reader = reader
        self.traced = reader.traced
        self.adapter = reader.adapter

    def _hidden(self, layer: int):
        """The proxy of the residual at ``layer`` inside a trace (written in place)."""
        blocks = self.reader._blocks
        if layer == 0:
            args, kwargs = blocks[0].inputs
            return args[0] if args else kwargs["hidden_states"]
        output = blocks[layer - 1].output
        return output[0] if self.adapter.block_output_is_tuple else output

    def run(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, layers: torch.Tensor,
            write_positions: torch.Tensor, states: torch.Tensor, read_positions: torch.Tensor,
            past_key_values=None, inputs_embeds: torch.Tensor | None = None, return_cache: bool = False):
        """Patched next-token logits.

        input_ids, attention_mask: (N, T) target prompts; layers, write_positions, read_positions:
        (N,) per row; states: (N, d_model) written at (layers[n], write_positions[n]) of row n.
        past_key_values: an optional cache of an unpatched prompt prefix (batch N) that input_ids
        continue; positions then count from the first token after it, and attention_mask covers
        prefix and input. inputs_embeds: (N, T, d_model) target prompts as embeddings instead of
        input_ids (a learned soft prompt). Returns (N, vocab) logits of row n at read_positions[n];
        with ``return_cache``, also the key/value cache of the patched pass (to continue it greedily).

        Differentiable with respect to ``states`` and ``inputs_embeds`` when either requires grad
        (training a learned prompt through the frozen model); otherwise runs without autograd.
        """
        prompt = input_ids if input_ids is not None else inputs_embeds
        n = prompt.shape[0]
        if not (layers.shape == write_positions.shape == read_positions.shape == (n,)) or states.shape[0] != n:
            raise ValueError("layers, write_positions, read_positions need shape (N,) and states (N, d_model)")
        if int(layers.min()) < 0 or int(layers.max()) > self.adapter.num_layers:
            raise ValueError(f"patch layers must be residual indices 0..{self.adapter.num_layers}")
        if attention_mask is None:
            attention_mask = torch.ones(prompt.shape[:2], dtype=torch.long, device=prompt.device)
        rows_by_layer = {int(j): (layers == j).nonzero(as_tuple=True)[0] for j in layers.unique().tolist()}
        all_rows = torch.arange(n, device=prompt.device)
        inputs = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": inputs_embeds}
        inputs["attention_mask"] = attention_mask
        if past_key_values is not None:
            inputs.update({cache_argument(self.adapter.model): past_key_values, "use_cache": True})
        if return_cache:
            inputs["use_cache"] = True
        differentiable = states.requires_grad or (inputs_embeds is not None and inputs_embeds.requires_grad)
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()), self.traced.trace(inputs):
            # Modules run in order, so the writes must be made in increasing layer order.
            for layer in sorted(rows_by_layer):
                rows = rows_by_layer[layer]
                hidden = self._hidden(layer)
                hidden[rows, write_positions[rows]] = states[rows].to(hidden.dtype)
            logits = self.traced.output.logits[all_rows, read_positions].save()
            if return_cache:
                cache = getattr(self.traced.output, cache_argument(self.adapter.model)).save()
        return (logits, cache) if return_cache else logits
