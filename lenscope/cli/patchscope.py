"""``lenscope patchscope``: any patchscope from the command line or a YAML file, and the
Patchscopes paper's experiments.

    lenscope patchscope run --source.prompts '["Paris is lovely"]' --source.layers '[4, 8]' \\
        --source.position Paris --target.prompt 'The country of x' --target.placeholder x --generate 10
    lenscope patchscope run --config my_patchscope.yaml
    lenscope patchscope attribute --config configs/patchscopes/attribute_extraction.yaml
    lenscope patchscope describe --config configs/patchscopes/entity_description.yaml
    lenscope patchscope multihop --config configs/patchscopes/multi_hop.yaml
    lenscope patchscope crossmodel --config configs/patchscopes/cross_model.yaml
    lenscope patchscope trace --prompt "The Eiffel Tower is located in the city of" --subject "The Eiffel Tower"
    lenscope patchscope knockout --prompt "The Eiffel Tower is located in the city of" --subject "The Eiffel Tower"
    lenscope patchscope lre --relations '[country_capital]' --layers '[6, 10]'

Every option is also a YAML key (``--print_config`` writes the file to start from).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lenscope.cli.errors import parse_error_line, run_with_clean_errors
from lenscope.cli.outputs import claim_outputs
from lenscope.errors import ConfigError, check_finite
from lenscope.lenses.patchscope import Source, Span, Target
from lenscope.model.loading import EMBEDDED_MODEL


def run(source: Source, target: Target = Target(), model: str = EMBEDDED_MODEL,  # noqa: B008
        target_model: str | None = None, lens: str | None = None, generate: int = 0, stop: str | None = "\n",
        top_k: int = 5, rows_per_pass: int = 256, out: str | None = None, overwrite: bool = False) -> None:
    """Run one patchscope and print what it read.

    Args:
        source: prompts, residual indices read, position (a token index, or a span whose last token is read).
        target: prompt with a placeholder (none: each source prompt itself), layers (same, last, or a list), placeholder.
        model: the source model: hub id, folder or embedded:smollm2-135m.
        target_model: the model patched into (default: the source model).
        lens: a lens artifact used as the mapping (its translator of the source layer).
        generate: tokens to generate greedily (0: read the next-token distribution instead).
        stop: text that ends a generation.
        top_k: next tokens printed per row (next-token readout).
        rows_per_pass: (layer pair, prompt) rows per patched forward pass.
        out: also write the results to this JSON file.
        overwrite: replace the file `out` if it exists (without it, the command refuses before any work).
    """
    from lenscope import strict_json
    from lenscope.files import atomic_write
    from lenscope.lenses.artifact import load_lens
    from lenscope.lenses.patchscope import Generate, NextToken, Patchscope
    from lenscope.model.frozen import FrozenModel

    if generate < 0:
        raise ConfigError(f"--generate must be >= 0, got {generate}")
    if out:
        claim_outputs(Path(out).parent, [Path(out).name], "--out", overwrite)
    source_model = FrozenModel.load(model)
    patched = FrozenModel.load(target_model) if target_model else source_model
    mapping = load_lens(lens, source_model) if lens else None
    readout = Generate(max_new_tokens=generate, stop=stop) if generate else NextToken()
    result = Patchscope(source, target, mapping, readout, rows_per_pass=rows_per_pass).run(source_model, patched)
    rows = []
    shown = result.texts if result.texts is not None else result.top_tokens(patched.tokenizer, top_k)
    for (s, t), per_prompt in zip(result.pairs, shown, strict=True):
        for prompt, what in zip(result.prompts, per_prompt, strict=True):
            rows.append({"source_layer": s, "target_layer": t, "prompt": prompt,
                         ("generation" if result.texts is not None else "top_tokens"): what})
            print(f"{s:>3} → {t:<3} {prompt[:40]!r:44} {what!r}")
    if out:
        atomic_write(Path(out), strict_json.dumps({"model": model, "target_model": target_model or model, "rows": rows}))
        print(f"written to {out}")


def attribute(model: str = EMBEDDED_MODEL, facts: str | None = None, relations: list[str] | None = None,
              source_layers: list[int] | None = None, target_layers: list[int] | None = None, layer_step: int = 1,
              max_new_tokens: int = 20, rows_per_pass: int = 256, probe_folds: int = 5,
              out: str = "results/attribute_extraction", wandb_project: str | None = None, overwrite: bool = False) -> None:
    """Attribute extraction (Patchscopes §4.2) against its probe baseline, per relation.

    Args:
        model: hub id, folder or embedded:smollm2-135m.
        facts: a fact-set JSON file (default: the one lenscope ships, 11 relations, 382 facts).
        relations: the relations to run (default: all of the set's).
        source_layers: residual indices read (default: 0 … L − 1, every layer_step-th).
        target_layers: residual indices written (default: as the source layers).
        layer_step: keep every n-th layer of the defaults (the full L × L sweep is L² generations per fact).
        max_new_tokens: greedy tokens generated, in which the object must appear (the paper: 20).
        rows_per_pass: (layer pair, fact) rows per patched forward pass.
        probe_folds: cross-validation folds of the probe baseline.
        out: folder for results.json, table.md, table.csv and one heatmap PNG per relation.
        wandb_project: also log the table, the heatmaps and the means to this W&B project
            (``WANDB_MODE=offline`` keeps it on disk).
        overwrite: replace the results of an earlier run in `out` (without it, the command refuses before any work).
    """
    from lenscope.model.frozen import FrozenModel
    from lenscope.patchscopes.attribute_extraction import attribute_extraction
    from lenscope.patchscopes.facts import load_facts

    _check_step(layer_step)
    fact_set = load_facts(facts)
    unknown = sorted(set(relations or []) - set(fact_set.relations))
    if unknown:
        raise ConfigError(f"--relations has {unknown}, which the fact set lacks; it has {sorted(fact_set.relations)}")
    _claim("attribute-extraction", out, overwrite)
    loaded = FrozenModel.load(model)
    layers = loaded.layers[::layer_step]
    source_layers = source_layers if source_layers is not None else layers
    def progress(result) -> None:
        s = result.summary()
        scores = (f"patchscope {s['patchscope_mean']:.2f}, probe " + ("—" if s["probe_mean"] is None else f"{s['probe_mean']:.2f}")
                  if s["patchscope_mean"] is not None else "nothing to score")
        print(f"{s['relation']}: {s['answered']} of {s['facts']} facts answered by the model; {scores}", flush=True)

    results = attribute_extraction(loaded, fact_set, relations, source_layers,
                                   target_layers if target_layers is not None else source_layers,
                                   max_new_tokens, rows_per_pass, probe_folds, on_relation=progress)
    meta = {"model": model, "revision": loaded.revision, "facts": facts or "shipped", "max_new_tokens": max_new_tokens}
    _publish("attribute-extraction", results, out, meta, wandb_project)


def describe(model: str = EMBEDDED_MODEL, entities: str | None = None, layers: list[int] | None = None,
             layer_step: int = 1, max_new_tokens: int = 50, stop: str | None = ",", rows_per_pass: int = 256,
             target_model: str | None = None, mapping: str | None = None,
             out: str = "results/entity_description", wandb_project: str | None = None, overwrite: bool = False) -> None:
    """Entity description (Patchscopes §4.3): ROUGE-L of the description read from each layer.

    Args:
        model: hub id, folder or embedded:smollm2-135m.
        entities: an entity-set JSON file (default: the one lenscope ships, well-known and rare entities).
        layers: residual indices read and written (ℓ* = ℓ; default: 0 … L − 1, every layer_step-th).
        layer_step: keep every n-th layer of the default.
        max_new_tokens: greedy tokens generated (the paper: 50).
        stop: text that ends a description (the few-shot prompt separates its pairs with ',').
        rows_per_pass: (layer, entity) rows per patched forward pass.
        target_model: describe in another model (the states of `model`, written into this one's prompt).
        mapping: a cross-model map (map.safetensors written by `lenscope patchscope crossmodel`)
            applied to the states first; default layers: those it maps to themselves.
        out: folder for results.json, table.md, generations.csv and rouge_l.png.
        wandb_project: also log the curves, the PNG and every generation to this W&B project.
        overwrite: replace the results of an earlier run in `out` (without it, the command refuses before any work).
    """
    from lenscope.model.frozen import FrozenModel
    from lenscope.patchscopes.cross_model import CrossModelMap
    from lenscope.patchscopes.entity_description import entity_description, load_entities

    _check_step(layer_step)
    entity_set = load_entities(entities)
    _claim("entity-description", out, overwrite)
    fitted = CrossModelMap.load(mapping) if mapping else None
    loaded = FrozenModel.load(model)
    patched = FrozenModel.load(target_model) if target_model else loaded
    if fitted is not None:
        fitted.check(loaded, patched)
        if layers is None:
            layers = [layer for layer in fitted.source_layers if layer in fitted.target_layers][::layer_step]
    result = entity_description(loaded, entity_set, layers if layers is not None else loaded.layers[::layer_step],
                                max_new_tokens, stop, rows_per_pass, patched, fitted)
    meta = {"model": model, "target_model": target_model or model, "mapping": mapping, "revision": loaded.revision,
            "entities": entities or "shipped", "prompt": entity_set.prompt(), "max_new_tokens": max_new_tokens, "stop": stop}
    _publish("entity-description", result, out, meta, wandb_project)


def multihop(model: str = EMBEDDED_MODEL, facts: str | None = None, source_layers: list[int] | None = None,
             target_layers: list[int] | None = None, layer_step: int = 1, max_new_tokens: int = 20,
             rows_per_pass: int = 256, control: bool = True, out: str = "results/multi_hop",
             wandb_project: str | None = None, overwrite: bool = False) -> None:
    """Multi-hop queries (Patchscopes §5): vanilla, "think step by step" and the CoT patchscope.

    Args:
        model: hub id, folder or embedded:smollm2-135m.
        facts: a fact-set JSON file whose chains (an object that is another fact's subject) make
            the two-hop queries (default: the one lenscope ships).
        source_layers: residual indices of π1's last token read (default: 0 … L − 1, every layer_step-th).
        target_layers: residual indices of π2's last token written (default: as the source layers).
        layer_step: keep every n-th layer of the defaults (the paper sweeps every pair).
        max_new_tokens: greedy tokens in which the final answer must appear (the paper: 20).
        rows_per_pass: (layer pair) rows per patched forward pass.
        control: also sweep each query with another query's π1 state (same passes): the rate a
            patch reaches without the right bridge entity.
        out: folder for results.json, table.md, queries.csv and heatmap.png.
        wandb_project: also log the rates and the heatmap to this W&B project.
        overwrite: replace the results of an earlier run in `out` (without it, the command refuses before any work).
    """
    from lenscope.model.frozen import FrozenModel
    from lenscope.patchscopes.facts import load_facts
    from lenscope.patchscopes.multi_hop import multi_hop

    _check_step(layer_step)
    fact_set = load_facts(facts)
    _claim("multi-hop", out, overwrite)
    loaded = FrozenModel.load(model)
    source_layers = source_layers if source_layers is not None else loaded.layers[::layer_step]
    result = multi_hop(loaded, fact_set, source_layers, target_layers if target_layers is not None else source_layers,
                       max_new_tokens, rows_per_pass, control, on_query=lambda i, n: print(f"query {i} of {n} swept", flush=True))
    meta = {"model": model, "revision": loaded.revision, "facts": facts or "shipped", "max_new_tokens": max_new_tokens}
    _publish("multi-hop", result, out, meta, wandb_project)


def crossmodel(model: str = EMBEDDED_MODEL, target_model: str | None = None, data: str = "demo",
               text_field: str = "text", holdout_every: int = 0, seed: int = 42, n_fit: int = 10_000,
               n_eval: int = 2_000, max_words: int = 250, max_chars: int = 2000, seq_len: int | None = None,
               fit_positions: str = "all", source_layers: list[int] | None = None,
               target_layers: list[int] | None = None, layer_step: int = 1, ridge: float = 1e-6,
               batch_size: int = 8, rows_per_pass: int = 256, out: str = "results/cross_model",
               wandb_project: str | None = None, overwrite: bool = False) -> None:
    """Cross-model patching (Patchscopes §4.4): an affine map from M's layer ℓ to M*'s layer ℓ*,
    scored by precision@1 and surprisal of M*'s prediction against M's own.

    Args:
        model: the source model M: hub id, folder or embedded:smollm2-135m.
        target_model: the model M* patched into (default: M itself; its map at ℓ* = ℓ is then the identity).
        data: the text both models read: any source train.py reads (.jsonl/.jsonl.zst, glob, hub:<id>) or demo.
        text_field: JSON field holding the document text.
        holdout_every: 0: the paper's split (first n_fit documents, then n_eval); n ≥ 2: train.py's held-out share.
        seed: seeds the shuffle and every document's read position (the paper: 42).
        n_fit: documents the maps are fitted on (the paper: 10,000).
        n_eval: documents evaluated, one position each (the paper: 2,000).
        max_words: keep documents with fewer space-separated words (the paper: 250).
        max_chars: keep documents with fewer characters (the paper: 2,000).
        seq_len: longest prefix fed to either model, in tokens (default: the shorter context).
        fit_positions: all (every aligned position of the fitting documents) or one (one random each, as the paper's code).
        source_layers: M's residual indices (default: 0 … L − 1, every layer_step-th).
        target_layers: M*'s residual indices (default: 0 … L* − 1, every layer_step-th).
        layer_step: keep every n-th layer of the defaults (the paper's code: every 5th).
        ridge: per-coordinate ridge term of the least-squares fit (smaller than `evaluate`'s 1e-3:
            the fit has tens of thousands of positions, and a larger one pulls the rare huge
            values of a massive-activation coordinate, so even the map between equal states
            drifts from the identity).
        batch_size: documents per model pass.
        rows_per_pass: (layer pair, document) rows per patched forward pass.
        out: folder for map.safetensors (the fitted maps, for `describe --mapping`), results.json,
            table.md, grid.csv and the two heatmaps.
        wandb_project: also log the grid and the heatmaps to this W&B project.
        overwrite: replace the results of an earlier run in `out` (without it, the command refuses before any work).
    """
    from lenscope.datamodules.patchscope_data import PatchscopeDataModule
    from lenscope.datamodules.sources import DataSourceError
    from lenscope.model.frozen import FrozenModel
    from lenscope.patchscopes.cross_model import (
        MAP_FILE,
        aligned_documents,
        evaluate_cross_model,
        fit_cross_model_map,
    )

    _check_step(layer_step)
    if fit_positions not in ("all", "one"):
        raise ConfigError(f"--fit_positions must be 'all' or 'one', got {fit_positions!r}")
    check_finite("--ridge", ridge)
    protocol = PatchscopeDataModule(source=data, text_field=text_field, holdout_every=holdout_every, seed=seed,
                                    n_fit=n_fit, n_eval=n_eval, max_words=max_words, max_chars=max_chars, seq_len=seq_len)
    _claim("cross-model", out, overwrite, also=(MAP_FILE,))
    source = FrozenModel.load(model)
    target = FrozenModel.load(target_model) if target_model else source
    contexts = [c for c in (source.context_length, target.context_length) if c]
    source_layers = source_layers if source_layers is not None else source.layers[::layer_step]
    target_layers = target_layers if target_layers is not None else target.layers[::layer_step]
    for layers, which, m in ((source_layers, "source", source), (target_layers, "target", target)):
        bad = [layer for layer in layers if not 0 <= layer <= m.num_layers]
        if bad:
            raise ConfigError(f"--{which}_layers {bad} out of range: residual indices are 0..{m.num_layers}")
    try:  # the protocol's own checks: --seq_len within both contexts, enough documents
        protocol.bind(source.tokenizer, min(contexts, default=None))
        fit_texts, eval_texts = protocol.documents()
    except (ConfigError, DataSourceError) as err:  # their advice names evaluate's flags (--data.n_fit): name these
        raise type(err)(str(err).replace("--data.", "--")) from None
    max_tokens = protocol.seq_len
    print(f"fitting {len(source_layers)} × {len(target_layers)} maps on {len(fit_texts)} documents", flush=True)
    mapping = fit_cross_model_map(source, target, aligned_documents(source, target, fit_texts, max_tokens),
                                  source_layers, target_layers, ridge, batch_size, fit_positions, seed)
    mapping.save(Path(out) / MAP_FILE)
    print(f"fitted on {mapping.meta['fit_positions']} aligned positions; evaluating {len(eval_texts)} documents", flush=True)
    result = evaluate_cross_model(source, target, mapping, aligned_documents(source, target, eval_texts, max_tokens),
                                  seed, protocol.trim, batch_size, rows_per_pass)
    meta = {"model": model, "target_model": target_model or model, "revision": source.revision,
            "target_revision": target.revision, "data": data, "seed": seed, "fit_documents": mapping.meta["fit_documents"],
            "fit_positions": mapping.meta["fit_positions"], "ridge": ridge,
            # Fewer positions than unknowns per output (the fit warned): recorded with the results.
            "underdetermined_fit": mapping.meta["underdetermined"]}
    _publish("cross-model", result, out, meta, wandb_project, also=[Path(out) / MAP_FILE])


def trace(prompt: str, subject: str, subject_occurrence: int | None = None, model: str = EMBEDDED_MODEL, kinds: list[str] | None = None, samples: int = 10,
          noise: float = 3.0, seed: int = 1, window: int = 10, layers: list[int] | None = None,
          rows_per_pass: int = 128, out: str = "results/causal_trace", wandb_project: str | None = None, overwrite: bool = False) -> None:
    """Causal tracing (Meng et al. 2022): which states, MLPs and attentions carry the prompt's answer.

    Args:
        prompt: text the model completes with the answer ("The Eiffel Tower is located in the city of").
        subject: the span of the prompt whose input states are corrupted ("The Eiffel Tower").
        subject_occurrence: which occurrence of a subject the prompt repeats (0 the first, -1 the last; the
            Span(text, occurrence=k) of the refusal); without it a repeated subject is refused.
        model: hub id, folder or embedded:smollm2-135m.
        kinds: what is restored: residual, mlp, attention (default: all three).
        samples: noise draws averaged over (ROME: 10).
        noise: noise standard deviation in units of the input states' σ (ROME: 3).
        seed: seeds the noise (the same draws for every restoration).
        window: blocks an MLP or attention restoration spans, centred on the column (ROME: 10).
        layers: blocks traced (default: all).
        rows_per_pass: (sample, token, block) rows per forward pass.
        out: folder for trace.json, trace.md and trace.png.
        wandb_project: also log the heatmaps to this W&B project.
        overwrite: replace the results of an earlier run in `out` (without it, the command refuses before any work).
    """
    from lenscope.model.frozen import FrozenModel
    from lenscope.patchscopes.causal_tracing import KINDS, causal_trace

    check_finite("--noise", noise, low_open=True)
    _claim("causal-trace", out, overwrite)
    loaded = FrozenModel.load(model)
    result = causal_trace(loaded, prompt, _span(subject, subject_occurrence), tuple(kinds) if kinds else KINDS, samples, noise, seed, window, layers,
                          rows_per_pass)
    meta = {"model": model, "revision": loaded.revision, "samples": samples, "noise": noise, "seed": seed}
    _publish("causal-trace", result, out, meta, wandb_project)


def _span(text: str, occurrence: int | None) -> str | Span:
    """A subject as find_span takes it: the text, or one named occurrence of it."""
    return text if occurrence is None else Span(text, occurrence)


def knockout(prompt: str, subject: str, subject_occurrence: int | None = None, model: str = EMBEDDED_MODEL, window: int = 9, layers: list[int] | None = None,
             rows_per_pass: int = 64, out: str = "results/attention_knockout", wandb_project: str | None = None, overwrite: bool = False) -> None:
    """Attention knockout (Geva et al. 2023): what the last position reads, and from where, per layer.

    Args:
        prompt: text the model completes with the answer.
        subject: the span of the prompt that names the subject.
        subject_occurrence: which occurrence of a subject the prompt repeats (0 the first, -1 the last; the
            Span(text, occurrence=k) of the refusal); without it a repeated subject is refused.
        model: hub id, folder or embedded:smollm2-135m.
        window: blocks whose edges are blocked, centred on each layer (the paper: 9).
        layers: window centres (default: every block).
        rows_per_pass: (blocked set, layer) rows per forward pass.
        out: folder for knockout.json, knockout.md and knockout.png.
        wandb_project: also log the curves to this W&B project.
        overwrite: replace the results of an earlier run in `out` (without it, the command refuses before any work).
    """
    from lenscope.model.frozen import FrozenModel
    from lenscope.patchscopes.attention_knockout import attention_knockout

    _claim("attention-knockout", out, overwrite)
    loaded = FrozenModel.load(model)
    result = attention_knockout(loaded, prompt, _span(subject, subject_occurrence), window, layers, rows_per_pass)
    _publish("attention-knockout", result, out, {"model": model, "revision": loaded.revision}, wandb_project)


def lre(model: str = EMBEDDED_MODEL, facts: str | None = None, relations: list[str] | None = None,
        layers: list[int] | None = None, n_train: int = 5, beta: float = 2.25, seed: int = 0, connector: str = " is",
        out: str = "results/lre", wandb_project: str | None = None, overwrite: bool = False) -> None:
    """LRE (Hernandez et al. 2023): each relation as an affine map of the subject's state, and its faithfulness.

    Args:
        model: hub id, folder or embedded:smollm2-135m.
        facts: a fact-set JSON file (default: the one lenscope ships).
        relations: the relations fitted (default: all of the set's).
        layers: residual indices of the subject's state (default: every 4th, from 2).
        n_train: facts whose Jacobians are averaged (the paper's code: 5).
        beta: scale of W h (the paper: 2.25 for GPT-J and GPT-2 XL).
        seed: seeds the train/test split per relation.
        connector: text between a template and its object ("The capital city of France" + " is" + " Paris").
        out: folder for results.json, table.md and table.csv.
        wandb_project: also log the table to this W&B project.
        overwrite: replace the results of an earlier run in `out` (without it, the command refuses before any work).
    """
    from lenscope.model.frozen import FrozenModel
    from lenscope.patchscopes.facts import load_facts
    from lenscope.patchscopes.lre import faithfulness, fit_relation

    fact_set = load_facts(facts)
    unknown = sorted(set(relations or []) - set(fact_set.relations))
    if unknown:
        raise ConfigError(f"--relations has {unknown}, which the fact set lacks; it has {sorted(fact_set.relations)}")
    if n_train < 1:
        raise ConfigError(f"--n_train must be at least 1, got {n_train}")
    check_finite("--beta", beta, low_open=True)
    _claim("lre", out, overwrite)
    loaded = FrozenModel.load(model)
    layers = layers if layers is not None else list(range(2, loaded.num_layers, 4))
    bad = [layer for layer in layers if not 0 <= layer < loaded.num_layers]
    if bad:
        raise ConfigError(f"--layers {bad} out of range: residual indices are 0..{loaded.num_layers - 1}")
    results = []
    for name in relations or list(fact_set.relations):
        for layer in layers:
            operator, test = fit_relation(loaded, fact_set, name, layer, n_train, beta, seed, connector)
            result = faithfulness(loaded, fact_set, operator, test, connector)
            shown = "—" if result.faithfulness is None else f"{result.faithfulness:.2f}"
            print(f"{name} at layer {layer}: {len(result.correct)} answered test facts, faithfulness {shown}", flush=True)
            results.append(result)
    meta = {"model": model, "revision": loaded.revision, "facts": facts or "shipped", "n_train": n_train, "beta": beta,
            "seed": seed, "connector": connector}
    _publish("lre", results, out, meta, wandb_project)


def _claim(job: str, out: str, overwrite: bool, also: tuple[str, ...] = ()) -> None:
    """Before the experiment: claim the files it writes in ``out`` (``claim_outputs``), with
    ``also`` those the command writes there itself."""
    from lenscope.patchscopes.report import OUTPUTS

    claim_outputs(out, [*OUTPUTS[job], *also], "--out", overwrite)


def _remove_stale(out: Path, claimed: tuple[str, ...], written: list[Path]) -> list[Path]:
    """The files in ``out`` matching ``claimed`` that are not ``written``, removed: with --overwrite,
    an earlier run's heatmap of a relation, a task or a control this run left out would otherwise
    sit beside the new results as if it were one of them."""
    kept = {Path(path).resolve() for path in written}
    stale = sorted({path for pattern in claimed for path in out.glob(pattern)
                    if path.is_file() and path.resolve() not in kept})
    for path in stale:
        path.unlink()
    return stale


def _check_step(layer_step: int) -> None:
    if layer_step < 1:
        raise ConfigError(f"--layer_step must be at least 1, got {layer_step}")


def _publish(job: str, result, out: str, meta: dict, wandb_project: str | None, also: list[Path] = (),  # noqa: B006
             report=None, claimed: tuple[str, ...] | None = None) -> None:
    """An experiment's files (``report``: its (write, log to W&B, markdown) functions, by default
    ``lenscope.patchscopes.report.REPORTS[job]``), its W&B run if asked for, and its table on the
    terminal. ``also``: files the command wrote itself, named with the others. ``claimed``: the
    names its claim looked for (default ``OUTPUTS[job]``): those this run did not write again are
    an earlier run's (replaced with --overwrite) and are removed, so the folder holds one run."""
    from lenscope.patchscopes.report import OUTPUTS, REPORTS

    write, log, markdown = report or REPORTS[job]
    written = [*also, *write(result, Path(out), meta)]
    stale = _remove_stale(Path(out), claimed or OUTPUTS[job], written)
    if stale:
        print(f"removed the earlier run's {', '.join(p.name for p in stale)} (this run has no such result)")
    if wandb_project:
        import wandb

        run = wandb.init(project=wandb_project, job_type=job, config=meta)
        try:
            log(run, result, Path(out))
        finally:
            run.finish()
    print(markdown(result))
    shown = [str(p) for p in written] if len(written) <= 6 else [*map(str, written[:3]), f"{len(written) - 3} more files"]
    print(f"\nwritten: {', '.join(shown)}")


COMMANDS = {"run": run, "attribute": attribute, "describe": describe, "multihop": multihop, "crossmodel": crossmodel,
            "trace": trace, "knockout": knockout, "lre": lre}


def main(argv: list[str] | None = None, prog: str = "lenscope patchscope") -> None:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].replace("``", "`"), exit_on_error=False)
    commands = parser.add_subcommands()
    for name, function in COMMANDS.items():
        sub = ArgumentParser(exit_on_error=False)
        sub.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
        sub.add_function_arguments(function)
        commands.add_subcommand(name, sub, help=function.__doc__.split("\n")[0])
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = parser.parse_args(argv)
    except Exception as err:  # jsonargparse's ArgumentError and the like: one line, as the other commands
        print(f"error: {parse_error_line(err)} (see `{prog} --help`)", file=sys.stderr)
        raise SystemExit(2) from None
    name = config.subcommand
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    chosen = instantiate(config)[name]
    kwargs = {k: v for k, v in vars(chosen).items() if k != "config"}
    run_with_clean_errors(lambda: COMMANDS[name](**kwargs), where="while patching; each file it writes is whole or absent")
