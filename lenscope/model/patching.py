"""The patching engine: write hidden states into a target forward pass and read its output.

A patchscope (Ghandeharioun et al. 2024) takes a hidden state from a source pass at (layer ℓ,
position i), optionally maps it, writes it into a target pass at (layer ℓ*, position i*) and reads
the target's next-token distribution at a chosen position. Reading the source is
``ResidualReader.read``; this module does the writing, through nnsight.

Batched: row n of the target batch gets its own state, layer, write position and read position,
so one target forward pass evaluates many (example, layer) pairs. Reading and writing are separate
traces, so the source layer may come after the target layer (one trace cannot go back in time).

A pass of one token per row whose every row is written (a target prompt's last token on the cache of
the rest: token identity, a learned prompt) skips the blocks below the lowest layer written: nothing
they compute there survives the writes.

Layers are residual indices (REFERENCE.md): 0 = the input of block 0, j ≥ 1 = the output of block
j − 1. Writing at index L (the last block's output) leaves only the final norm and the head to act:
that is the logit lens as a patchscope.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import nnsight
import torch

from lenscope.model.heads import AttentionHeads
from lenscope.model.residuals import ResidualReader, check_finite_logits, envoy_at
from lenscope.model.sublayers import Sublayers

PASS_COST_BLOCK_ROWS = 512
"""What one more patched pass costs, in (row, block) steps of a one-token pass: its fixed overhead
(tracing, launching every block, copying a shared prefix's cache), for cutting rows into passes
(``lenscope.batching.cheapest_passes``). Measured on the embedded model on a 2-core CPU."""


def cache_argument(model) -> str:
    """Name of the key/value cache argument of ``model.forward``: ``cache`` from transformers 5.x
    on (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class Intervention:
    """One change to a forward pass: row ``rows[k]`` at position ``positions[k]`` gets ``values[k]``.

    Where, by default: residual index ``layer`` (the whole state, (k, d_model) values). With
    ``heads`` (k,): attention head ``heads[k]`` of block ``layer`` (its slice of the attention output
    projection's input, (k, head_dim) values; see ``lenscope.model.heads``). With ``sublayer``
    "attention" or "mlp": that sublayer's output in block ``layer``, what it adds to the residual
    stream ((k, d_model) values; see ``lenscope.model.sublayers``). ``add``: the values are added
    to what is there instead of replacing it (a steering vector).
    """

    layer: int
    rows: torch.Tensor
    positions: torch.Tensor
    values: torch.Tensor
    heads: torch.Tensor | None = None
    add: bool = False
    sublayer: str | None = None

    @property
    def site(self) -> str:
        return "heads" if self.heads is not None else self.sublayer or "residual"

    @property
    def order(self) -> int:
        """When its site runs in the forward pass. Block b runs its heads, its attention output,
        its MLP output, then gives residual b + 1 (residual 0 is block 0's input); a parallel
        block calls its attention before its MLP too."""
        step = {"residual": 0, "heads": 1, "attention": 2, "mlp": 3}[self.site]
        return 4 * self.layer + step

    def at_new_token(self) -> Intervention:
        """The same change on a generated token: every row, at position 0 of a one-token step."""
        return Intervention(self.layer, self.rows, torch.zeros_like(self.positions), self.values, self.heads, self.add,
                            self.sublayer)


class PatchingEngine:
    def __init__(self, reader: ResidualReader):
        self.reader = reader
        self.traced = reader.traced
        self.adapter = reader.adapter
        self._heads: AttentionHeads | None = None
        self._sublayers: Sublayers | None = None

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
        prefix and input. The pass extends it in place, except in the blocks it skips (a one-token
        pass whose every row is written, without ``return_cache``): pass a copy to keep it.
        inputs_embeds: (N, T, d_model) target prompts as embeddings instead of input_ids (a learned
        soft prompt). Returns (N, vocab) logits of row n at read_positions[n];
        with ``return_cache``, also the key/value cache of the patched pass (to continue it greedily).

        Differentiable with respect to ``states`` and ``inputs_embeds`` when either requires grad
        (training a learned prompt through the frozen model); otherwise runs without autograd.
        """
        prompt = input_ids if input_ids is not None else inputs_embeds
        n = prompt.shape[0]
        if not (layers.shape == write_positions.shape == read_positions.shape == (n,)) or states.shape[0] != n:
            raise ValueError("layers, write_positions, read_positions need shape (N,) and states (N, d_model)")
        writes = []
        for layer in layers.unique().tolist():
            rows = (layers == layer).nonzero(as_tuple=True)[0]
            writes.append(Intervention(int(layer), rows, write_positions[rows], states[rows]))
        return self.forward(input_ids, attention_mask, writes, read_positions, past_key_values, inputs_embeds, return_cache)

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                interventions: list[Intervention], read_positions: torch.Tensor, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, return_cache: bool = False):
        """Next-token logits (N, vocab) of row n at read_positions[n] of a pass changed by
        ``interventions`` (any number, at residuals and at attention heads, on any rows); with
        ``return_cache`` also the pass's key/value cache. Inputs as :meth:`run`."""
        prompt = input_ids if input_ids is not None else inputs_embeds
        n = prompt.shape[0]
        for change in interventions:
            self._check(change)
        if attention_mask is None:
            attention_mask = torch.ones(prompt.shape[:2], dtype=torch.long, device=prompt.device)
        all_rows = torch.arange(n, device=prompt.device)
        inputs = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": inputs_embeds}
        inputs["attention_mask"] = attention_mask
        if past_key_values is not None:
            inputs.update({cache_argument(self.adapter.model): past_key_values, "use_cache": True})
        if return_cache:
            inputs["use_cache"] = True
        differentiable = any(c.values.requires_grad for c in interventions) or (
            inputs_embeds is not None and inputs_embeds.requires_grad)
        skipped = 0 if return_cache else self.skippable_blocks(interventions, prompt.shape[1], n)
        sites: dict[tuple[int, str], list[Intervention]] = {}
        for change in sorted(interventions, key=lambda c: c.order):
            if not skipped or change.layer > skipped:  # a write at the first block kept: the skipped blocks give it
                sites.setdefault((change.layer, change.site), []).append(change)
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()), self.traced.trace(inputs):
            if skipped:
                residual_dtype = (inputs_embeds if inputs_embeds is not None
                                  else self.adapter.model.get_input_embeddings().weight).dtype
                self._skip_blocks(skipped, interventions, n, residual_dtype)
            # Modules run in order, so the sites are visited in the order the pass reaches them.
            for (layer, site), changes in sites.items():
                at_heads = site == "heads"
                # Block 0's input can be a view autograd will not let a write change in place (one
                # row of a learned prompt): a differentiable pass writes into a copy and passes that.
                into_copy = site == "residual" and layer == 0 and differentiable
                if into_copy:
                    target = self.reader._blocks[0].input.clone()
                elif site == "residual":
                    target = self._hidden(layer)
                elif at_heads:
                    target = self._head_input(layer)
                else:
                    target = self._sublayer_output(site, layer)
                for change in changes:
                    index = (change.rows, change.positions)
                    if at_heads:
                        dh = self.heads.head_dim
                        columns = change.heads[:, None] * dh + torch.arange(dh, device=change.heads.device)
                        index = (change.rows[:, None], change.positions[:, None], columns)
                    values = change.values.to(target.dtype)
                    target[index] = target[index] + values if change.add else values
                if into_copy:
                    self.reader._blocks[0].input = target
            logits = self.traced.output.logits[all_rows, read_positions].save()
            if return_cache:
                cache = getattr(self.traced.output, cache_argument(self.adapter.model)).save()
        if not differentiable:  # a training pass is left to the training's own checks of its loss and weights
            check_finite_logits(logits, self.reader, input_ids if past_key_values is None else None, attention_mask,
                                written=bool(interventions))
        return (logits, cache) if return_cache else logits

    @staticmethod
    def skippable_blocks(interventions: list[Intervention], length: int, n: int) -> int:
        """How many blocks a pass need not run: with one input token per row, a row whose whole state
        is written at residual index ℓ needs no block below ℓ (what they would compute there is
        overwritten, and a one-token pass leaves no later position to read their keys and values), so
        blocks below the lowest written index of the pass can go. 0 when some row is not written,
        or a change adds to a state or sits elsewhere than the residual stream."""
        if length != 1 or not interventions or any(c.site != "residual" or c.add for c in interventions):
            return 0
        rows = torch.cat([c.rows for c in interventions])
        if rows.numel() != n or rows.unique().numel() != n:
            return 0
        return min(c.layer for c in interventions)

    def _skip_blocks(self, count: int, interventions: list[Intervention], n: int, dtype: torch.dtype) -> None:
        """Inside a trace: blocks 0..count − 1 return, instead of running, each row's written state
        in the residual stream's ``dtype`` (a row written higher up carries its own state until its
        write replaces it)."""
        values = interventions[0].values
        states = values.new_empty(n, 1, values.shape[-1], dtype=dtype)
        for change in interventions:
            states = states.index_put((change.rows, change.positions), change.values.to(states.dtype))
        output = (states,) if self.adapter.block_output_is_tuple else states
        for block in range(count):
            self.reader._blocks[block].skip(output)

    def _check(self, change: Intervention) -> None:
        k = change.rows.shape[0]
        if change.positions.shape != (k,) or change.values.shape[0] != k or (
                change.heads is not None and change.heads.shape != (k,)):
            raise ValueError("an intervention needs rows, positions (and heads) of shape (k,) and values (k, width)")
        if change.sublayer is not None:
            self.sublayers.path(change.sublayer, change.layer)
            return
        if change.heads is None:
            if not 0 <= change.layer <= self.adapter.num_layers:
                raise ValueError(f"patch layers must be residual indices 0..{self.adapter.num_layers}")
            return
        for head in change.heads.unique().tolist():
            self.heads.check(change.layer, int(head))

    @property
    def heads(self) -> AttentionHeads:
        """The attention heads of every block, found on first use (three forward passes)."""
        if self._heads is None:
            self._heads = AttentionHeads.discover(self.adapter)
        return self._heads

    @property
    def sublayers(self) -> Sublayers:
        """Each block's attention and MLP output sites, found on first use."""
        if self._sublayers is None:
            self._sublayers = Sublayers.discover(self.adapter, self.heads)
        return self._sublayers

    def _sublayer_output(self, kind: str, layer: int):
        """The proxy of block ``layer``'s attention or MLP output (written in place)."""
        path = self.sublayers.path(kind, layer)
        output = envoy_at(self.traced, path).output
        return output[0] if path in self.sublayers.tuple_outputs else output

    @torch.no_grad()
    def sublayer_outputs(self, kind: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         layers: list[int] | None = None) -> torch.Tensor:
        """What each block's ``kind`` ("attention" or "mlp") adds to the residual stream:
        (len(layers), batch, seq, d_model); ``layers``: block indices (default: every block)."""
        layers = list(range(self.adapter.num_layers)) if layers is None else layers
        for layer in layers:
            self.sublayers.path(kind, layer)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        order = sorted(set(layers))
        with self.traced.trace({"input_ids": input_ids, "attention_mask": attention_mask}) as tracer:
            saved = nnsight.save([self._sublayer_output(kind, layer) for layer in order])
            tracer.stop()
        by_layer = dict(zip(order, saved, strict=True))
        return torch.stack([by_layer[layer] for layer in layers])

    def _head_input(self, layer: int):
        """The proxy of block ``layer``'s attention output projection's input (heads side by side)."""
        return envoy_at(self.traced, self.heads.path(layer)).input

    @torch.no_grad()
    def head_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     layers: list[int] | None = None) -> torch.Tensor:
        """Every head's output (the output projection's input, split by head) at every position:
        (len(layers), batch, seq, num_heads, head_dim); ``layers``: block indices (default: every
        block with heads)."""
        heads = self.heads
        layers = heads.layers if layers is None else layers
        for layer in layers:
            heads.check(layer)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with self.traced.trace({"input_ids": input_ids, "attention_mask": attention_mask}) as tracer:
            saved = nnsight.save([envoy_at(self.traced, heads.path(layer)).input for layer in sorted(layers)])
            tracer.stop()
        by_layer = dict(zip(sorted(layers), saved, strict=True))
        b, t = input_ids.shape
        return torch.stack([by_layer[layer].reshape(b, t, heads.num_heads, heads.head_dim) for layer in layers])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, interventions: list[Intervention] = (), max_new_tokens: int = 20,
                 hold: bool = True, eos_token_id: int | None = None) -> torch.Tensor:  # type: ignore[assignment]
        """Greedy generation with interventions: (N, T) prompts of equal length (no padding) →
        (N, ≤ max_new_tokens) new tokens. ``interventions`` apply to the prompt pass at their own
        positions and, with ``hold``, to every generated token as it is read (the steering of
        Todd et al.'s and nnsight's demos: a vector added at every new position). Rows stop after
        ``eos_token_id``; a row that stopped keeps generating but is ignored by its caller.
        """
        n = input_ids.shape[0]
        at_end = torch.full((n,), input_ids.shape[1] - 1, device=input_ids.device)
        logits, cache = self.forward(input_ids, None, list(interventions), at_end, return_cache=True)
        held = [change.at_new_token() for change in interventions] if hold else []
        mask = torch.ones_like(input_ids)
        out, done = [], torch.zeros(n, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            token = logits.argmax(-1)
            out.append(token)
            if eos_token_id is not None:
                done |= token == eos_token_id
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(n, 1)], 1)
            logits, cache = self.forward(token[:, None], mask, held, torch.zeros_like(at_end), past_key_values=cache,
                                         return_cache=True)
        return torch.stack(out, 1) if out else input_ids.new_zeros(n, 0)
