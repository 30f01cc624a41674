"""The experiments' outputs, every file written atomically.

Attribute extraction: ``results.json``, the per-relation table (``table.md``, ``table.csv``: probe
against patchscope, mean ± std over source layers, as Patchscopes Table 2) and one (ℓ, ℓ*) heatmap
per relation (``heatmap_<relation>.png``). Entity description: ``results.json``, ``table.md`` (ROUGE-L
per layer and split, example generations), ``generations.csv`` (every layer × entity with its
score) and ``rouge_l.png`` (the paper's Fig. 3)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from lenscope.files import atomic_write  # noqa: E402
from lenscope.patchscopes.attribute_extraction import RelationResult  # noqa: E402
from lenscope.patchscopes.entity_description import DescriptionResult  # noqa: E402


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


def heatmap_png(result: RelationResult) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(result.heatmap.numpy(), origin="lower", vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(result.target_layers)), [str(t) for t in result.target_layers], fontsize=7)
    ax.set_yticks(range(len(result.source_layers)), [str(s) for s in result.source_layers], fontsize=7)
    ax.set_xlabel("target layer ℓ* (residual index)")
    ax.set_ylabel("source layer ℓ (residual index)")
    ax.set_title(f"{result.relation}: share of {len(result.answered)} answered facts extracted")
    fig.colorbar(image, ax=ax)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def write_report(results: list[RelationResult], out_dir: Path, meta: dict) -> list[Path]:
    out_dir = Path(out_dir)
    data = {**meta, "relations": [
        {**r.summary(), "source_layers": r.source_layers, "target_layers": r.target_layers,
         "heatmap": r.heatmap.tolist() if r.heatmap is not None else None,
         "patchscope_by_layer": r.patchscope.tolist() if r.patchscope is not None else None,
         "probe_by_layer": r.probe.tolist() if r.probe is not None else None,
         "answered_facts": [f.subject for f in r.answered]} for r in results]}
    written = [atomic_write(out_dir / "results.json", json.dumps(data, indent=2) + "\n"),
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
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


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
    return [atomic_write(out_dir / "results.json", json.dumps(data, indent=2) + "\n"),
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
