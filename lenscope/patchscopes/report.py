"""The experiments' outputs, every file written atomically.

Attribute extraction: ``results.json``, the per-relation table (``table.md``, ``table.csv``: probe
against patchscope, mean ± std over source layers, as Patchscopes Table 2) and one (ℓ, ℓ*) heatmap
per relation (``heatmap_<relation>.png``). Entity description: ``results.json``, ``table.md`` (ROUGE-L
per layer and split, example generations), ``generations.csv`` (every layer × entity with its
score) and ``rouge_l.png`` (the paper's Fig. 3). Multi-hop: ``results.json``, ``table.md`` (the three
methods' rates, example queries), ``queries.csv``, the CoT patchscope's ``heatmap.png`` and its
difference from the control (``heatmap_minus_control.png``).
Cross-model: ``results.json``, ``table.md`` and ``grid.csv`` (precision@1 and surprisal over (ℓ,
ℓ*)), ``precision_at_1.png`` and ``surprisal_nats.png``."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib
import torch

from lenscope import strict_json

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from lenscope.files import atomic_write  # noqa: E402
from lenscope.patchscopes.attribute_extraction import RelationResult  # noqa: E402
from lenscope.patchscopes.cross_model import CrossModelResult  # noqa: E402
from lenscope.patchscopes.entity_description import DescriptionResult  # noqa: E402
from lenscope.patchscopes.multi_hop import MultiHopResult  # noqa: E402


def png_bytes(fig) -> bytes:
    """A finished figure as PNG bytes (laid out tight, 120 dpi), and closed."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def _cell(mean: float | None, std: float | None) -> str:
    return "—" if mean is None else f"{mean:.2f} ± {std:.2f}"


def table_markdown(results: list[RelationResult]) -> str:
    lines = ["| relation | kind | facts | answered | probe | patchscope |", "|---|---|---:|---:|---:|---:|"]
    for r in results:
        s = r.summary()
        lines.append(f"| {s['relation']} | {s['kind']} | {s['facts']} | {s['answered']} | "
                     f"{_cell(s['probe_mean'], s['probe_std'])} | {_cell(s['patchscope_mean'], s['patchscope_std'])} |")
    return "\n".join(lines)


def table_csv(results: list[RelationResult]) -> str:
    out = io.StringIO()
    summaries = [r.summary() for r in results]
    writer = csv.DictWriter(out, fieldnames=list(summaries[0]))
    writer.writeheader()
    writer.writerows(summaries)
    return out.getvalue()


def grid_png(grid, source_layers: list[int], target_layers: list[int], title: str, label: str,
             vmin: float | None = 0.0, vmax: float | None = 1.0, cmap: str = "viridis",
             xlabel: str = "target layer ℓ* (residual index)", ylabel: str = "source layer ℓ (residual index)") -> bytes:
    """An (ℓ, ℓ*) heatmap: source layers up, target layers across (or any rows and columns, named
    by ``ylabel`` and ``xlabel``)."""
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(grid.numpy(), origin="lower", vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(target_layers)), [str(t) for t in target_layers], fontsize=7)
    ax.set_yticks(range(len(source_layers)), [str(s) for s in source_layers], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=label)
    return png_bytes(fig)


def heatmap_png(result: RelationResult) -> bytes:
    return grid_png(result.heatmap, result.source_layers, result.target_layers,
                    f"{result.relation}: share of {len(result.answered)} answered facts extracted", "share extracted")


def write_report(results: list[RelationResult], out_dir: Path, meta: dict) -> list[Path]:
    out_dir = Path(out_dir)
    data = {**meta, "relations": [
        {**r.summary(), "source_layers": r.source_layers, "target_layers": r.target_layers,
         "heatmap": r.heatmap.tolist() if r.heatmap is not None else None,
         "patchscope_by_layer": r.patchscope.tolist() if r.patchscope is not None else None,
         "probe_by_layer": r.probe.tolist() if r.probe is not None else None,
         "answered_facts": [f.subject for f in r.answered]} for r in results]}
    written = [atomic_write(out_dir / "results.json", strict_json.dumps(data)),
               atomic_write(out_dir / "table.md", table_markdown(results) + "\n"),
               atomic_write(out_dir / "table.csv", table_csv(results))]
    written += [atomic_write(out_dir / f"heatmap_{r.relation}.png", heatmap_png(r)) for r in results if r.heatmap is not None]
    return written


