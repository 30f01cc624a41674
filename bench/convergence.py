"""Held-out KL per layer against wall time and tokens: lenscope's default recipe against
``tuned-lens==0.2.0``'s own.

Both train a tuned lens on every layer of the embedded model from the same packed Pile-sample
chunks, in the same order. lenscope runs its default recipe (the least-squares warm start on the
first ``--warm-start-batches`` batches, then KL steps; hidden-state cache on); the reference runs
its own recipe (SGD Nesterov from zero, linear decay over its steps) for ``--reference-steps``
steps, about 30 minutes on the 2-core CPU of docs/results.md. Both keep snapshots of the lens
during training (in memory, written after the loop, so keeping them costs no loop time); every
snapshot is then scored by the same code on the same held-out chunks (per-layer KL(final ‖ lens),
nats per token, fp32).

Reported: KL per layer against time and tokens for both; per layer, the time and tokens each
needs to reach the reference's final KL (a snapshot at or below it: our time is an upper bound),
and their ratio; throughput over the whole run (first step included) and over the KL steps alone;
and the share of this machine's fp32 and bf16 matrix-product ceilings (measured in the same run,
on the unembedding's shape) that lenscope's KL steps reach.

    python bench/convergence.py                    # about 50 minutes on a 2-core CPU

The reference runs in its own virtual environment (see bench/train_throughput.py), in fp32
(``--autocast off``): on a CPU without native bf16 its default CPU autocast runs every lens
product in emulated bf16, tens of times slower (``--reference-autocast reference`` keeps it).

Prints tables, writes JSON (``--out``) and a figure beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

# The same chunks from the same stream as the throughput bench (bench/ is on the path when run).
from train_throughput import chunks

from lenscope.datamodules.lens_data import LensDataModule
from lenscope.lenses.lens import TunedLens
from lenscope.model.frozen import FrozenModel
from lenscope.model.loading import EMBEDDED_MODEL, embedded_model_dir
from lenscope.training.lens_module import LensTrainingModule

ROOT = Path(__file__).resolve().parents[1]
PILE = ROOT.parent / "shared" / "data" / "pile-sample.jsonl.zst"


def matmul_ceiling(dtype: torch.dtype, d: int, vocab: int, rows: int = 512, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of the two unembedding products of a KL step in ``dtype``: forward (rows × d) @ (d ×
    vocab), as ``F.linear`` does it, and backward (rows × vocab) @ (vocab × d), the head's input
    gradient; ``step``: the rate of one of each (their harmonic mean), a KL step's ceiling."""
    x, w, g = (torch.randn(rows, d, dtype=dtype), torch.randn(vocab, d, dtype=dtype),
               torch.randn(rows, vocab, dtype=dtype))
    rates = {}
    for name, product in (("forward", lambda: torch.nn.functional.linear(x, w)), ("backward", lambda: g @ w)):
        product()
        start = time.perf_counter()
        for _ in range(repeats):
            product()
        rates[name] = 2 * rows * d * vocab * repeats / (time.perf_counter() - start) / 1e9
    rates["step"] = 2 / (1 / rates["forward"] + 1 / rates["backward"])
    return rates


class Snapshots(L.Callback):
    """Times (from the first step's start) and lens weights after chosen steps; the least-squares
    warm start is snapshot as step 0 (it runs inside the first step)."""

    def __init__(self, steps: set[int]):
        self.steps = steps
        self.start = 0.0
        self.taken: dict[int, tuple[float, int, dict]] = {}  # step → (seconds, tokens, weights)
        self.step_ends: list[float] = []
        self.warm_seconds = 0.0

    def on_train_start(self, trainer, module) -> None:
        original = module._warm_start

        def warm_start(dataloader_iter):
            began = time.perf_counter()
            original(dataloader_iter)
            self.warm_seconds = time.perf_counter() - began
            self.take(0, module)

        module._warm_start = warm_start
        self.start = time.perf_counter()

    def take(self, step: int, module) -> None:
        lens = module.lenses["tuned"]
        weights = {"weight": lens.weight.detach().clone(), "bias": lens.bias.detach().clone()}
        self.taken[step] = (time.perf_counter() - self.start, module.tokens_seen, weights)

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.step_ends.append(time.perf_counter() - self.start)
        if trainer.global_step in self.steps:
            self.take(trainer.global_step, module)


