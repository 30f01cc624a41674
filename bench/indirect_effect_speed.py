"""Function vectors' head sweep: the batched indirect effects (one row per (layer, head), the
prompt's prefix run once and shared) against one patched forward pass per head and prompt, the
way the paper's code and the nnsight demo loop. Prints a table, writes JSON, and checks that the
effects agree.

    python bench/indirect_effect_speed.py                 # embedded model, antonyms, 2 shuffled prompts
    python bench/indirect_effect_speed.py --prompts 4 --task country_capital
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from lenscope.model.frozen import FrozenModel
from lenscope.model.loading import EMBEDDED_MODEL
from lenscope.model.patching import Intervention
from lenscope.steering.tasks import build_prompts, load_task
from lenscope.steering.vectors import encode, indirect_effects, mean_last_states

ROOT = Path(__file__).resolve().parents[1]


def one_pass_per_head(model, tokens: list[list[int]], answers: torch.Tensor, mean_heads: torch.Tensor) -> torch.Tensor:
    heads = model.heads
    effects = torch.zeros(len(heads.layers), heads.num_heads)
    for ids, answer in zip(tokens, answers.tolist(), strict=True):
        x = torch.tensor([ids], device=model.device)
        last = torch.tensor([len(ids) - 1], device=model.device)
        p0 = torch.softmax(model.engine.forward(x, None, [], last).float(), -1)[0, answer]
        for i, layer in enumerate(heads.layers):
            for h in range(heads.num_heads):
                write = Intervention(layer, torch.tensor([0]), last, mean_heads[i, h][None], heads=torch.tensor([h]))
                p1 = torch.softmax(model.engine.forward(x, None, [write], last).float(), -1)[0, answer]
                effects[i, h] += (p1 - p0).item() / len(tokens)
    return effects


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--task", default="antonyms")
    parser.add_argument("--prompts", type=int, default=2, help="shuffled prompts the effects average over")
    parser.add_argument("--n-shots", type=int, default=10)
    parser.add_argument("--rows-per-pass", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "indirect_effect_speed.json")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)

    model = FrozenModel.load(args.model)
    prompts = build_prompts(load_task(args.task), args.n_shots, n_prompts=max(args.prompts, 20), seed=0)
    clean, _ = encode(model, prompts.clean)
    shuffled, answers = encode(model, prompts.shuffled[: args.prompts])
    _, mean_heads = mean_last_states(model, clean)
    heads = model.heads
    runs = {"batched + shared prefix": lambda: indirect_effects(model, shuffled, answers, mean_heads, args.rows_per_pass),
            "one pass per (prompt, head)": lambda: one_pass_per_head(model, shuffled, answers, mean_heads)}
    timings, effects = {}, {}
    for name, run in runs.items():
        start = time.perf_counter()
        effects[name] = run()
        timings[name] = time.perf_counter() - start
        print(f"{name:>28}: {timings[name]:8.2f} s", flush=True)
    a, b = effects.values()
    difference = float((a - b).abs().max())
    same_top = [tuple(map(int, divmod(int(i), heads.num_heads))) for i in a.flatten().argsort(descending=True)[:10]] == \
               [tuple(map(int, divmod(int(i), heads.num_heads))) for i in b.flatten().argsort(descending=True)[:10]]
    loop = timings["one pass per (prompt, head)"]
    report = {"model": args.model, "task": args.task, "prompts": args.prompts, "n_shots": args.n_shots,
              "heads": len(heads.layers) * heads.num_heads, "prompt_tokens": [len(t) for t in shuffled],
              "seconds": timings, "speedup": loop / timings["batched + shared prefix"],
              "max_abs_difference": difference, "same_top_10_heads": same_top,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(),
                          "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
    print(f"\n{args.prompts} shuffled {args.task} prompts × {report['heads']} heads, {args.model}")
    print(f"{'method':>28} {'seconds':>9} {'× loop':>7}")
    for name, seconds in timings.items():
        print(f"{name:>28} {seconds:9.2f} {loop / seconds:7.1f}")
    print(f"largest difference in an effect: {difference:.2e} (probabilities); same top-10 heads, same order: {same_top}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