def description_curve_png(result: DescriptionResult) -> bytes:
    """ROUGE-L over layers, one line per split (the paper's Fig. 3)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, curve in result.splits.items():
        count = sum(e.split == split for e in result.entities)
        ax.plot(result.layers, curve.numpy(), marker="o", markersize=3, label=f"{split} ({count} entities)")
    ax.set_xlabel("layer ℓ = ℓ* (residual index)")
    ax.set_ylabel("ROUGE-L F against the reference")
    ax.set_ylim(0, max(0.05, max(float(c.max()) for c in result.splits.values()) * 1.15))
    ax.set_title("Entity description from the name's state, per layer")
    ax.legend(loc="upper left", fontsize=8)
    return png_bytes(fig)


def description_markdown(result: DescriptionResult, examples: int = 3) -> str:
    splits = list(result.splits)
    lines = ["| layer | " + " | ".join(f"ROUGE-L {s}" for s in splits) + " |", "|---:|" + "---:|" * len(splits)]
    for i, layer in enumerate(result.layers):
        lines.append(f"| {layer} | " + " | ".join(f"{float(result.splits[s][i]):.3f}" for s in splits) + " |")
    shown = [j for s in splits for j in [k for k, e in enumerate(result.entities) if e.split == s][:examples]]
    lines += ["", "| layer | " + " | ".join(f"{result.entities[j].name} ({result.entities[j].description})" for j in shown) + " |",
              "|---:|" + "---|" * len(shown)]
    for i, layer in enumerate(result.layers):
        lines.append(f"| {layer} | " + " | ".join(result.generations[i][j].replace("|", "/") or "—" for j in shown) + " |")
    return "\n".join(lines)


def write_description_report(result: DescriptionResult, out_dir: Path, meta: dict) -> list[Path]:
    out_dir = Path(out_dir)
    data = {**meta, "layers": result.layers, "splits": {s: c.tolist() for s, c in result.splits.items()},
            "entities": [{"name": e.name, "reference": e.description, "split": e.split,
                          "generations": [result.generations[i][j] for i in range(len(result.layers))],
                          "rouge_l": result.rouge[:, j].tolist()} for j, e in enumerate(result.entities)]}
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["layer", "entity", "split", "reference", "generation", "rouge_l"])
    writer.writerows([layer, e.name, e.split, e.description, result.generations[i][j], f"{float(result.rouge[i, j]):.4f}"]
                     for i, layer in enumerate(result.layers) for j, e in enumerate(result.entities))
    return [atomic_write(out_dir / "results.json", strict_json.dumps(data)),
            atomic_write(out_dir / "table.md", description_markdown(result) + "\n"),
            atomic_write(out_dir / "generations.csv", rows.getvalue()),
            atomic_write(out_dir / "rouge_l.png", description_curve_png(result))]


def log_attribute_to_wandb(run, results: list[RelationResult], out_dir: Path) -> None:
    """The Table 2 analogue as a W&B table, each heatmap as an image, the means in the summary."""
    import wandb

    summaries = [r.summary() for r in results]
    columns = list(summaries[0])
    payload = {"attribute_extraction/table": wandb.Table(columns=columns, data=[[s[c] for c in columns] for s in summaries])}
    payload.update({f"attribute_extraction/heatmap/{r.relation}": wandb.Image(str(Path(out_dir) / f"heatmap_{r.relation}.png"))
                    for r in results if r.heatmap is not None})
    run.log(payload)
    for s in summaries:
        for key in ("patchscope_mean", "probe_mean", "answered"):
            if s[key] is not None:
                run.summary[f"attribute_extraction/{s['relation']}/{key}"] = s[key]


def log_description_to_wandb(run, result: DescriptionResult, out_dir: Path) -> None:
    """The ROUGE-L curve per split as a W&B line chart, the PNG, and every generation as a table."""
    import wandb

    splits = list(result.splits)
    rows = [[layer, e.name, e.split, e.description, result.generations[i][j], float(result.rouge[i, j])]
            for i, layer in enumerate(result.layers) for j, e in enumerate(result.entities)]
    run.log({"entity_description/rouge_l": wandb.plot.line_series(
                xs=result.layers, ys=[result.splits[s].tolist() for s in splits], keys=splits,
                title="ROUGE-L of the description read from each layer", xname="layer"),
             "entity_description/rouge_l_png": wandb.Image(str(Path(out_dir) / "rouge_l.png")),
             "entity_description/generations": wandb.Table(
                 columns=["layer", "entity", "split", "reference", "generation", "rouge_l"], data=rows)})
    for split in splits:
        run.summary[f"entity_description/{split}/max_rouge_l"] = float(result.splits[split].max())


# --- multi-hop (Patchscopes §5) ------------------------------------------------------------------------
METHOD_NAMES = {"vanilla": "vanilla (the query)", "step_by_step": '"Let\'s think step by step." + the query',
                "cot_patchscope": "CoT patchscope (any (ℓ, ℓ*))",
                "control": "control: another query's π1 state (any (ℓ, ℓ*))"}


def multi_hop_markdown(result: MultiHopResult, examples: int = 8) -> str:
    s = result.summary()
    lines = [f"{s['chains']} two-hop chains in the fact set; **{s['scored']}** have both single hops answered by the model.",
             "", "| method | solved | of | rate | share of (query, ℓ, ℓ*) rows |", "|---|---:|---:|---:|---:|"]
    for method, name in METHOD_NAMES.items():
        if f"{method}_rate" not in s:
            continue
        rate, share = s[f"{method}_rate"], s.get(f"{method}_pair_share")
        lines.append(f"| {name} | {s[f'{method}_solved']} | {s['scored']} | {'—' if rate is None else f'{rate:.1%}'} | "
                     f"{'—' if share is None else f'{share:.1%}'} |")
    solved = result.solved()
    lines += ["", "| query | answer | vanilla | step by step | CoT patchscope pairs | control pairs |", "|---|---|---|---|---:|---:|"]
    for k, q in enumerate(result.kept[:examples]):
        def shown(text: str, hit: bool) -> str:
            return ("✓ " if hit else "✗ ") + text.strip().replace("\n", " ").replace("|", "/")[:60]
        lines.append(f"| {q.query} | {q.answer} | {shown(result.vanilla[k], bool(solved['vanilla'][k]))} | "
                     f"{shown(result.step_by_step[k], bool(solved['step_by_step'][k]))} | {int(result.grid[k].sum())} | "
                     f"{'—' if result.control is None else int(result.control[k].sum())} |")
    return "\n".join(lines)


def write_multi_hop_report(result: MultiHopResult, out_dir: Path, meta: dict) -> list[Path]:
    out_dir = Path(out_dir)
    solved = result.solved()
    pairs = [[s, t] for s in result.source_layers for t in result.target_layers]

    def hit_pairs(grid) -> list[list[int]]:
        """The (ℓ, ℓ*) pairs a query's (S, T) grid marks."""
        return [p for p, hit in zip(pairs, grid.flatten().tolist(), strict=True) if hit]

    queries = [{"query": q.query, "answer": q.answer, "bridge": q.first.object,
                "relations": [q.first.relation, q.second.relation],
                "vanilla": result.vanilla[k], "step_by_step": result.step_by_step[k],
                "solved": {m: bool(v[k]) for m, v in solved.items()},
                "cot_patchscope_pairs": hit_pairs(result.grid[k]),
                **({"control_query": result.controls[k].query if result.controls[k] else None,
                    "control_pairs": hit_pairs(result.control[k])} if result.control is not None else {})}
               for k, q in enumerate(result.kept)]
    data = {**meta, **result.summary(), "source_layers": result.source_layers, "target_layers": result.target_layers,
            "heatmap": result.heatmap().tolist() if result.kept else None, "queries": queries}
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["query", "answer", "vanilla", "step_by_step", "cot_patchscope", "cot_patchscope_pairs",
                     "control", "control_pairs"])
    writer.writerows([q["query"], q["answer"], q["solved"]["vanilla"], q["solved"]["step_by_step"],
                      q["solved"]["cot_patchscope"], len(q["cot_patchscope_pairs"]), q["solved"].get("control", ""),
                      len(q.get("control_pairs", []))] for q in queries)
    written = [atomic_write(out_dir / "results.json", strict_json.dumps(data)),
               atomic_write(out_dir / "table.md", multi_hop_markdown(result) + "\n"),
               atomic_write(out_dir / "queries.csv", rows.getvalue())]
    if result.kept:
        written.append(atomic_write(out_dir / "heatmap.png", grid_png(
            result.heatmap(), result.source_layers, result.target_layers,
            f"CoT patchscope: share of {len(result.kept)} two-hop queries solved", "share solved")))
        if result.control is not None:
            gain = result.heatmap() - result.heatmap(control=True)
            bound = max(0.05, float(gain.abs().max()))
            written.append(atomic_write(out_dir / "heatmap_minus_control.png", grid_png(
                gain, result.source_layers, result.target_layers,
                "CoT patchscope minus control: what the query's own state adds", "difference in share solved",
                vmin=-bound, vmax=bound, cmap="RdBu")))
    return written