def run_lenscope(args, data: LensDataModule) -> dict:
    steps = {s for s in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64) if s <= args.steps} | {args.steps}
    snapshots = Snapshots(steps)
    module = LensTrainingModule(base=EMBEDDED_MODEL, cache="device", warm_start_batches=args.warm_start_batches)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, limit_val_batches=0,
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[snapshots])
    trainer.fit(module, datamodule=data)
    total = snapshots.step_ends[-1]
    tokens = module.tokens_seen
    kl_tokens = args.steps * args.batch_size * args.seq_len
    kl_seconds = total - snapshots.warm_seconds
    return {
        "implementation": "lenscope (default recipe: least-squares warm start, then KL; hidden-state cache)",
        "snapshots": {step: {"seconds": s, "tokens": t} for step, (s, t, _) in sorted(snapshots.taken.items())},
        "weights": {step: w for step, (_, _, w) in snapshots.taken.items()},
        "seconds": total, "tokens": tokens, "tokens_per_s": tokens / total,
        "warm_start_seconds": snapshots.warm_seconds, "warm_start_tokens": tokens - kl_tokens,
        "kl_steps": args.steps, "kl_tokens": kl_tokens, "kl_seconds": kl_seconds,
        "kl_tokens_per_s": kl_tokens / kl_seconds, "lens_dtype": str(module.lens_compute_dtype),
    }


def run_reference(args, train: np.ndarray, val: np.ndarray, workdir: Path) -> dict | None:
    if not Path(args.reference_python).exists():
        print(f"reference interpreter {args.reference_python!r} not found: measuring lenscope only", file=sys.stderr)
        return None
    np.save(workdir / "train.npy", train)
    np.save(workdir / "val.npy", val)
    steps = [s for s in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128) if s < args.reference_steps] + [args.reference_steps]
    cmd = [args.reference_python, str(ROOT / "bench" / "reference_tuned_lens.py"), "--model-dir", str(embedded_model_dir()),
           "--train-tokens", str(workdir / "train.npy"), "--val-tokens", str(workdir / "val.npy"),
           "--out", str(workdir / "reference.json"), "--batch-size", str(args.batch_size),
           "--threads", str(torch.get_num_threads()), "--autocast", args.reference_autocast, "--skip-eval",
           "--snapshot-steps", ",".join(map(str, steps)), "--snapshot-dir", str(workdir / "snapshots")]
    subprocess.run(cmd, check=True)
    result = json.loads((workdir / "reference.json").read_text())
    times = json.loads((workdir / "snapshots" / "times.json").read_text())
    tokens_per_step = args.batch_size * args.seq_len
    weights = {}
    for step in steps:
        state = torch.load(workdir / "snapshots" / f"step_{step}.pt", weights_only=True)
        layers = len([k for k in state if k.endswith(".weight")])
        weights[step] = {"weight": torch.stack([state[f"{i}.weight"] for i in range(layers)]),
                         "bias": torch.stack([state[f"{i}.bias"] for i in range(layers)])}
    return {
        "implementation": f"tuned-lens 0.2.0 (its recipe; autocast {args.reference_autocast})",
        "snapshots": {step: {"seconds": times[str(step)], "tokens": step * tokens_per_step} for step in steps},
        "weights": weights, "seconds": result["seconds"], "tokens": result["train_tokens"],
        "tokens_per_s": result["tokens_per_s"], "step_seconds_median": result["step_seconds_median"],
    }


