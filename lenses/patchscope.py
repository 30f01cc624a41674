"""Patchscopes (Ghandeharioun et al. 2024): any source → mapping → target → readout inspection.

Take the hidden state of a source prompt at (residual index ℓ, position i) of model M, map it
(``f``: identity, any affine lens, a fitted map), write it into a target prompt's forward pass at
(residual index ℓ*, position i*) of model M* (the same or another), and read the target's next-token
distribution, or its greedy continuation::

    scope = Patchscope(Source(["Paris is the capital of France"], layers=[4, 8], position="Paris"),
                       Target("The official currency of x", layers="same", placeholder="x"),
                       readout=Generate(max_new_tokens=10))
    result = scope.run(model)            # result.texts[pair][prompt], result.pairs = [(4, 4), (8, 8)]

Residual indices as everywhere in lenscope: 0 is the embeddings, j ≥ 1 the output of block j − 1, L
(``model.num_layers``) the last block's output; writing at L leaves only the final norm and the
head to act, so the logit lens is ``Target(layers="last")`` on the source prompt itself.

Execution is batched on the patching engine: every (source layer, target layer, prompt) is one row
of a target pass; rows with the same target tokens run together, ``rows_per_pass`` at a time; the
prompt before the placeholder runs once and its key/value cache serves every row (checked against
full passes first, as some models' caches cannot be shared). A patch into the last block's output
read at the same position is the model's own decoding of the state, computed as such (one head
product instead of a forward pass; the engine's tests show the two agree). ``NextToken`` reads at
the written position; ``Generate`` patches the prompt pass only and continues greedily after the
prompt's last token, so a placeholder inside the prompt (the CoT patchscope of multi-hop queries)
generates too.
"""

from __future__ import annotations

import copy
import unicodedata
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lenscope.batching import cheapest_passes
from lenscope.errors import ConfigError
from lenscope.lenses.lens import Lens
from lenscope.model.patching import PASS_COST_BLOCK_ROWS, cache_argument

if TYPE_CHECKING:
    from lenscope.model.frozen import FrozenModel


@dataclass(frozen=True)
class Span:
    """A span of a prompt's text, found on the prompt's token boundaries (``find_span``).
    ``occurrence`` picks one of several token-aligned occurrences (0 the first, -1 the last); None
    (the rule for a plain string) requires the span to occur exactly once."""

    text: str
    occurrence: int | None = None


Position = int | str | Span
"""A token index (negative counts from the end), or a span of the prompt whose last token is meant
(the subject of a fact, a placeholder): a string that occurs exactly once on token boundaries, or a
``Span`` that picks one of several occurrences."""


@dataclass
class Source:
    """Where the states come from: the prompts, the residual indices read, the position in each."""

    prompts: Sequence[str]
    layers: Sequence[int]
    position: Position | Sequence[Position] = -1
    """One rule for every prompt, or one per prompt."""


@dataclass
class Target:
    """Where the states go: a prompt (None: each source prompt itself, cut after the read position),
    the residual indices written (``same``: the source's; ``last``: the last block's output L; or a
    list, crossed with the source layers), and the position written: the placeholder's last token (a
    span of the prompt, found on its token boundaries: see ``Position``) or a token index; None: the
    prompt's last token."""

    prompt: str | None = None
    layers: Sequence[int] | str = "same"
    placeholder: Position | None = None


@dataclass
class NextToken:
    """Read the target's next-token distribution at the written position."""


@dataclass
class Generate:
    """Greedy continuation of the patched target: ``max_new_tokens`` tokens, cut at ``stop`` (and at
    the end-of-sequence token)."""

    max_new_tokens: int = 20
    stop: str | None = "\n"


Readout = NextToken | Generate
Mapping = Callable[[torch.Tensor, int, int], torch.Tensor]
"""f(h (N, d), source layer, target layer) → (N, d) states to write."""


def identity(h: torch.Tensor, source_layer: int, target_layer: int) -> torch.Tensor:
    return h


@dataclass
class LensMapping:
    """An affine lens (tuned, least-squares affine, future, logit) as a patchscope mapping: its
    translator of the source layer (``Lens.translate``), mapping h_ℓ to the last block's output space."""

    lens: Lens

    def __post_init__(self):
        if not self.lens.translates:
            raise ConfigError(f"a {self.lens.lens_type} lens decodes through the model and maps no state; use an "
                              "affine lens (logit, tuned, affine, future) as the mapping")

    def __call__(self, h: torch.Tensor, source_layer: int, target_layer: int) -> torch.Tensor:
        try:
            return self.lens.translate(h, source_layer)
        except ValueError as err:
            raise ConfigError(str(err)) from None


