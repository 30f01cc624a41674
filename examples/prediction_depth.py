"""At which layer does the model settle on its answer? For each prompt and each lens, the earliest
layer from which the lens's top token at the last position is the model's own answer at every
later layer (the "prediction depth" of Belrose et al. 2023, §5; "output": only the last block's
output, which no lens reads, has it), and the trajectory of the first prompt as an interactive page.

    python examples/prediction_depth.py --lens artifacts/quickstart/tuned
    python examples/prediction_depth.py --model gpt2 --lens hub:AlignmentResearch/tuned-lens:lens/gpt2

Without --lens only the logit lens is read; with lenses, the logit lens is read beside them.
"""

from __future__ import annotations

import argparse

import lenscope
from lenscope.lenses.artifact import model_named_by
from lenscope.lenses.lens import LogitLens
from lenscope.lenses.trajectory import Trajectory

PROMPTS = [
    "The capital of France is",
    "The opposite of hot is",
    "One, two, three, four,",
    "Water freezes at zero degrees",
]


def settles_at(panel) -> int | None:
    """The first lensed layer whose top token at the last position, and every later layer's, is
    the model's own; None if the last lensed layer still disagrees."""
    answer = panel.top_ids[0, -1, 0]
    agree = (panel.top_ids[1:, -1, 0] == answer).tolist()  # one per lensed layer, in layer order
    depth = None
    for layer, same in zip(reversed(panel.layers), reversed(agree), strict=True):
        if not same:
            break
        depth = layer
    return depth


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the model the first lens was trained on, else the embedded one")
    p.add_argument("--lens", action="append", default=[], help="a lens folder or hub:… name (repeatable)")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable; default: four of ours)")
    p.add_argument("--out", default="prediction_depth.html", help="the first prompt's trajectory page")
    args = p.parse_args(argv)

    name = args.model
    if name is None:
        name = model_named_by(args.lens[0]) if args.lens else "embedded:smollm2-135m"
    model = lenscope.load_model(name)
    lenses = [LogitLens(model.layers, model.d_model)] + [lenscope.load_lens(path, model) for path in args.lens]
    prompts = args.prompt or PROMPTS

    names = [lens.key for lens in lenses]
    print(f"{'prompt':<34} {'answer':<12} " + " ".join(f"{n:>10}" for n in names))
    for i, prompt in enumerate(prompts):
        trajectory = Trajectory.of(model, prompt, lenses)
        answer = model.tokenizer.decode([int(trajectory.panels[0].top_ids[0, -1, 0])])
        depths = [settles_at(panel) for panel in trajectory.panels]
        print(f"{prompt[:34]:<34} {answer!r:<12} " + " ".join(f"{'output' if d is None else d:>10}" for d in depths))
        if i == 0:
            trajectory.to_html(args.out, "target_prob")
    print(f"(residual index: 0 = embeddings, i = output of block i - 1; the first prompt's trajectory: {args.out})")


if __name__ == "__main__":
    main()
