"""The ``lenscope`` command: one entry point, one subcommand per job.

    lenscope train --config configs/quickstart.yaml          # = python train.py fit --config ...
    lenscope train validate --config ... --ckpt_path last     # = python train.py validate ...
    lenscope evaluate --config configs/eval/patchscopes.yaml  # = python evaluate.py --config ...
    lenscope show "The capital of France is" --lens artifacts/quickstart/tuned
    lenscope push artifacts/quickstart/tuned me/smollm2-lenses --path-in-repo tuned
    lenscope patchscope attribute --config configs/patchscopes/attribute_extraction.yaml
    lenscope steer --config configs/steering/icl_tasks.yaml
    torchrun --nproc_per_node 8 -m lenscope train ...         # a launcher that wants a module
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from lenscope.allocator import command_started

USAGE = """usage: lenscope <command> [options]

commands:
  train      train lenses (`lenscope train --help`; `lenscope train validate ...` scores a checkpoint)
  evaluate   score lenses as patchscope mappings (`lenscope evaluate --help`)
  show       what every layer predicts for a prompt: table, HTML, PNG (`lenscope show --help`)
  push       upload a lens to the Hugging Face Hub with a model card (`lenscope push --help`)
  patchscope any patchscope, the paper's experiments, causal tracing, attention knockout, LRE (`lenscope patchscope --help`)
  steer      h-vectors and function vectors on in-context tasks, held through generation (`lenscope steer --help`)
  tutorial   the Patchscopes tutorial as a web app in the browser (`lenscope tutorial --help`)

start with: lenscope train --config configs/quickstart.yaml"""

TRAIN_SUBCOMMANDS = ("fit", "validate", "test", "predict")  # LightningCLI's own


def run_as_command(main_function: Callable[[], None] | None = None) -> None:
    """Run a command's ``main`` (default: the ``lenscope`` command's) as the process's own job: the
    ``lenscope`` script, ``python -m lenscope``, ``python train.py`` and ``python evaluate.py``.
    Such a process may set process-wide things a library must not (a CPU evaluation keeps the
    memory it frees: ``lenscope.allocator``); calling ``main`` from Python changes nothing."""
    command_started()
    (main_function or main)()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, rest = (argv[0], argv[1:]) if argv else (None, [])
    if command in (None, "-h", "--help", "help"):
        print(USAGE)
        return
    if command == "--version":
        from lenscope import __version__

        print(f"lenscope {__version__}")
        return
    # The command modules import torch and Lightning: only the one asked for is imported.
    if command == "train":
        from lenscope.cli import train

        if not rest:
            _usage_error("lenscope train needs a configuration: lenscope train --config "
                         "configs/quickstart.yaml (see `lenscope train --help`)")
        # `lenscope train …` fits; `lenscope train validate …` (or `fit …`) names the step itself.
        train.main(rest if rest[0] in TRAIN_SUBCOMMANDS else ["fit", *rest], prog="lenscope train")
    elif command == "evaluate":
        from lenscope.cli import evaluate

        evaluate.main(rest, prog="lenscope evaluate")
    elif command == "show":
        from lenscope.cli import show

        show.main(rest)
    elif command == "push":
        from lenscope.cli import push

        push.main(rest)
    elif command == "patchscope":
        from lenscope.cli import patchscope

        patchscope.main(rest)
    elif command == "steer":
        from lenscope.cli import steer

        steer.main(rest)
    elif command == "tutorial":
        from lenscope.cli import tutorial

        tutorial.main(rest)
    else:
        _usage_error(f"lenscope has no command {command!r}: use one of train, evaluate, show, push, patchscope, steer, tutorial "
                     "(see `lenscope --help`)")


def _usage_error(message: str) -> None:
    # Exit status 2, like every other error of a command line (argparse's convention).
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