@dataclass
class PatchscopeResult:
    """What a patchscope read: for every (source layer, target layer) pair and every prompt,
    next-token ``logits`` (pairs, prompts, vocab) or the generated ``texts[pair][prompt]``."""

    pairs: list[tuple[int, int]]
    prompts: list[str]
    logits: torch.Tensor | None = None
    texts: list[list[str]] | None = None
    tokens: list[list[list[int]]] | None = field(default=None, repr=False)

    def top_tokens(self, tokenizer, k: int = 1) -> list[list[list[str]]]:
        """The ``k`` most likely next tokens, as text, per pair and prompt (``NextToken`` readout)."""
        if self.logits is None:
            raise ValueError("this result holds generations; its texts are result.texts")
        ids = self.logits.topk(k, dim=-1).indices
        return [[[tokenizer.decode([t]) for t in row] for row in pair] for pair in ids.tolist()]


def find_span(tokenizer, text: str, span: str | Span, what: str = "span") -> tuple[int, int]:
    """[start, end) token range of ``span`` in ``text`` (tokenized by ``tokenizer``).

    An occurrence counts only where it is whole tokens: its first character starts a token (a
    leading space that the tokenizer attaches to the token belongs to it, so " Paris" and "Paris"
    both name the token " Paris") and its last character ends one; and it cuts no word of a
    script that separates its words (no letter or digit of a cased script on both sides of either
    edge), so "Paris" is not the " Paris" of " Parisian" and "x" not the end of " Texas". Space
    around the span is ignored. A span found nowhere, or only inside tokens or words, is refused in
    one line; so is one found more than once (a researcher who names a subject that the prompt
    repeats means one of them, and guessing which would patch the wrong token silently) unless a
    ``Span`` names the occurrence."""
    occurrence = span.occurrence if isinstance(span, Span) else None
    wanted = (span.text if isinstance(span, Span) else span).strip()
    if not wanted:
        raise ConfigError(f"{what} {span!r} is empty; name a span of the prompt {text!r} (or give a token index)")
    offsets = character_offsets(tokenizer, text)
    found, inside = [], 0
    start = text.find(wanted)
    while start >= 0:
        tokens = _whole_tokens(text, offsets, start, start + len(wanted))
        if tokens is None:
            inside += 1
        else:
            found.append(tokens)
        start = text.find(wanted, start + 1)
    if not found:
        if inside:
            raise ConfigError(f"{what} {wanted!r} occurs in the prompt {text!r} only inside a word or token; "
                              "name whole words of the prompt (or give a token index)")
        raise ConfigError(f"{what} {wanted!r} is not in the prompt {text!r}; name a span of the prompt (or give a token index)")
    if occurrence is None:
        if len(found) > 1:
            raise ConfigError(f"{what} {wanted!r} occurs {len(found)} times in the prompt {text!r} (ending at tokens "
                              f"{[end - 1 for _, end in found]}); name a longer span that occurs once, give a token index, "
                              f"or Span({wanted!r}, occurrence=k) to pick one "
                              "(0 the first, -1 the last)")
        return found[0]
    if not -len(found) <= occurrence < len(found):
        raise ConfigError(f"{what} {wanted!r} occurs {len(found)} time(s) in the prompt {text!r}, so there is no occurrence "
                          f"{occurrence}; pick one of {-len(found)}..{len(found) - 1}")
    return found[occurrence]