def log_multi_hop_to_wandb(run, result: MultiHopResult, out_dir: Path) -> None:
    import wandb

    s = result.summary()
    payload = {"multi_hop/rates": wandb.Table(columns=["method", "solved", "scored", "rate"],
                                              data=[[m, s[f"{m}_solved"], s["scored"], s[f"{m}_rate"]] for m in METHOD_NAMES
                                                    if f"{m}_rate" in s])}
    if result.kept:
        payload["multi_hop/heatmap"] = wandb.Image(str(Path(out_dir) / "heatmap.png"))
        if result.control is not None:
            payload["multi_hop/heatmap_minus_control"] = wandb.Image(str(Path(out_dir) / "heatmap_minus_control.png"))
    run.log(payload)
    for key, value in s.items():
        if value is not None:
            run.summary[f"multi_hop/{key}"] = value


# --- cross-model patching (Patchscopes §4.4) -------------------------------------------------------------
def cross_model_markdown(result: CrossModelResult) -> str:
    lines = []
    for name, grid, fmt in (("precision@1", result.precision, ".2f"), ("surprisal (nats)", result.surprisal, ".2f")):
        lines += [f"{name}, source layer ℓ (rows) → target layer ℓ* (columns), {result.positions} positions:", "",
                  "| ℓ \\ ℓ* | " + " | ".join(str(t) for t in result.target_layers) + " |",
                  "|---:|" + "---:|" * len(result.target_layers)]
        lines += [f"| {s} | " + " | ".join(format(float(v), fmt) for v in row) + " |"
                  for s, row in zip(result.source_layers, grid, strict=True)]
        lines.append("")
    lines.append(f"The source model's own surprisal at these positions: {result.model_surprisal:.2f} nats.")
    if result.identity_error:
        errors = ", ".join(f"{layer}: {err:.4f}" for layer, err in result.identity_error.items())
        lines.append(f"Map at ℓ* = ℓ against the identity, mean ‖f(h) − h‖ / ‖h‖ per layer: {errors}.")
    return "\n".join(lines)


