"""Evaluation outputs: ``results.json``, ``results.csv``, one PNG per metric, and W&B.

Every file is written to a temporary name and renamed into place, so a crash never leaves a half
file where a reader expects a complete one.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import matplotlib

from lenscope import strict_json

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from lenscope.files import atomic_write  # noqa: E402
from lenscope.lenses.metrics import per_layer_table  # noqa: E402

DESCRIPTIONS = {
    "precision@1": "precision@1: argmax agrees with the model's own next token",
    "precision@5": "precision@5: the model's next token is in the method's top 5",
    "surprisal_nats": "surprisal (nats): −ln p_model(method's argmax)",
    "kl_nats": "KL(model ‖ method), nats",
}


def describe(metric: str) -> str:
    if metric in DESCRIPTIONS:
        return DESCRIPTIONS[metric]
    offset, _, name = metric.partition("/")
    k = offset.removeprefix("future+")
    against = "the model's own prediction" if name.endswith("_model") else "the real token"
    return f"precision@1, {k} token(s) after the next, against {against}"


def file_stem(metric: str) -> str:
    """``future+1/precision@1_model`` → ``future+1_precision_at_1_model``."""
    return re.sub(r"[^A-Za-z0-9+_.-]", "_", metric.replace("@", "_at_").replace("/", "_"))


def csv_text(results: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["metric", "method", "layer", "value", "positions"])
    for metric, by_method in results["metrics"].items():
        for method, values in by_method.items():
            n = results["counts"][metric][method]
            for layer, value in zip(results["layers"], values, strict=True):
                writer.writerow([metric, method, layer, f"{value:.6g}", n])
    return out.getvalue()


def plot_metric(results: dict, metric: str) -> bytes:
    """PNG: one line per method over layers, each labelled at its right end (no legend to hunt)."""
    layers = results["layers"]
    by_method = results["metrics"][metric]
    # One colour per method across every plot of a report, so a method is recognised at a glance.
    every_method = list(dict.fromkeys(m for series in results["metrics"].values() for m in series))
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    ends = []
    for method, values in by_method.items():
        color = plt.cm.tab10(every_method.index(method) % 10)
        style = "--" if method == "bigram" else "-"
        ax.plot(layers, values, style, color=color, linewidth=2, marker="o", markersize=3)
        ends.append([values[-1], method, color])
    # Labels at the right end, nudged apart so that close lines stay readable.
    low, high = ax.get_ylim()
    gap = (high - low) * 0.045
    ends.sort(key=lambda e: e[0] if e[0] == e[0] else low)
    for j in range(1, len(ends)):
        ends[j][0] = max(ends[j][0], ends[j - 1][0] + gap)
    for y, method, color in ends:
        ax.annotate(method, xy=(layers[-1], y), xytext=(6, 0), textcoords="offset points", va="center",
                    color=color, fontsize=9, fontweight="bold")
    ax.set_xlim(layers[0] - 0.5, layers[-1] + (layers[-1] - layers[0]) * 0.25 + 1)
    ax.set_xlabel("layer (residual index: 0 = embeddings, ℓ = output of block ℓ−1)")
    ax.set_ylabel(metric.split("/")[-1])
    n = results["documents"]["eval"]
    ax.set_title(f"{describe(metric)}\n{results['model']}, {n} evaluation positions", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def markdown_tables(results: dict) -> str:
    """The Patchscopes Fig. 2 table (precision@1 and surprisal per method and layer) and, per
    future offset, the Future Lens table (precision@1 against the model and the real token)."""
    layers, metrics = results["layers"], results["metrics"]
    parts = [f"Model {results['model']}, {results['documents']['eval']} evaluation positions "
             f"({results['documents']['fit']} fitting documents).", ""]
    parts += [f"{method} is {fit_note(results['underdetermined_fits'][method])}, so its numbers say little about the method.\n"
              for method in results.get("underdetermined_fits", {})]
    if "precision@1" in metrics:
        methods = list(metrics["precision@1"])
        columns = {**{f"P@1 {m}": metrics["precision@1"][m] for m in methods},
                   **{f"surprisal {m}": metrics["surprisal_nats"][m] for m in methods}}
        parts += ["Next token (Patchscopes Fig. 2): precision@1 against the model's own next token; "
                  "surprisal in nats.", "", per_layer_table(layers, columns), ""]
    for metric in metrics:
        if metric.startswith("future+") and metric.endswith("_model"):
            k = metric.split("/")[0].removeprefix("future+")
            real = metric.replace("_model", "_real")
            methods = list(metrics[metric])
            columns = {**{f"{m} (model)": metrics[metric][m] for m in methods},
                       **{f"{m} (real)": metrics[real][m] for m in methods}}
            parts += [f"Offset {k} (Future Lens N = {k}): precision@1 of the token {k} after the next, against "
                      "the model's own prediction there (model) and the real token (real).", "",
                      per_layer_table(layers, columns), ""]
    return "\n".join(parts)


def summary_lines(results: dict, shown: int = 5) -> list[str]:
    """One line per method (each lens, each baseline): mean KL over the layers and precision@1 at
    ``shown`` evenly spaced layers, the first and the last among them."""
    layers, metrics = results["layers"], results["metrics"]
    if "precision@1" not in metrics or not layers:
        return []
    picks = sorted({round(i * (len(layers) - 1) / max(1, shown - 1)) for i in range(shown)})
    at = "/".join(str(layers[i]) for i in picks)
    lines = [f"Summary on {results['documents']['eval']} positions of {results['protocol']['source']}:"]
    width = max(len(m) for m in metrics["precision@1"])
    underdetermined = results.get("underdetermined_fits", {})
    # An underdetermined fit's numbers say little about the method: it is listed last, and marked.
    for method in sorted(metrics["precision@1"], key=lambda m: m in underdetermined):
        precision = metrics["precision@1"][method]
        kl = metrics.get("kl_nats", {}).get(method)
        mean_kl = f"mean KL {sum(kl) / len(kl):6.3f} nats" if kl else "mean KL      —     "
        values = "/".join(f"{precision[i]:.2f}" for i in picks)
        lines.append(f"  {method:<{width}}  {mean_kl}, precision@1 at layers {at}: {values}"
                     + (f"  [{fit_note(underdetermined[method])}]" if method in underdetermined else ""))
    return lines


def fit_note(fit: dict) -> str:
    """What an underdetermined least-squares fit (``{"positions": n, "unknowns": u}``) is, and the fix."""
    return (f"an underdetermined fit ({fit['positions']} positions for {fit['unknowns']} unknowns: raise --data.n_fit "
            "or use --data.fit_positions all)")


def write_report(results: dict, out_dir: Path, wandb_runs: list = ()) -> list[Path]:
    """Write results.json, results.csv, results.md (tables) and one PNG per metric; log them to
    the given W&B runs."""
    out_dir = Path(out_dir)
    written = []
    atomic_write(out_dir / "results.json", strict_json.dumps(results).encode())
    atomic_write(out_dir / "results.csv", csv_text(results).encode())
    atomic_write(out_dir / "results.md", markdown_tables(results).encode())
    written += [out_dir / "results.json", out_dir / "results.csv", out_dir / "results.md"]
    for metric in results["metrics"]:
        path = out_dir / f"{file_stem(metric)}.png"
        atomic_write(path, plot_metric(results, metric))
        written.append(path)
    for run in wandb_runs:
        log_to_wandb(run, results, out_dir)
    return written


def log_to_wandb(run, results: dict, out_dir: Path) -> None:
    """Per metric: a line chart over layers (one line per method) and the PNG; plus one table."""
    import wandb

    layers = results["layers"]
    rows = []
    payload = {}
    for metric, by_method in results["metrics"].items():
        methods = list(by_method)
        payload[f"patchscopes/{metric}"] = wandb.plot.line_series(
            xs=layers, ys=[by_method[m] for m in methods], keys=methods, title=describe(metric), xname="layer")
        payload[f"patchscopes_png/{metric}"] = wandb.Image(str(out_dir / f"{file_stem(metric)}.png"))
        rows += [[metric, m, layer, v] for m in methods for layer, v in zip(layers, by_method[m], strict=True)]
    payload["patchscopes/table"] = wandb.Table(columns=["metric", "method", "layer", "value"], data=rows)
    run.log(payload)
    for metric, by_method in results["metrics"].items():
        for method, values in by_method.items():
            run.summary[f"patchscopes/{metric}/{method}/mean"] = sum(values) / len(values)