def character_offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    """(start, end) characters of each token of ``text``; a tokenizer without offsets (a slow,
    Python one) is refused in one line, as a span could not be placed on its tokens."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{type(tokenizer).__name__} gives no character offsets; a span of a prompt is found on "
                          "the tokens of a fast (Rust) tokenizer: load the model's fast tokenizer, or give a token index")
    return tokenizer(text, return_offsets_mapping=True)["offset_mapping"]


def _whole_tokens(text: str, offsets, start: int, end: int) -> tuple[int, int] | None:
    """[first, last + 1) of the tokens that hold exactly the characters start..end − 1 of ``text``,
    with only whitespace beyond them in their edge tokens, and cutting no word; None otherwise."""
    covering = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]  # never a token without characters
    if not covering:
        return None
    (first, _), (_, last) = offsets[covering[0]], offsets[covering[-1]]
    if first > start or last < end or text[first:start].strip() or text[end:last].strip():
        return None
    if _joins_word(text, start) or _joins_word(text, end):
        return None
    return covering[0], covering[-1] + 1


def _joins_word(text: str, at: int) -> bool:
    """Whether characters at − 1 and at are both letters or digits of a script that separates its
    words with spaces (cased letters, digits): then a span edge at ``at`` cuts a word. Scripts
    without cases (Chinese, Japanese, Thai…) do not mark words in the text; there the tokens alone
    decide. A combining mark at ``at`` (the accent of a decomposed "é") belongs to the character
    before it, in any script: an edge there cuts a character."""
    if at <= 0 or at >= len(text):
        return False
    if unicodedata.category(text[at]).startswith("M"):
        return True
    return all(c.isdigit() or c.isupper() or c.islower() for c in (text[at - 1], text[at]))


def token_position(tokenizer, text: str, ids: list[int], where: Position, what: str) -> int:
    """Index into ``ids`` (the tokens of ``text``) of ``where``: an index, or the last token of a
    span found by ``find_span``. One-line error when the index is out of range or the span absent,
    ambiguous or not on token boundaries."""
    n = len(ids)
    if isinstance(where, int):
        index = where + n if where < 0 else where
        if not 0 <= index < n:
            raise ConfigError(f"{what} position {where} is outside {text!r} ({n} tokens)")
        return index
    return find_span(tokenizer, text, where, what)[1] - 1


def token_ending(tokenizer, text: str, end: int) -> int | None:
    """Index of the token of ``text`` that ends where the prefix ``text[:end]`` ends (whitespace
    aside), or None when ``end`` falls inside a token or a word."""
    prefix = text[:end]
    if not prefix.strip():
        return None
    offsets = character_offsets(tokenizer, text)
    tokens = _whole_tokens(text, offsets, len(prefix) - len(prefix.lstrip()), len(prefix.rstrip()))
    return None if tokens is None else tokens[1] - 1


@dataclass
class _Group:
    """Rows of the target pass that share their target tokens."""

    ids: list[int]
    write_at: int
    rows: list[int] = field(default_factory=list)


class Patchscope:
    """A patchscope spec and its batched execution: ``run(model)`` reads the source prompts and
    patches; ``patch(model, states, layers)`` patches states read elsewhere (then ``source`` may be
    None). ``share_prefix`` False runs every row over its whole target prompt, and
    ``decode_directly`` False runs the patched forward pass even for a write into the last block's
    output read where it was written (both for checking the shortcuts)."""

    def __init__(self, source: Source | None = None, target: Target = Target(),  # noqa: B008
                 mapping: Mapping | Lens | None = None, readout: Readout = NextToken(),  # noqa: B008
                 rows_per_pass: int = 256, share_prefix: bool = True, decode_directly: bool = True):
        if rows_per_pass < 1:
            raise ConfigError(f"rows_per_pass must be at least 1, got {rows_per_pass}")
        if isinstance(readout, Generate) and readout.max_new_tokens < 1:
            raise ConfigError(f"Generate.max_new_tokens must be at least 1, got {readout.max_new_tokens}")
        if source is not None and not source.prompts:
            raise ConfigError("the patchscope's source has no prompts")
        self.source = source
        self.target = target
        self.mapping: Mapping = LensMapping(mapping) if isinstance(mapping, Lens) else (mapping or identity)
        self.readout = readout
        self.rows_per_pass = rows_per_pass
        self.share_prefix = share_prefix
        self.decode_directly = decode_directly
        self._prefixes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → {target tokens: cache}

    # --- layers --------------------------------------------------------------------------------------
    def pairs(self, num_layers: int, source_layers: Sequence[int] | None = None) -> list[tuple[int, int]]:
        """(source, target) residual indices, in order: source-major."""
        layers = list(self.source.layers if source_layers is None else source_layers)
        for layer in layers:
            if not 0 <= layer <= num_layers:
                raise ConfigError(f"source layer {layer} is out of range: residual indices are 0..{num_layers}")
        spec = self.target.layers
        if spec == "same":
            return [(s, s) for s in layers]
        if spec == "last":
            return [(s, num_layers) for s in layers]
        if isinstance(spec, str):
            raise ConfigError(f"target layers {spec!r}: use 'same', 'last' or a list of residual indices")
        for layer in spec:
            if not 0 <= layer <= num_layers:
                raise ConfigError(f"target layer {layer} is out of range: residual indices are 0..{num_layers}")
        return [(s, t) for s in layers for t in spec]

    # --- running ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, model: FrozenModel, target_model: FrozenModel | None = None) -> PatchscopeResult:
        """Read the source prompts on ``model``, patch into ``target_model`` (default: the same)."""
        states, own = self.read(model)
        result = self.patch(target_model or model, states, list(self.source.layers), own_prompts=own,
                            source_model=model)
        result.prompts = list(self.source.prompts)
        return result

    @torch.no_grad()
    def read(self, model: FrozenModel) -> tuple[torch.Tensor, list[list[int]]]:
        """The source states, (source layers, prompts, d), and each prompt's tokens up to the read
        position (the target when the target is the source prompt itself)."""
        if self.source is None:
            raise ConfigError("this patchscope has no source prompts to run; give a Source, or patch states with .patch")
        prompts = list(self.source.prompts)
        rules = self.source.position
        rules = [rules] * len(prompts) if isinstance(rules, (int, str, Span)) else list(rules)
        if len(rules) != len(prompts):
            raise ConfigError(f"{len(rules)} source positions for {len(prompts)} prompts; give one rule or one per prompt")
        layers = list(self.source.layers)
        self.pairs(model.num_layers, layers)  # range checks before any pass
        token_lists = [model.tokenizer(p)["input_ids"] for p in prompts]
        if any(not ids for ids in token_lists):
            raise ConfigError("a source prompt has no tokens")
        positions = [token_position(model.tokenizer, p, ids, r, "source") for p, ids, r in zip(prompts, token_lists, rules, strict=True)]
        residuals = model.residuals_of(token_lists)  # (L + 1, P, T, d)
        index = torch.tensor(layers, device=model.device)
        rows = torch.arange(len(prompts), device=model.device)
        states = residuals[index[:, None], rows[None, :], torch.tensor(positions, device=model.device)[None, :]]
        return states, [ids[: t + 1] for ids, t in zip(token_lists, positions, strict=True)]

    @torch.no_grad()
    def patch(self, model: FrozenModel, states: torch.Tensor, source_layers: Sequence[int],
              own_prompts: list[list[int]] | None = None, source_model: FrozenModel | None = None) -> PatchscopeResult:
        """Patch source states already read: states (num_source_layers, N, d) at ``source_layers``.
        ``own_prompts``: the N source token lists, cut after the read position (needed only for a
        target that is the source prompt itself, unless it is decoded directly). ``source_model``:
        the model the states were read from (default: ``model``); a lens as the mapping must have
        been made for it (``Lens.bind``), as it maps that model's states."""
        if isinstance(self.mapping, LensMapping):
            self.mapping.lens.bind(source_model or model)
        pairs = self.pairs(model.num_layers, source_layers)
        n = states.shape[1]
        mapped = torch.stack([self.mapping(states[list(source_layers).index(s)], s, t) for s, t in pairs])  # (pairs, N, d)
        if mapped.shape[-1] != model.d_model:
            raise ConfigError(f"the source states have width {mapped.shape[-1]} and the target model {model.d_model}; "
                              "patching across models of different widths needs a mapping between them")
        decoded = self.decode_directly and self.target.prompt is None and isinstance(self.readout, NextToken)
        if decoded and all(t == model.num_layers for _, t in pairs):
            logits = model.decode(mapped.to(model.adapter.unembedding_weight.dtype)).float()
            return PatchscopeResult(pairs, [""] * n, logits=logits)
        groups = self._groups(model, n, len(pairs), own_prompts)
        flat = mapped.reshape(len(pairs) * n, -1)
        layer_of_row = torch.tensor([t for _, t in pairs], device=flat.device).repeat_interleave(n)
        chunks = list(self._chunks(model, groups, layer_of_row))
        if isinstance(self.readout, NextToken):
            logits = torch.empty(len(pairs) * n, model.vocab_size, device=flat.device)
            for group, chunk in chunks:
                logits[chunk] = self._pass(model, group, flat[chunk], layer_of_row[chunk])[0].float()
            return PatchscopeResult(pairs, [""] * n, logits=logits.view(len(pairs), n, -1))
        tokens: list[list[int]] = [[] for _ in range(len(pairs) * n)]
        for group, chunk in chunks:
            generated = self._generate(model, group, flat[chunk], layer_of_row[chunk])
            for row, ids in zip(chunk.tolist(), generated, strict=True):
                tokens[row] = ids
        texts = [self._text(model, ids) for ids in tokens]
        shaped_texts = [texts[p * n:(p + 1) * n] for p in range(len(pairs))]
        shaped_tokens = [tokens[p * n:(p + 1) * n] for p in range(len(pairs))]
        return PatchscopeResult(pairs, [""] * n, texts=shaped_texts, tokens=shaped_tokens)

    def _chunks(self, model: FrozenModel, groups: list[_Group], layer_of_row: torch.Tensor):
        """(group, rows) for every pass: each group's rows, at most ``rows_per_pass`` at a time. Where
        a pass runs only the written token on the shared prefix, the engine skips the blocks below
        its lowest written layer, so rows of nearby layers share a pass."""
        layers = layer_of_row.tolist()
        for group in groups:
            one_token = (isinstance(self.readout, NextToken) and self.share_prefix
                         and 1 <= group.write_at == len(group.ids) - 1)
            widths = [model.num_layers - layers[row] if one_token else model.num_layers for row in group.rows]
            for run in cheapest_passes(widths, self.rows_per_pass, PASS_COST_BLOCK_ROWS):
                yield group, torch.tensor([group.rows[i] for i in run], device=layer_of_row.device)

    def _groups(self, model: FrozenModel, n: int, num_pairs: int, own_prompts) -> list[_Group]:
        """Rows (pair-major: row = pair × N + example) grouped by their target tokens."""
        if self.target.prompt is not None:
            ids = model.tokenizer(self.target.prompt)["input_ids"]
            if not ids:
                raise ConfigError(f"the target prompt {self.target.prompt!r} has no tokens")
            where = self.target.placeholder if self.target.placeholder is not None else -1
            group = _Group(ids, token_position(model.tokenizer, self.target.prompt, ids, where, "target placeholder"))
            group.rows = list(range(num_pairs * n))
            return [group]
        if own_prompts is None:
            raise ValueError("a target that is the source prompt itself needs the source tokens (own_prompts)")
        groups: dict[tuple[int, ...], _Group] = {}
        for example, ids in enumerate(own_prompts):
            group = groups.setdefault(tuple(ids), _Group(list(ids), len(ids) - 1))
            group.rows += [p * n + example for p in range(num_pairs)]
        return list(groups.values())

    # --- one target pass ---------------------------------------------------------------------------------
    def _prefix(self, model: FrozenModel, group: _Group):
        """Key/value cache of the tokens before the written position (batch 1), or None when there
        are none or this model's cache cannot stand in for them."""
        if not self.share_prefix or group.write_at < 1:
            return None
        prefixes = self._prefixes.setdefault(model, {})
        key = (tuple(group.ids[: group.write_at]), str(model.device))
        if key not in prefixes and self.target.prompt is None:
            # Each source prompt is its own target (a new text per document): keep only the
            # prefix of the group being run, whose rows come one chunk after another.
            prefixes.clear()
        if key not in prefixes:
            cache = None
            try:
                cache = model.prompt_cache(torch.tensor([group.ids[: group.write_at]], device=model.device))
                if cache is not None and not self._prefix_agrees(model, group, cache):
                    cache = None
            except Exception:  # noqa: BLE001 (any failure of a cache type means: do not use it)
                cache = None
            prefixes[key] = cache
        return prefixes[key]

    def _prefix_agrees(self, model: FrozenModel, group: _Group, cache) -> bool:
        """Two rows (different states, different layers) through the shared prefix equal full passes,
        read at the written position and at the prompt's end."""
        generator = torch.Generator().manual_seed(0)
        states = torch.randn(2, model.d_model, generator=generator).to(model.device, model.adapter.unembedding_weight.dtype)
        layers = torch.tensor([1, model.num_layers // 2 + 1], device=model.device).clamp(max=model.num_layers)
        for read_last in {False, group.write_at != len(group.ids) - 1}:
            shared = self._pass(model, group, states, layers, prefix=cache, read_last=read_last)[0]
            full = self._pass(model, group, states, layers, prefix=False, read_last=read_last)[0]
            if not torch.allclose(shared.float(), full.float(), atol=1e-3, rtol=1e-3):
                return False
        return True

    def _pass(self, model: FrozenModel, group: _Group, states: torch.Tensor, layers: torch.Tensor, prefix=None,
              keep_cache: bool = False, read_last: bool = False):
        """(logits of the group's target with states[r] written at layers[r], read at the written
        position, or at the prompt's last token if ``read_last``; the cache of the pass if
        ``keep_cache``, for generation, else None). ``prefix``: None = use the shared prefix if
        there is one, False = run the whole prompt."""
        count, device = states.shape[0], states.device
        prompt = torch.tensor(group.ids, device=device)
        if prefix is None:
            prefix = self._prefix(model, group)
        states = states.to(model.adapter.unembedding_weight.dtype)
        mask = torch.ones(count, prompt.numel(), dtype=torch.long, device=device)
        if prefix is not False and prefix is not None:  # the tokens from the written one on, after the shared prefix
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(count)
            ids, write_at = prompt[group.write_at:].expand(count, -1), 0
        else:
            cache, ids, write_at = None, prompt.expand(count, -1), group.write_at
        at = torch.full((count,), write_at, device=device)
        read = torch.full((count,), ids.shape[1] - 1, device=device) if read_last else at
        out = model.engine.run(ids, mask, layers, at, states, read, past_key_values=cache, return_cache=keep_cache)
        return out if keep_cache else (out, None)

    def _generate(self, model: FrozenModel, group: _Group, states: torch.Tensor, layers: torch.Tensor) -> list[list[int]]:
        """Greedy continuation of each row after the target prompt's end: the patched prompt pass,
        then plain cached steps."""
        readout = self.readout
        logits, cache = self._pass(model, group, states, layers, keep_cache=True, read_last=True)
        count, device = states.shape[0], states.device
        eos = model.tokenizer.eos_token_id
        mask = torch.ones(count, len(group.ids), dtype=torch.long, device=device)
        out = torch.empty(count, 0, dtype=torch.long, device=device)
        done = torch.zeros(count, dtype=torch.bool, device=device)
        argument = cache_argument(model.hf)
        for step in range(readout.max_new_tokens):
            token = logits.argmax(-1)
            out = torch.cat([out, token[:, None]], 1)
            if eos is not None:
                done |= token == eos
            if readout.stop is not None:
                done |= torch.tensor([readout.stop in model.tokenizer.decode(row) for row in out.tolist()], device=device)
            if bool(done.all()) or step == readout.max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(count, 1)], 1)
            step_out = model.hf(input_ids=token[:, None], attention_mask=mask, use_cache=True, **{argument: cache})
            cache = getattr(step_out, "cache", None) or getattr(step_out, "past_key_values", None)
            logits = step_out.logits[:, -1]
        return out.tolist()

    def _text(self, model: FrozenModel, ids: list[int]) -> str:
        eos = model.tokenizer.eos_token_id
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        text = model.tokenizer.decode(ids)
        stop = self.readout.stop if isinstance(self.readout, Generate) else None
        return text.split(stop)[0] if stop else text