@torch.no_grad()
def score(model: FrozenModel, val: np.ndarray, runs: dict) -> dict:
    """Held-out KL(final ‖ lens) per layer, nats per token, of every snapshot of every run (and the
    logit lens), by one evaluator."""
    ids = torch.from_numpy(val)
    h = model.residuals(ids).flatten(1, 2)  # (L + 1, N·T, d)
    target = model.log_probs(h[-1])
    layers = model.layers
    lens = TunedLens(layers, model.d_model)
    out = {"logit": lens.kl(model, h[layers], target, torch.float32).tolist()}
    for name, run in runs.items():
        if run is None:
            continue
        run["kl_nats"] = {}
        for step, weights in sorted(run.pop("weights").items()):
            lens.weight.copy_(weights["weight"])
            lens.bias.copy_(weights["bias"])
            run["kl_nats"][step] = lens.kl(model, h[layers], target, torch.float32).tolist()
            print(f"scored {name} step {step}", flush=True)
    return out


def first_reaching(run: dict, layer: int, target: float, key: str) -> float | None:
    """``key`` (seconds or tokens) of the run's first snapshot whose KL at ``layer`` is ≤ target."""
    for step in sorted(run["kl_nats"]):
        if run["kl_nats"][step][layer] <= target + 1e-9:
            return run["snapshots"][step][key]
    return None


