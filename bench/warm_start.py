"""What the least-squares warm start buys the KL-trained tuned lens.

Fits the affine lens in closed form (``lens_type: affine``) on the training stream, then trains the
tuned lens for the same number of steps twice — from zero (the logit lens) and from the affine fit —
and scores all of them on the same held-out chunks: per-layer KL(final ‖ lens), nats per token.

    python bench/warm_start.py --steps 20 --affine-steps 40

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L

from lenscope.datamodules.lens_data import LensDataModule
from lenscope.lenses.artifact import save_lens
from lenscope.model.loading import EMBEDDED_MODEL
from lenscope.training.lens_module import LensTrainingModule

ROOT = Path(__file__).resolve().parents[1]
PILE = ROOT.parent / "shared" / "data" / "pile-sample.jsonl.zst"


def run(args, steps: int, **module_kwargs) -> tuple[LensTrainingModule, dict, float]:
    module = LensTrainingModule(base=EMBEDDED_MODEL, cache="none", **module_kwargs)
    data = LensDataModule(source=args.source, seq_len=args.seq_len, batch_size=args.batch_size,
                          val_max_docs=args.val_docs, num_workers=1)
    trainer = L.Trainer(accelerator="auto", devices=1, max_steps=steps, val_check_interval=steps,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0, gradient_clip_val=1.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return module, module.last_results, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(PILE) if PILE.exists() else "demo")
    parser.add_argument("--steps", type=int, default=20, help="tuned-lens SGD steps, both runs")
    parser.add_argument("--affine-steps", type=int, default=40, help="batches for the least-squares fit")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--val-docs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "warm_start.json")
    args = parser.parse_args(argv)

    affine, affine_results, affine_s = run(args, args.affine_steps, lens_type="affine")
    with tempfile.TemporaryDirectory() as tmp:
        lens_dir = save_lens(affine.lenses["affine"], Path(tmp) / "affine", base_model=EMBEDDED_MODEL, revision=affine.frozen.revision,
                             unembed_hash=affine.frozen.unembed_hash, num_hidden_layers=affine.frozen.num_layers)
        _, cold, cold_s = run(args, args.steps)
        _, warm, warm_s = run(args, args.steps, init_lens=str(lens_dir))
    report = {
        "source": args.source, "steps": args.steps, "affine_steps": args.affine_steps,
        "tokens_per_step": args.batch_size * args.seq_len, "val_docs": args.val_docs,
        "seconds": {"affine_fit": affine_s, "tuned_from_zero": cold_s, "tuned_from_affine": warm_s},
        "kl_nats": {"logit": cold["logit"]["kl_nats"], "affine": affine_results["affine"]["kl_nats"],
                    "tuned_from_zero": cold["tuned"]["kl_nats"], "tuned_from_affine": warm["tuned"]["kl_nats"]},
    }
    print(f"\nheld-out KL(final ‖ lens), nats/token; tuned lenses after {args.steps} steps, "
          f"affine fitted on {args.affine_steps} batches")
    print(f"{'residual':>8} {'logit':>8} {'affine':>8} {'tuned/0':>8} {'tuned/aff':>9}")
    k = report["kl_nats"]
    for i in range(len(k["logit"])):
        print(f"{i:>8} {k['logit'][i]:>8.3f} {k['affine'][i]:>8.3f} {k['tuned_from_zero'][i]:>8.3f} "
              f"{k['tuned_from_affine'][i]:>9.3f}")
    means = {name: sum(v[1:]) / len(v[1:]) for name, v in k.items()}
    report["mean_kl_nats_blocks"] = means
    print("mean over blocks (embeddings excluded): " + ", ".join(f"{n} {m:.3f}" for n, m in means.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