class LensPatchscope(Lens):
    """An affine lens asked as a patchscope (Patchscopes §3: every lens is one): h_ℓ at position t,
    mapped by the lens, written into the last block's output of the same prompt at t, and the
    model's next token read there. Its distributions equal the lens's own (the final norm and the
    head are all that act after the write), so by default the patchscope decodes the written state
    directly, as any patchscope into the last block does; ``decode_directly`` False runs the
    patched forward pass of every position instead, to show the two agree (a pass per position).
    It needs the prompt it reads, so it decodes in a trajectory (``Trajectory.of``), not from
    states alone."""

    lens_type = "patchscope"

    def __init__(self, lens: Lens, decode_directly: bool = True, rows_per_pass: int = 256):
        super().__init__(lens.layers, lens.d_model)
        self.lens = lens
        self.offset = lens.offset
        self._scope = Patchscope(target=Target(layers="last"), mapping=lens, rows_per_pass=rows_per_pass,
                                 decode_directly=decode_directly)

    @property
    def key(self) -> str:
        return f"{self.lens.key} via patchscope"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        raise TypeError("a lens asked as a patchscope writes into the prompt it reads: use it in Trajectory.of")

    def logits(self, model: FrozenModel, h: torch.Tensor) -> torch.Tensor:
        raise TypeError("a lens asked as a patchscope writes into the prompt it reads: call "
                        "lens.prompt_logits(model, h, ids) or use it in Trajectory.of")

    @torch.no_grad()
    def prompt_logits(self, model: FrozenModel, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """h (num_layers, 1, T, d) the residuals of the prompt ``ids`` (1, T) at ``self.layers`` →
        (num_layers, 1, T, vocab): position t's state written at t of the prompt cut after t."""
        tokens = ids[0].tolist()
        own = [tokens[: t + 1] for t in range(len(tokens))]
        return self._scope.patch(model, h[:, 0], self.layers, own_prompts=own).logits.float().unsqueeze(1)
