"""``lenscope steer``: h-vectors and function vectors on in-context tasks (Todd et al. 2024; the
nnsight demo), zero-shot accuracy with each vector per layer, the heads' indirect effects, and
generations with the vector held on every new token.

    lenscope steer --config configs/steering/icl_tasks.yaml
    lenscope steer --tasks '[antonyms]' --layer_step 3 --out results/steering/antonyms
    lenscope steer --tasks '[my_pairs.json]'      # any file {"pairs": [["input", "output"], ...]}

Every option is also a YAML key (``--print_config`` writes the file to start from).
"""

from __future__ import annotations

import sys

from lenscope.cli.errors import parse_error_line, run_with_clean_errors
from lenscope.cli.outputs import claim_outputs
from lenscope.errors import ConfigError
from lenscope.model.loading import EMBEDDED_MODEL

DEFAULT_TASKS = ("antonyms", "country_capital", "present_past")


def steer(model: str = EMBEDDED_MODEL, tasks: list[str] | None = None, n_shots: int = 10,
          n_prompts: int = 100, aie_prompts: int = 25, test_share: float = 0.3, seed: int = 0,
          layers: list[int] | None = None, layer_step: int = 1, n_top_heads: int = 10, rows_per_pass: int = 128,
          generate_examples: int = 5, max_new_tokens: int = 12, out: str = "results/steering",
          wandb_project: str | None = None, overwrite: bool = False) -> None:
    """Task vectors from in-context prompts, added to zero-shot prompts.

    Args:
        model: hub id, folder or embedded:smollm2-135m.
        tasks: shipped task names (antonyms, country_capital, english_french, present_past) or JSON
            files of {"pairs": [["input", "output"], ...]} (default: antonyms, country_capital, present_past).
        n_shots: demonstrations per ICL prompt (the paper: 10).
        n_prompts: clean ICL prompts the mean states are taken over (the paper: 100).
        aie_prompts: shuffled-label prompts the heads' indirect effects are averaged over (the paper: 25).
        test_share: share of each task's pairs kept for the zero-shot and ICL test queries.
        seed: seeds the split and every prompt.
        layers: residual indices the vectors are added at (default: 0 … L, every layer_step-th).
        layer_step: keep every n-th layer of the default.
        n_top_heads: heads whose mean outputs make the function vector (the paper: 10 for GPT-J).
        rows_per_pass: (layer or head, prompt) rows per forward pass.
        generate_examples: zero-shot queries continued greedily with each vector held on every token.
        max_new_tokens: tokens of those generations.
        out: folder for results.json, table.md, per_layer.csv, heads.csv and two PNGs per task.
        wandb_project: also log the curves, heatmaps and rates to this W&B project.
        overwrite: replace the results of an earlier run in `out` (without it, the command refuses before any work).
    """
    from lenscope.cli.patchscope import _publish
    from lenscope.model.frozen import FrozenModel
    from lenscope.steering.report import (
        STEERING_OUTPUTS,
        log_steering_to_wandb,
        steering_markdown,
        write_steering_report,
    )
    from lenscope.steering.tasks import build_prompts, load_task
    from lenscope.steering.vectors import steer_task

    if layer_step < 1:
        raise ConfigError(f"--layer_step must be at least 1, got {layer_step}")
    tasks = list(DEFAULT_TASKS) if tasks is None else tasks
    if not tasks:
        raise ConfigError("--tasks is empty: name at least one task (e.g. --tasks '[antonyms]')")
    for flag, value in (("--aie_prompts", aie_prompts), ("--rows_per_pass", rows_per_pass), ("--n_top_heads", n_top_heads)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    for flag, value in (("--generate_examples", generate_examples), ("--max_new_tokens", max_new_tokens)):
        if value < 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")
    # Every task file is read and every prompt built before the model loads: a bad file fails at once.
    prompts = [build_prompts(load_task(task), n_shots, n_prompts, test_share, seed) for task in tasks]
    names = [p.task.name for p in prompts]
    if len(set(names)) != len(names):
        raise ConfigError(f"--tasks names a task twice ({names}); each task's files are named after it")
    claim_outputs(out, STEERING_OUTPUTS, "--out", overwrite)
    loaded = FrozenModel.load(model)
    layers = layers if layers is not None else list(range(loaded.num_layers + 1))[::layer_step]
    bad = [layer for layer in layers if not 0 <= layer <= loaded.num_layers]
    if bad:
        raise ConfigError(f"--layers {bad} out of range: residual indices are 0..{loaded.num_layers}")
    heads = loaded.heads
    total = len(heads.layers) * heads.num_heads
    if n_top_heads > total:
        raise ConfigError(f"--n_top_heads {n_top_heads} is more than the model's {total} attention heads")
    results = []
    for task_prompts in prompts:
        results.append(steer_task(loaded, task_prompts, layers, n_top_heads, rows_per_pass, aie_prompts,
                                  generate_examples, max_new_tokens, on_step=lambda s: print(s, flush=True)))
    meta = {"model": model, "revision": loaded.revision, "tasks": tasks, "n_shots": n_shots, "n_prompts": n_prompts,
            "aie_prompts": aie_prompts, "test_share": test_share, "seed": seed, "n_top_heads": n_top_heads}
    _publish("steering", results, out, meta, wandb_project,
             report=(write_steering_report, log_steering_to_wandb, steering_markdown), claimed=STEERING_OUTPUTS)


def main(argv: list[str] | None = None, prog: str = "lenscope steer") -> None:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].replace("``", "`"), exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    parser.add_function_arguments(steer)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = parser.parse_args(argv)
    except Exception as err:  # jsonargparse's ArgumentError and the like: one line, as the other commands
        print(f"error: {parse_error_line(err)} (see `{prog} --help`)", file=sys.stderr)
        raise SystemExit(2) from None
    kwargs = {k: v for k, v in vars(config).items() if k != "config"}
    run_with_clean_errors(lambda: steer(**kwargs), where="while steering; each file it writes is whole or absent")
