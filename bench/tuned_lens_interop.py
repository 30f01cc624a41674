"""The tuned-lens format against the real tuned-lens (0.2.0), both ways, on the embedded model.

    python bench/tuned_lens_interop.py [--reference-python /work/refvenv/bin/python]

1. tuned-lens trains a lens on the embedded model (its own training loop,
   ``bench/reference_tuned_lens.py``, a few steps on the demo corpus) and saves it in its format;
   lenscope loads it, and both decode the same hidden states: the largest difference of the
   logits is reported (aim: ≤ 1e-4).
2. lenscope writes a lens in the tuned-lens format (a lenscope artifact given with ``--lens``, or a
   random tuned lens); tuned-lens loads it with ``TunedLens.from_model_and_pretrained``; same check.

The reference runs in its own environment (``tuned-lens==0.2.0``, then
``pip install --no-deps torchdata==0.9.0``); without it the script says so and exits.
Prints a table and writes JSON (``bench/results/tuned_lens_interop.json``).
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
import warnings
from pathlib import Path

import numpy as np
import torch

import lenscope
from lenscope.datamodules.lens_data import LensDataModule
from lenscope.lenses.lens import TunedLens
from lenscope.lenses.tuned_lens_format import save_tuned_lens
from lenscope.model.loading import embedded_model_dir

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n"]

# Runs in the reference environment: tuned-lens decodes the given hidden states with the given lens.
REFERENCE_DECODE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from tuned_lens.nn.lenses import TunedLens
from tuned_lens.nn.unembed import Unembed
model_dir, lens_dir, states_path, out_path = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
recorded = json.load(open(f"{lens_dir}/config.json")).get("unembed_hash")
print("HASH_AGREES", recorded == Unembed(model).unembedding_hash())
lens = TunedLens.from_model_and_pretrained(model, lens_dir, map_location="cpu", weights_only=True)
states = torch.load(states_path, weights_only=True)  # list of (L, T, d), one per prompt
with torch.no_grad():
    out = [torch.stack([lens(h[i], i) for i in range(h.shape[0])]).float() for h in states]
torch.save(out, out_path)
"""


def reference_decode(python: str, model_dir: Path, lens_dir: Path, states: list[torch.Tensor],
                     work: Path) -> tuple[list[torch.Tensor], bool]:
    """tuned-lens's logits for ``states``, and whether the lens's recorded hash is the model's."""
    torch.save(states, work / "states.pt")
    run = subprocess.run([python, "-c", REFERENCE_DECODE, str(model_dir), str(lens_dir), str(work / "states.pt"),
                          str(work / "ref_logits.pt")], check=True, capture_output=True, text=True)
    return torch.load(work / "ref_logits.pt", weights_only=True), "HASH_AGREES True" in run.stdout


def reference_train(python: str, model_dir: Path, model, steps: int, work: Path) -> Path:
    data = LensDataModule(source="demo", seq_len=128, batch_size=4, val_max_docs=2, num_workers=0)
    data.bind(model.tokenizer, model.context_length)
    data.setup("fit")
    train = []
    for sample in data.train_stream:
        train.append(sample["input_ids"])
        if len(train) == 4 * steps:
            break
    val = [s["input_ids"] for s in data.val_stream][:4]
    np.save(work / "train.npy", np.asarray(train, dtype=np.int64))
    np.save(work / "val.npy", np.asarray(val, dtype=np.int64))
    subprocess.run([python, str(ROOT / "bench" / "reference_tuned_lens.py"), "--model-dir", str(model_dir),
                    "--train-tokens", str(work / "train.npy"), "--val-tokens", str(work / "val.npy"),
                    "--out", str(work / "reference.json"), "--batch-size", "4", "--autocast", "off",
                    "--save-lens", str(work / "reference_lens")], check=True)
    return work / "reference_lens"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-python", default=os.environ.get("REFERENCE_PYTHON", "/work/refvenv/bin/python"))
    parser.add_argument("--steps", type=int, default=4, help="tuned-lens training steps (4 chunks of 128 tokens each)")
    parser.add_argument("--lens", default=None, help="a lenscope tuned-lens artifact to export (default: a random one)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tuned_lens_interop.json")
    args = parser.parse_args(argv)
    if not Path(args.reference_python).exists():
        raise SystemExit(f"the reference environment {args.reference_python} does not exist: python3 -m venv /work/refvenv && "
                         "/work/refvenv/bin/pip install torch==2.13.0 tuned-lens==0.2.0 && "
                         "/work/refvenv/bin/pip install --no-deps torchdata==0.9.0")
    torch.set_grad_enabled(False)
    model = lenscope.load_model("embedded:smollm2-135m")
    model_dir = embedded_model_dir()
    states = [model.residuals(model.tokenize(p))[model.layers, 0] for p in PROMPTS]  # (L, T, d) each
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        reference_lens = reference_train(args.reference_python, model_dir, model, args.steps, work)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = lenscope.load_lens(reference_lens, model)
        hashes = {"lenscope reads tuned-lens's hash as this model's": not any("unembedding differs" in str(w.message) for w in caught)}
        theirs, _ = reference_decode(args.reference_python, model_dir, reference_lens, states, work)
        mine = [ours.logits(model, h) for h in states]
        rows["tuned-lens → lenscope"] = max(float((a - b).abs().max()) for a, b in zip(mine, theirs, strict=True))

        if args.lens:
            exported = lenscope.load_lens(args.lens, model)
        else:
            exported = TunedLens(model.layers, model.d_model)
            torch.manual_seed(0)
            torch.nn.init.normal_(exported.weight, std=0.02)
            torch.nn.init.normal_(exported.bias, std=0.02)
        save_tuned_lens(exported, work / "exported", model)
        theirs, agrees = reference_decode(args.reference_python, model_dir, work / "exported", states, work)
        hashes["tuned-lens reads lenscope's hash as this model's"] = agrees
        mine = [exported.logits(model, h) for h in states]
        rows["lenscope → tuned-lens"] = max(float((a - b).abs().max()) for a, b in zip(mine, theirs, strict=True))
        seconds = time.perf_counter() - start
        scale = max(float(x.abs().max()) for x in mine)

    print(f"{'direction':<24} {'max |Δ logit|':>14}   (logits up to {scale:.1f} in magnitude)")
    for name, diff in rows.items():
        print(f"{name:<24} {diff:>14.2e}   {'ok' if diff <= 1e-4 else 'ABOVE 1e-4'}")
    for name, ok in hashes.items():
        print(f"{name}: {'yes' if ok else 'NO'}")
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "date": time.strftime("%Y-%m-%d"), "prompts": PROMPTS, "reference_steps": args.steps,
              "exported_lens": args.lens or "random", "max_abs_logit_diff": rows, "hash_agrees": hashes, "logit_scale": scale, "seconds": seconds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if any(diff > 1e-4 for diff in rows.values()) or not all(hashes.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
