"""The steering experiment's outputs, every file written atomically: ``results.json`` (every
task's rates, per-layer curves, indirect effects and example generations), ``table.md``,
``per_layer.csv`` (zero-shot accuracy with each vector at each layer), ``heads.csv`` (the average
indirect effect of every head), and per task ``accuracy_<task>.png`` (the curves, with the
zero-shot and ICL levels) and ``aie_<task>.png`` (the heads' heatmap)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lenscope import strict_json
from lenscope.files import atomic_write
from lenscope.patchscopes.report import grid_png, plt, png_bytes
from lenscope.steering.vectors import SteeringResult


def _pct(value: float) -> str:
    return "—" if value != value else f"{100 * value:.1f}%"  # NaN: no query in scope


def steering_markdown(results: list[SteeringResult]) -> str:
    lines = []
    for scope, title in (("all", "every test query"), ("icl_correct", "test queries the N-shot prompt answers")):
        lines += [f"Zero-shot accuracy (first answer token), {title}:", "",
                  "| task | queries | ICL (N-shot) | zero-shot | + h-vector (best layer) | + function vector (best layer) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in results:
            s = r.summary()
            rates = s[scope]
            count = s["test_queries"] if scope == "all" else s["icl_correct_queries"]
            lines.append(f"| {r.task} | {count} | {_pct(rates['icl'])} | {_pct(rates['zero_shot'])} | "
                         f"{_pct(rates['hvector']['best'])} ({rates['hvector']['best_layer']}) | "
                         f"{_pct(rates['function_vector']['best'])} ({rates['function_vector']['best_layer']}) |")
        lines.append("")
    for r in results:
        heads = ", ".join(f"({layer}, {head})" for layer, head in r.top_heads)
        lines.append(f"{r.task}: top heads (block, head) by average indirect effect: {heads}.")
        for g in r.generations[:3]:
            lines.append(f"  Q: {g['query']} (expected {g['answer']!r}): plain {g['plain']!r}, "
                         f"h-vector {g['hvector']!r}, function vector {g['function_vector']!r}")
    return "\n".join(lines)


def accuracy_png(result: SteeringResult) -> bytes:
    """Zero-shot accuracy per layer with each vector, against the zero-shot and ICL levels."""
    s = result.summary()["all"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for which, label in (("hvector", "+ h-vector"), ("function_vector", "+ function vector")):
        curve = s[which]["per_layer"]
        ax.plot(list(curve), list(curve.values()), marker="o", markersize=3, label=label)
    ax.axhline(s["icl"], color="grey", linestyle="--", label=f"{result.n_shots}-shot ICL")
    ax.axhline(s["zero_shot"], color="black", linestyle=":", label="zero-shot, nothing added")
    ax.set_xlabel("layer the vector is added at (residual index)")
    ax.set_ylabel(f"accuracy on {len(result.queries)} test queries")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{result.task}: zero-shot prompts with a task vector added")
    ax.legend(loc="upper right", fontsize=8)
    return png_bytes(fig)


def aie_png(result: SteeringResult) -> bytes:
    bound = max(1e-6, float(result.aie.abs().max()))
    return grid_png(result.aie, result.head_layers, list(range(result.aie.shape[1])),
                    f"{result.task}: average indirect effect of each head", "Δ p(answer)",
                    vmin=-bound, vmax=bound, cmap="RdBu", xlabel="head", ylabel="block")


def write_steering_report(results: list[SteeringResult], out_dir: Path, meta: dict) -> list[Path]:
    out_dir = Path(out_dir)
    data = {**meta, "tasks": [{**r.summary(), "layers": r.layers, "head_layers": r.head_layers, "aie": r.aie.tolist(),
                               "queries": r.queries, "answers": r.answers} for r in results]}
    per_layer = io.StringIO()
    writer = csv.writer(per_layer)
    writer.writerow(["task", "layer", "zero_shot", "hvector", "function_vector", "icl"])
    for r in results:
        s = r.summary()["all"]
        writer.writerows([r.task, layer, f"{s['zero_shot']:.4f}", f"{s['hvector']['per_layer'][layer]:.4f}",
                          f"{s['function_vector']['per_layer'][layer]:.4f}", f"{s['icl']:.4f}"] for layer in r.layers)
    heads = io.StringIO()
    writer = csv.writer(heads)
    writer.writerow(["task", "layer", "head", "aie"])
    for r in results:
        writer.writerows([r.task, layer, h, f"{float(r.aie[i, h]):.6f}"]
                         for i, layer in enumerate(r.head_layers) for h in range(r.aie.shape[1]))
    written = [atomic_write(out_dir / "results.json", strict_json.dumps(data)),
               atomic_write(out_dir / "table.md", steering_markdown(results) + "\n"),
               atomic_write(out_dir / "per_layer.csv", per_layer.getvalue()),
               atomic_write(out_dir / "heads.csv", heads.getvalue())]
    for r in results:
        written += [atomic_write(out_dir / f"accuracy_{r.task}.png", accuracy_png(r)),
                    atomic_write(out_dir / f"aie_{r.task}.png", aie_png(r))]
    return written


STEERING_OUTPUTS = ("results.json", "table.md", "per_layer.csv", "heads.csv", "accuracy_*.png", "aie_*.png")
"""The names (or glob patterns) of the files ``write_steering_report`` puts in its folder."""


def log_steering_to_wandb(run, results: list[SteeringResult], out_dir: Path) -> None:
    import wandb

    rows = []
    for r in results:
        s = r.summary()["all"]
        rows += [[r.task, layer, s["zero_shot"], s["hvector"]["per_layer"][layer], s["function_vector"]["per_layer"][layer],
                  s["icl"]] for layer in r.layers]
        run.log({f"steering/{r.task}/accuracy": wandb.Image(str(Path(out_dir) / f"accuracy_{r.task}.png")),
                 f"steering/{r.task}/aie": wandb.Image(str(Path(out_dir) / f"aie_{r.task}.png"))})
        for key in ("icl", "zero_shot"):
            run.summary[f"steering/{r.task}/{key}"] = s[key]
        for key in ("hvector", "function_vector"):
            run.summary[f"steering/{r.task}/{key}_best"] = s[key]["best"]
            run.summary[f"steering/{r.task}/{key}_best_layer"] = s[key]["best_layer"]
    run.log({"steering/per_layer": wandb.Table(columns=["task", "layer", "zero_shot", "hvector", "function_vector", "icl"],
                                               data=rows)})