def write_cross_model_report(result: CrossModelResult, out_dir: Path, meta: dict) -> list[Path]:
    out_dir = Path(out_dir)
    data = {**meta, "source_layers": result.source_layers, "target_layers": result.target_layers,
            "positions": result.positions, "precision@1": result.precision.tolist(),
            "surprisal_nats": result.surprisal.tolist(), "model_surprisal_nats": result.model_surprisal,
            "identity_error": {str(k): v for k, v in result.identity_error.items()}}
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["source_layer", "target_layer", "precision@1", "surprisal_nats"])
    writer.writerows([s, t, f"{float(result.precision[a, b]):.4f}", f"{float(result.surprisal[a, b]):.4f}"]
                     for a, s in enumerate(result.source_layers) for b, t in enumerate(result.target_layers))
    pair = f"{meta.get('model', 'M')} → {meta.get('target_model', 'M*')}"
    return [atomic_write(out_dir / "results.json", strict_json.dumps(data)),
            atomic_write(out_dir / "table.md", cross_model_markdown(result) + "\n"),
            atomic_write(out_dir / "grid.csv", rows.getvalue()),
            atomic_write(out_dir / "precision_at_1.png", grid_png(
                result.precision, result.source_layers, result.target_layers, f"{pair}: precision@1", "precision@1")),
            atomic_write(out_dir / "surprisal_nats.png", grid_png(
                result.surprisal, result.source_layers, result.target_layers, f"{pair}: surprisal", "nats",
                vmax=None))]


def log_cross_model_to_wandb(run, result: CrossModelResult, out_dir: Path) -> None:
    import wandb

    rows = [[s, t, float(result.precision[a, b]), float(result.surprisal[a, b])]
            for a, s in enumerate(result.source_layers) for b, t in enumerate(result.target_layers)]
    run.log({"cross_model/grid": wandb.Table(columns=["source_layer", "target_layer", "precision@1", "surprisal_nats"], data=rows),
             "cross_model/precision_at_1": wandb.Image(str(Path(out_dir) / "precision_at_1.png")),
             "cross_model/surprisal_nats": wandb.Image(str(Path(out_dir) / "surprisal_nats.png"))})
    run.summary["cross_model/max_precision@1"] = float(result.precision.max())
    run.summary["cross_model/positions"] = result.positions




