"""Token-identity evaluation speed: lenscope's batched patching against one forward per pair.

For M evaluation documents of the Patchscopes protocol (one position each) and every layer ℓ, the
token-identity patchscope writes h_ℓ into the last token of its target prompt at layer ℓ and reads
the next-token distribution. Three ways, on the same states:

* ``loop``: one nnsight forward pass of the whole target prompt per (example, layer) pair, as the
  public Patchscopes code does;
* ``batched``: lenscope's engine, many pairs per forward pass, the whole prompt each;
* ``batched+prefix``: the same, with the prompt's prefix run once and its key/value cache shared
  (what ``evaluate.py`` uses).

All three must give the same distributions (max abs diff of log-probs is printed).

    python bench/patchscope_eval.py --docs 16        # Pile sample if present, else demo corpus

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from lenscope.datamodules.patchscope_data import PatchscopeDataModule, collate_documents
from lenscope.lenses.learned_prompt import IDENTITY_PROMPT
from lenscope.lenses.token_identity import token_identity
from lenscope.model.frozen import FrozenModel
from lenscope.model.loading import EMBEDDED_MODEL
from lenscope.model.residuals import ResidualReader

ROOT = Path(__file__).resolve().parents[1]
PILE = ROOT.parent / "shared" / "data" / "pile-sample.jsonl.zst"


def source_states(reader: ResidualReader, data: PatchscopeDataModule, layers: list[int]) -> torch.Tensor:
    """(num_layers, M, d) states at each evaluation document's read position."""
    batch = collate_documents(data.eval_samples, data.tokenizer.pad_token_id or 0)
    residuals = reader.read(batch["input_ids"], batch["attention_mask"])
    return residuals[layers][:, torch.arange(len(data.eval_samples)), batch["positions"][:, 0]]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--source", default=str(PILE) if PILE.exists() else "demo")
    parser.add_argument("--docs", type=int, default=16, help="evaluation documents M (× all layers)")
    parser.add_argument("--rows-per-pass", type=int, default=256)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "patchscope_eval.json")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)

    model = FrozenModel.load(args.model)
    adapter, reader = model.adapter, model.reader
    data = PatchscopeDataModule(source=args.source, n_fit=1, n_eval=args.docs)
    data.bind(model.tokenizer, None)
    data.setup()
    layers = list(range(adapter.num_layers))
    states = source_states(reader, data, layers)
    m = states.shape[1]
    pairs = len(layers) * m

    prefix = token_identity(rows_per_pass=args.rows_per_pass)
    full = token_identity(rows_per_pass=args.rows_per_pass, share_prefix=False)
    loop = token_identity(rows_per_pass=1, share_prefix=False)
    prefix.patch(model, states[:1, :1], layers[:1])  # warm-up (first-call allocations, prefix cache)

    results = {}
    outputs = {}
    for name, scope in (("batched+prefix", prefix), ("batched", full), ("loop", loop)):
        outputs[name], seconds = timed(lambda scope=scope: torch.log_softmax(scope.patch(model, states, layers).logits, -1))
        results[name] = {"seconds": seconds, "pairs_per_second": pairs / seconds}
        print(f"{name:>15}: {seconds:8.2f} s  ({pairs / seconds:8.1f} pairs/s)", flush=True)
    diff = {name: float((outputs[name] - outputs["loop"]).abs().max()) for name in ("batched", "batched+prefix")}

    report = {
        "model": args.model, "source": args.source, "documents": m, "layers": len(layers), "pairs": pairs,
        "prompt_tokens": len(model.tokenizer(IDENTITY_PROMPT)["input_ids"]), "rows_per_pass": args.rows_per_pass, "results": results,
        "speedup_vs_loop": {name: results["loop"]["seconds"] / results[name]["seconds"] for name in ("batched", "batched+prefix")},
        "max_abs_diff_log_probs_vs_loop": diff,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
    }
    print(f"\nToken identity, {m} documents × {len(layers)} layers = {pairs} (example, layer) pairs, "
          f"{report['prompt_tokens']}-token prompt, {args.model}")
    print(f"{'method':>15} {'seconds':>9} {'pairs/s':>9} {'× loop':>8} {'max |Δ log p|':>14}")
    for name in ("loop", "batched", "batched+prefix"):
        speed = report["speedup_vs_loop"].get(name, 1.0)
        print(f"{name:>15} {results[name]['seconds']:9.2f} {results[name]['pairs_per_second']:9.1f} {speed:8.1f} "
              f"{diff.get(name, 0.0):14.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
