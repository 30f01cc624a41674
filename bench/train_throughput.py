"""Lens-training throughput and held-out KL: lenscope against the reference ``tuned-lens==0.2.0``.

Both train a tuned lens on every layer of the same model, on the same packed token chunks in the
same order, for the same number of steps with the same recipe (SGD Nesterov, lr 1.0 in reference
units, momentum 0.9, weight decay 1e-3, linear decay, clipping 1.0); both are then scored on the
same held-out chunks (per-layer KL(final ‖ lens), nats per token, fp32). The chunks come from
lenscope's own data stream and are handed to the reference as arrays, so the data are identical.

    python bench/train_throughput.py                      # Pile sample if present, else demo corpus
    python bench/train_throughput.py --reference-python /path/to/refvenv/bin/python

The reference runs in its own virtual environment (it pins old libraries): create it with
``python -m venv refvenv && refvenv/bin/pip install torch==2.13.0 tuned-lens==0.2.0 gguf accelerate
&& refvenv/bin/pip install --no-deps torchdata==0.9.0``. Without it, only lenscope is measured.

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
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

from lenscope.datamodules.lens_data import LensDataModule
from lenscope.model.loading import EMBEDDED_MODEL, embedded_model_dir, load_base_model
from lenscope.training.lens_module import LensTrainingModule

ROOT = Path(__file__).resolve().parents[1]
PILE = ROOT.parent / "shared" / "data" / "pile-sample.jsonl.zst"


class StepTimer(L.Callback):
    """Wall time of every training step (model pass + lens update)."""

    def __init__(self):
        self.steps: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, *args) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.steps.append(time.perf_counter() - self._t)


def chunks(stream, n: int) -> np.ndarray:
    out = []
    for sample in stream:
        out.append(sample["input_ids"])
        if len(out) == n:
            break
    if len(out) < n:
        raise SystemExit(f"the corpus gives only {len(out)} chunks, {n} needed; lower --steps or --batch-size")
    return np.asarray(out, dtype=np.int64)


def run_lenscope(args, data: LensDataModule) -> dict:
    timer = StepTimer()
    module = LensTrainingModule(base=EMBEDDED_MODEL, lens_dtype=args.lens_dtype, cache="none")
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, val_check_interval=args.steps,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, gradient_clip_val=1.0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )
    trainer.fit(module, datamodule=data)
    results = module.last_results
    seconds = sum(timer.steps)
    tokens = args.steps * args.batch_size * args.seq_len
    return {
        "implementation": "lenscope",
        "train_tokens": tokens, "steps": args.steps, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "step_seconds": timer.steps, "step_seconds_median": float(np.median(timer.steps)),
        "steady_tokens_per_s": args.batch_size * args.seq_len / float(np.median(timer.steps[1:] or timer.steps)),
        "kl_nats": {"tuned": results["tuned"]["kl_nats"], "logit": results["logit"]["kl_nats"]},
        "settings": {"lens_dtype": args.lens_dtype, "model_dtype": "float32", "cache": "none (every step runs the model)"},
    }


def run_reference(args, train_tokens: np.ndarray, val_tokens: np.ndarray, workdir: Path) -> dict | None:
    if not args.reference_python or not Path(args.reference_python).exists():
        print(f"reference interpreter {args.reference_python!r} not found: measuring lenscope only", file=sys.stderr)
        return None
    np.save(workdir / "train.npy", train_tokens)
    np.save(workdir / "val.npy", val_tokens)
    out = workdir / "reference.json"
    cmd = [args.reference_python, str(ROOT / "bench" / "reference_tuned_lens.py"), "--model-dir", str(embedded_model_dir()),
           "--train-tokens", str(workdir / "train.npy"), "--val-tokens", str(workdir / "val.npy"), "--out", str(out),
           "--batch-size", str(args.batch_size), "--threads", str(torch.get_num_threads())]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(PILE) if PILE.exists() else "demo", help="corpus (lenscope --data.source)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4, help="chunks per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--val-docs", type=int, default=10, help="held-out documents scored")
    parser.add_argument("--lens-dtype", default="bfloat16", help="lenscope's lens matmul dtype (the reference uses bf16 autocast on CPU too)")
    parser.add_argument("--reference-python", default=os.environ.get("REFERENCE_PYTHON", "/work/refvenv/bin/python"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_throughput.json")
    args = parser.parse_args(argv)

    data = LensDataModule(source=args.source, seq_len=args.seq_len, batch_size=args.batch_size,
                          val_max_docs=args.val_docs, num_workers=0)
    base = load_base_model(EMBEDDED_MODEL)
    data.bind(base.tokenizer, base.model.config.max_position_embeddings)
    data.setup("fit")
    train_tokens = chunks(data.train_stream, args.steps * args.batch_size)
    val_tokens = np.asarray([s["input_ids"] for s in data.val_stream], dtype=np.int64)

    ours = run_lenscope(args, data)
    with tempfile.TemporaryDirectory() as tmp:
        reference = run_reference(args, train_tokens, val_tokens, Path(tmp))

    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "source": args.source, "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps,
        "val_chunks": len(val_tokens), "lenscope": ours, "reference": reference,
    }
    print(f"\nTuned-lens training, {args.steps} steps × {args.batch_size * args.seq_len} tokens, "
          f"held-out {len(val_tokens)} chunks of {args.seq_len} tokens ({report['machine']})")
    header = f"{'':>12} {'tokens/s':>10} {'median step s':>14}"
    print(header)
    for name, r in (("lenscope", ours), ("reference", reference)):
        if r:
            print(f"{name:>12} {r['tokens_per_s']:>10.1f} {r['step_seconds_median']:>14.2f}")
    if reference:
        report["speedup"] = ours["tokens_per_s"] / reference["tokens_per_s"]
        print(f"speed-up: {report['speedup']:.2f}×")
        print(f"\n{'residual':>8} {'logit KL':>9} {'ref tuned':>10} {'lenscope':>9}  (nats/token)")
        not_worse = 0
        for i, (lo, rt, ot) in enumerate(zip(ours["kl_nats"]["logit"], reference["kl_nats"]["tuned"],
                                             ours["kl_nats"]["tuned"], strict=True)):
            not_worse += ot <= rt
            print(f"{i:>8} {lo:>9.3f} {rt:>10.3f} {ot:>9.3f}")
        report["layers_not_worse_than_reference"] = not_worse
        print(f"lenscope KL ≤ reference KL at {not_worse} of {len(ours['kl_nats']['tuned'])} layers")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.out}")
    assert all(math.isfinite(v) for v in ours["kl_nats"]["tuned"])


if __name__ == "__main__":
    main()
