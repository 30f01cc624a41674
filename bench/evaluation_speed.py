"""Where the Patchscopes evaluation spends its time.

Runs ``lenscope evaluate`` in process (any config, lenses and options after ``--``) with timers
around its phases: the model passes over the fitting documents, the affine fits' normal
equations, the model passes over the evaluated documents, and each method's decoding (a
learned-prompt lens and the token-identity patchscope run the model; the other lenses decode with
its head). ``--reference`` runs it the way it ran before issue 13's changes: every future
offset's fit on its own, every learned-prompt row over the whole prompt and through every block,
patched rows ``rows_per_pass`` at a time in their order, documents sorted by length
``--data.batch_size`` at a time, each batch decoded on its own, freed memory returned to the
system. Without it the run is the command's, which keeps freed memory (``lenscope.allocator``).
``--compare FILE`` checks the results against another run's results.json (the same numbers:
every precision equal, the rest within float rounding). A column gives each phase's CPU time in
the kernel (page faults, mostly).

    python bench/evaluation_speed.py -- --config configs/eval/patchscopes_pile_sample.yaml \\
        --lenses artifacts/future-pile-sample/tuned ...

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import time
from collections import defaultdict
from pathlib import Path

import torch

from lenscope import allocator
from lenscope.cli import evaluate
from lenscope.datamodules import patchscope_data
from lenscope.evaluation import patchscope_module
from lenscope.evaluation.patchscope_module import PatchscopeEvaluation
from lenscope.lenses import learned_prompt, patchscope
from lenscope.lenses.learned_prompt import LearnedPromptLens
from lenscope.model.patching import PatchingEngine
from lenscope.model.residuals import ResidualReader

ROOT = Path(__file__).resolve().parents[1]


def system_seconds() -> float:
    """CPU seconds this process has spent in the kernel (page faults, mostly), every thread."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


class Timers:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.system: dict[str, float] = defaultdict(float)
        self.fitting = False

    @contextlib.contextmanager
    def phase(self, name: str):
        start, kernel = time.perf_counter(), system_seconds()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start
            self.system[name] += system_seconds() - kernel

    def wrap(self, owner, attribute: str, name_of):
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            with self.phase(name_of(*args)):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)


def separately(equations, h, subsets) -> None:
    """The fits as they were: each offset's equations updated on its own subset of the states."""
    for eq, (index, target) in zip(equations, subsets, strict=True):
        eq.update(h[:, index], target)


def in_order(widths: list[int], max_run: int, pass_cost: float = 0) -> list[list[int]]:
    """Patched rows as they were cut: in their order, ``max_run`` at a time."""
    return [list(range(start, min(start + max_run, len(widths)))) for start in range(0, len(widths), max_run)]


def fixed_batches(lengths: list[int], max_batch: int) -> list[list[int]]:
    """The batches as they were: documents sorted by length, ``max_batch`` at a time."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [[order[i] for i in run] for run in in_order(order, max_batch)]


def compare(results: dict, other: dict) -> dict:
    """Largest difference per metric family, and whether every precision is equal."""
    worst: dict[str, float] = defaultdict(float)
    unequal = []
    for metric, by_method in other["metrics"].items():
        for method, values in by_method.items():
            mine = results["metrics"][metric][method]
            gap = max(abs(a - b) for a, b in zip(mine, values, strict=True))
            family = "precision" if "precision" in metric else metric
            worst[family] = max(worst[family], gap)
            if family == "precision" and gap:
                unequal.append(f"{metric}/{method}")
    return {"max_abs_difference": dict(worst), "precision_unequal": unequal,
            "counts_equal": results["counts"] == other["counts"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", action="store_true", help="as before issue 13: separate fits, whole-prompt learned-prompt passes, every block, fixed-size batches")
    parser.add_argument("--compare", type=Path, help="results.json of another run to check the numbers against")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "evaluation_speed.json")
    parser.add_argument("evaluate_args", nargs=argparse.REMAINDER, help="after --: the arguments of lenscope evaluate")
    args = parser.parse_args(argv)
    evaluate_args = [a for a in args.evaluate_args if a != "--"]
    if args.compare and "--model.output_dir" not in evaluate_args:
        parser.error("--compare reads this run's results.json: give --model.output_dir after --")

    if not args.reference:  # as the lenscope command runs it (on the CPU, freed memory is kept for reuse)
        allocator.command_started()
    kept: list[bool] = []  # what the evaluation decided, for the report

    def keep_freed_memory(device_type: str) -> bool:
        kept.append(allocator.keep_freed_memory(device_type))
        return kept[-1]

    evaluate.keep_freed_memory = keep_freed_memory
    timers = Timers()
    start_fit = PatchscopeEvaluation.on_test_start

    def on_test_start(module):
        timers.fitting = True
        try:
            with timers.phase("fitting, in all"):
                return start_fit(module)
        finally:
            timers.fitting = False

    PatchscopeEvaluation.on_test_start = on_test_start
    timers.wrap(ResidualReader, "read", lambda *a: "model passes: fitting documents" if timers.fitting
                else "model passes: evaluated documents")
    if args.reference:
        patchscope_module.update_on_subsets = separately
        LearnedPromptLens._shares_prefix = lambda self, model: False
        PatchingEngine.skippable_blocks = staticmethod(lambda *args: 0)
        patchscope_data.length_batches = fixed_batches
        learned_prompt.cheapest_passes = patchscope.cheapest_passes = in_order
        evaluate_args += ["--model.positions_per_decode", "1"]
        patchscope_module.SCORED_AT_ONCE = 2**62  # every layer's logits scored at once
    timers.wrap(patchscope_module, "update_on_subsets", lambda *a: "normal equations")
    timers.wrap(PatchscopeEvaluation, "_decode", lambda module, method, h: f"decode: {method}")
    timers.wrap(PatchscopeEvaluation, "_score_next_token", lambda *a: "scores (log-softmax, top-5, KL)")

    start, kernel = time.perf_counter(), system_seconds()
    evaluate.main(evaluate_args)
    total, total_system = time.perf_counter() - start, system_seconds() - kernel

    seconds = dict(timers.seconds)
    fitting = seconds.pop("fitting, in all", 0.0)
    seconds["fitting: the rest (gathering states, solving)"] = fitting - seconds.get(
        "model passes: fitting documents", 0.0) - seconds.get("normal equations", 0.0)
    seconds["everything else (loading, data, reports)"] = total - fitting - sum(
        v for k, v in seconds.items() if not k.startswith(("fitting", "model passes: fitting", "normal")))
    rows = sorted(seconds.items(), key=lambda kv: -kv[1])
    print(f"\n{'phase':<52} {'seconds':>9} {'share':>7} {'kernel CPU s':>13}")
    for name, value in rows:
        kernel_time = f"{timers.system[name]:13.1f}" if name in timers.system else f"{'':13}"
        print(f"{name:<52} {value:9.1f} {value / total:7.1%} {kernel_time}")
    print(f"{'whole run':<52} {total:9.1f} {'':7} {total_system:13.1f}")

    report = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "reference": args.reference,
              "evaluate_args": evaluate_args, "keeps_freed_memory": any(kept), "total_s": total,
              "phases_s": dict(rows), "kernel_cpu_s": {"whole run": total_system, **timers.system}}
    if args.compare:
        output_dir = Path(next(evaluate_args[i + 1] for i, a in enumerate(evaluate_args) if a == "--model.output_dir"))
        report["agreement"] = compare(json.loads((output_dir / "results.json").read_text()),
                                      json.loads(args.compare.read_text()))
        print(json.dumps(report["agreement"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