def figure(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "seconds", "wall time (s, log)"), (axes[1], "tokens", "training tokens (log)")):
        for name, run, style in (("lenscope", report["lenscope"], "-"), ("tuned-lens 0.2.0", report["reference"], "--")):
            if run is None:
                continue
            steps = sorted(run["kl_nats"])
            x = [max(run["snapshots"][s][key], 1e-3) for s in steps]
            for layer, colour in ((5, "C0"), (15, "C1"), (25, "C2")):
                ax.plot(x, [run["kl_nats"][s][layer] for s in steps], style, marker="o", ms=3, color=colour,
                        label=f"{name}, residual {layer}")
            ax.plot(x, [float(np.mean(run["kl_nats"][s][1:])) for s in steps], style, marker="o", ms=3, color="k",
                    label=f"{name}, mean over blocks")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out KL(final ‖ lens), nats/token")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("Tuned-lens convergence on the embedded model, Pile sample (solid: lenscope; dashed: tuned-lens 0.2.0)")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(PILE) if PILE.exists() else "demo")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4, help="chunks per step, both")
    parser.add_argument("--steps", type=int, default=16, help="lenscope's KL steps after the warm start")
    parser.add_argument("--warm-start-batches", type=int, default=16)
    parser.add_argument("--reference-steps", type=int, default=54, help="about 30 minutes here (32.6 s per step)")
    parser.add_argument("--reference-autocast", choices=["off", "reference"], default="off")
    parser.add_argument("--val-chunks", type=int, default=8, help="held-out chunks scored")
    parser.add_argument("--reference-python", default=os.environ.get("REFERENCE_PYTHON", "/work/refvenv/bin/python"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "convergence.json")
    args = parser.parse_args(argv)

    model = FrozenModel.load(EMBEDDED_MODEL)
    data = LensDataModule(source=args.source, seq_len=args.seq_len, batch_size=args.batch_size,
                          val_max_docs=4 * args.val_chunks, num_workers=0)
    data.bind(model.tokenizer, model.context_length)
    data.setup("fit")
    ours_chunks = (args.warm_start_batches + args.steps) * args.batch_size
    train = chunks(data.train_stream, max(ours_chunks, args.reference_steps * args.batch_size))
    val = np.asarray([s["input_ids"] for s in data.val_stream][: args.val_chunks], dtype=np.int64)
    if len(val) < args.val_chunks:
        raise SystemExit(f"only {len(val)} held-out chunks; lower --val-chunks")
    ceiling = {"float32": matmul_ceiling(torch.float32, model.d_model, model.vocab_size),
               "bfloat16": matmul_ceiling(torch.bfloat16, model.d_model, model.vocab_size, repeats=1)}
    print("ceiling of a KL step's unembedding products (forward, backward → one of each), GFLOP/s: "
          + "; ".join(f"{k} {v['forward']:.1f}, {v['backward']:.1f} → {v['step']:.1f}" for k, v in ceiling.items()), flush=True)

    ours = run_lenscope(args, data)
    print(f"lenscope: {ours['tokens']} tokens in {ours['seconds']:.0f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        reference = run_reference(args, train[: args.reference_steps * args.batch_size], val, Path(tmp))
    logit = score(model, val, {"lenscope": ours, "reference": reference})

    # FLOPs of a KL step per token and layer: the head's product forward, its input gradient
    # backward, and the translator's (forward, and two products backward).
    d, vocab, layers = model.d_model, model.vocab_size, len(model.layers)
    flop_per_token = layers * (4 * d * vocab + 6 * d * d)
    achieved = ours["kl_tokens_per_s"] * flop_per_token / 1e9
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "source": args.source, "seq_len": args.seq_len, "batch_size": args.batch_size, "val_chunks": len(val),
        "val_tokens": int(val.size), "ceiling_gflops": ceiling, "lenscope_kl_gflops": achieved,
        "share_of_fp32_ceiling": achieved / ceiling["float32"]["step"],
        "share_of_bf16_ceiling": achieved / ceiling["bfloat16"]["step"],
        "logit_kl_nats": logit, "lenscope": ours, "reference": reference,
    }
    print(f"\nlenscope: warm start {ours['warm_start_tokens']} tokens in {ours['warm_start_seconds']:.0f} s, then "
          f"{ours['kl_steps']} KL steps ({ours['kl_tokens']} tokens) in {ours['kl_seconds']:.0f} s: "
          f"{ours['kl_tokens_per_s']:.1f} tokens/s, {achieved:.1f} GFLOP/s = {report['share_of_fp32_ceiling']:.0%} of "
          f"the fp32 ceiling, {report['share_of_bf16_ceiling']:.0%} of the bf16 ceiling ({ours['lens_dtype']})")
    if reference is not None:
        report["throughput_ratio_whole_run"] = ours["tokens_per_s"] / reference["tokens_per_s"]
        report["throughput_ratio_kl_steps"] = ours["kl_tokens_per_s"] / reference["tokens_per_s"]
        print(f"reference: {reference['tokens']} tokens in {reference['seconds']:.0f} s, "
              f"{reference['tokens_per_s']:.1f} tokens/s (median step {reference['step_seconds_median']:.1f} s)")
        print(f"throughput ratio: whole run {report['throughput_ratio_whole_run']:.2f}×, "
              f"KL steps alone {report['throughput_ratio_kl_steps']:.2f}×")
        final = reference["kl_nats"][max(reference["kl_nats"])]
        rows = []
        print(f"\n{'residual':>8} {'ref final KL':>12} {'ref s':>7} {'ours s':>7} {'× time':>7} {'ref tok':>8} "
              f"{'ours tok':>8} {'× tok':>6}")
        for layer, target in enumerate(final):
            ref_s, our_s = first_reaching(reference, layer, target, "seconds"), first_reaching(ours, layer, target, "seconds")
            ref_t, our_t = first_reaching(reference, layer, target, "tokens"), first_reaching(ours, layer, target, "tokens")
            row = {"residual": layer, "target_kl": target, "reference_seconds": ref_s, "lenscope_seconds": our_s,
                   "time_ratio": ref_s / our_s if our_s else None, "reference_tokens": ref_t, "lenscope_tokens": our_t,
                   "token_ratio": ref_t / our_t if our_t else None}
            rows.append(row)
            fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
            print(f"{layer:>8} {target:>12.3f} {fmt(ref_s, '7.0f')} {fmt(our_s, '7.0f')} {fmt(row['time_ratio'], '7.1f')} "
                  f"{fmt(ref_t, '8d')} {fmt(our_t, '8d')} {fmt(row['token_ratio'], '6.1f')}")
        report["time_to_reference_final_kl"] = rows
        ratios = [r["time_ratio"] for r in rows]
        if all(r is not None for r in ratios):
            print(f"time to the reference's final KL: {min(ratios):.1f}× to {max(ratios):.1f}× less for lenscope")
        else:
            print(f"lenscope did not reach the reference's final KL at {ratios.count(None)} layers")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    figure(report, args.out.with_suffix(".png"))
    print(f"\nwritten to {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