# --- the originals: causal tracing, attention knockout, LRE ---------------------------------------------
TRACE_COLOURS = {"residual": "Purples", "mlp": "Greens", "attention": "Reds"}


def trace_png(trace) -> bytes:
    """ROME's heatmaps: one panel per kind, tokens down (the subject starred), blocks across, the
    restored p(answer) from the corrupted level up."""
    kinds = list(trace.scores)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 0.35 * len(trace.tokens) + 1.8), squeeze=False)
    labels = [f"{tok!r}*" if trace.subject[0] <= i < trace.subject[1] else repr(tok) for i, tok in enumerate(trace.tokens)]
    for ax, kind in zip(axes[0], kinds, strict=True):
        scores = trace.scores[kind].numpy()
        image = ax.imshow(scores, cmap=TRACE_COLOURS[kind], vmin=trace.corrupted, vmax=max(trace.clean, scores.max()),
                          aspect="auto")
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        step = max(1, len(trace.layers) // 10)
        ax.set_xticks(range(0, len(trace.layers), step), [str(layer) for layer in trace.layers[::step]], fontsize=7)
        ax.set_xlabel("block" if kind == "residual" else f"centre of {trace.window} blocks")
        ax.set_title(f"restoring the {kind if kind != 'residual' else 'hidden state'}", fontsize=9)
        fig.colorbar(image, ax=ax, label=f"p({trace.answer.strip()!r})" if kind == kinds[-1] else None)
    fig.suptitle(f"Causal trace: clean p = {trace.clean:.3f}, corrupted {trace.corrupted:.3f}", fontsize=10)
    return png_bytes(fig)


def trace_markdown(trace) -> str:
    lines = [f"Prompt {trace.prompt!r}, subject tokens {trace.subject[0]}..{trace.subject[1] - 1}, answer "
             f"{trace.answer!r}: clean p = {trace.clean:.4f}, corrupted (noise {trace.noise:g} × σ = {trace.noise_std:.4g}) "
             f"p = {trace.corrupted:.4f}.", ""]
    for kind, scores in trace.scores.items():
        effect = scores - trace.corrupted
        t, j = divmod(int(effect.argmax()), effect.shape[1])
        lines.append(f"{kind}: largest indirect effect {float(effect.max()):+.4f} restoring token {t} "
                     f"({trace.tokens[t]!r}) at block {trace.layers[j]}.")
    return "\n".join(lines)


def write_trace_report(trace, out_dir: Path, meta: dict) -> list[Path]:
    out_dir = Path(out_dir)
    data = {**meta, "prompt": trace.prompt, "tokens": trace.tokens, "subject": list(trace.subject),
            "answer": trace.answer, "clean": trace.clean, "corrupted": trace.corrupted, "noise": trace.noise,
            "noise_std": trace.noise_std,
            "layers": trace.layers, "window": trace.window, "scores": {k: v.tolist() for k, v in trace.scores.items()}}
    return [atomic_write(out_dir / "trace.json", strict_json.dumps(data)),
            atomic_write(out_dir / "trace.md", trace_markdown(trace) + "\n"),
            atomic_write(out_dir / "trace.png", trace_png(trace))]


def log_trace_to_wandb(run, trace, out_dir: Path) -> None:
    import wandb

    run.log({"causal_trace/heatmaps": wandb.Image(str(Path(out_dir) / "trace.png"))})
    run.summary["causal_trace/clean"] = trace.clean
    run.summary["causal_trace/corrupted"] = trace.corrupted


def knockout_png(result) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, change in result.change.items():
        ax.plot(result.layers, change.numpy(), marker="o", markersize=3, label=f"last → {name}")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel(f"block (centre of a window of {result.window})")
    ax.set_ylabel(f"% change in p({result.answer.strip()!r})")
    ax.set_title("Attention knockout: edges from the last position blocked", fontsize=10)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def knockout_markdown(result) -> str:
    lines = [f"Prompt {result.prompt!r}, answer {result.answer!r} (p = {result.probability:.4f}), window "
             f"{result.window}: % change in p when the last position cannot read …", ""]
    for name, change in result.change.items():
        if torch.isnan(change).all():
            continue
        i = int(change.nan_to_num(0).argmin())
        where = "the last position itself" if name == "last" else f"the {name} positions"
        lines.append(f"- {where}: largest drop {float(change[i]):+.1f}% at block {result.layers[i]}")
    return "\n".join(lines)


def write_knockout_report(result, out_dir: Path, meta: dict) -> list[Path]:
    out_dir = Path(out_dir)
    data = {**meta, "prompt": result.prompt, "tokens": result.tokens, "subject": list(result.subject),
            "answer": result.answer, "probability": result.probability, "layers": result.layers,
            "window": result.window, "change_percent": {k: v.tolist() for k, v in result.change.items()}}
    return [atomic_write(out_dir / "knockout.json", strict_json.dumps(data)),
            atomic_write(out_dir / "knockout.md", knockout_markdown(result) + "\n"),
            atomic_write(out_dir / "knockout.png", knockout_png(result))]


def log_knockout_to_wandb(run, result, out_dir: Path) -> None:
    import wandb

    run.log({"attention_knockout/curves": wandb.Image(str(Path(out_dir) / "knockout.png"))})


def lre_markdown(results) -> str:
    layers = sorted({r.layer for r in results})
    relations = list(dict.fromkeys(r.relation for r in results))
    by = {(r.relation, r.layer): r for r in results}
    lines = ["LRE faithfulness (share of answered test facts whose operator top-1 starts the object), per layer:", "",
             "| relation | kind | " + " | ".join(f"ℓ={layer}" for layer in layers) + " |",
             "|---|---|" + "---:|" * len(layers)]
    for name in relations:
        cells = []
        for layer in layers:
            r = by.get((name, layer))
            cells.append("—" if r is None or r.faithfulness is None else f"{r.faithfulness:.2f} ({len(r.correct)})")
        lines.append(f"| {name} | {by[(name, layers[0])].kind if (name, layers[0]) in by else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_lre_report(results, out_dir: Path, meta: dict) -> list[Path]:
    out_dir = Path(out_dir)
    rows = [{"relation": r.relation, "kind": r.kind, "layer": r.layer, "beta": r.beta, "train": r.train,
             "answered_test_facts": len(r.correct), "faithfulness": r.faithfulness,
             "predictions": dict(zip(r.tested, r.predictions, strict=True))} for r in results]
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["relation", "kind", "layer", "answered_test_facts", "faithfulness"])
    writer.writerows([r["relation"], r["kind"], r["layer"], r["answered_test_facts"],
                      "" if r["faithfulness"] is None else f"{r['faithfulness']:.4f}"] for r in rows)
    return [atomic_write(out_dir / "results.json", strict_json.dumps({**meta, "relations": rows})),
            atomic_write(out_dir / "table.md", lre_markdown(results) + "\n"),
            atomic_write(out_dir / "table.csv", table.getvalue())]


def log_lre_to_wandb(run, results, out_dir: Path) -> None:
    import wandb

    run.log({"lre/faithfulness": wandb.Table(columns=["relation", "layer", "answered", "faithfulness"],
                                             data=[[r.relation, r.layer, len(r.correct), r.faithfulness] for r in results])})


REPORTS = {
    "attribute-extraction": (write_report, log_attribute_to_wandb, table_markdown),
    "entity-description": (write_description_report, log_description_to_wandb, description_markdown),
    "multi-hop": (write_multi_hop_report, log_multi_hop_to_wandb, multi_hop_markdown),
    "cross-model": (write_cross_model_report, log_cross_model_to_wandb, cross_model_markdown),
    "causal-trace": (write_trace_report, log_trace_to_wandb, trace_markdown),
    "attention-knockout": (write_knockout_report, log_knockout_to_wandb, knockout_markdown),
    "lre": (write_lre_report, log_lre_to_wandb, lre_markdown),
}
"""Per experiment (its W&B job type): write the files, log to a W&B run, the terminal table."""

OUTPUTS = {
    "attribute-extraction": ("results.json", "table.md", "table.csv", "heatmap_*.png"),
    "entity-description": ("results.json", "table.md", "generations.csv", "rouge_l.png"),
    "multi-hop": ("results.json", "table.md", "queries.csv", "heatmap.png", "heatmap_minus_control.png"),
    "cross-model": ("results.json", "table.md", "grid.csv", "precision_at_1.png", "surprisal_nats.png"),
    "causal-trace": ("trace.json", "trace.md", "trace.png"),
    "attention-knockout": ("knockout.json", "knockout.md", "knockout.png"),
    "lre": ("results.json", "table.md", "table.csv"),
}
"""Per experiment: the names (or glob patterns) of the files its writer above puts in its folder,
claimed before the experiment runs (``lenscope.cli.outputs.claim_outputs``)."""
