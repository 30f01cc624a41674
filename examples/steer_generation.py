"""Steer zero-shot prompts with a function vector held on every generated token.

The function vector of an in-context task (Todd et al. 2024) is built from the heads whose mean
output, written into shuffled-label prompts, most raises the right answer; added at one layer of a
zero-shot prompt "Q: x\\nA:", it makes the model do the task without any example.

    python examples/steer_generation.py --task antonyms --layer 14 --query buy --query internal
"""

from __future__ import annotations

import argparse

import torch

import lenscope
from lenscope.model.patching import Intervention
from lenscope.steering.tasks import build_prompts, load_task, query
from lenscope.steering.vectors import (
    encode,
    function_vector,
    indirect_effects,
    mean_last_states,
    top_heads,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--task", default="antonyms", help="a shipped task or a JSON file of [input, output] pairs")
    parser.add_argument("--layer", type=int, default=None, help="residual index the vector is added at (default: L // 2)")
    parser.add_argument("--query", action="append", default=None, help="an input word (repeat); default: three test queries")
    parser.add_argument("--prompts", type=int, default=20, help="clean prompts the means are taken over")
    parser.add_argument("--aie-prompts", type=int, default=5, help="shuffled prompts the heads are ranked on")
    parser.add_argument("--top-heads", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    model = lenscope.load_model(args.model)
    prompts = build_prompts(load_task(args.task), n_shots=10, n_prompts=max(args.prompts, args.aie_prompts))
    clean, _ = encode(model, prompts.clean)
    shuffled, answers = encode(model, prompts.shuffled[: args.aie_prompts])
    _, mean_heads = mean_last_states(model, clean)
    effects = indirect_effects(model, shuffled, answers, mean_heads)
    heads = top_heads(effects, model.heads.layers, min(args.top_heads, effects.numel()))
    vector = function_vector(model, mean_heads, heads)
    layer = args.layer if args.layer is not None else model.num_layers // 2
    print(f"function vector of {args.task}: heads (block, head) {heads}, added at residual {layer}")
    for word in args.query or [p.query for p in prompts.zero_shot[:3]]:
        ids = model.tokenize(query(word))
        end = torch.tensor([ids.shape[1] - 1], device=model.device)
        steer = Intervention(layer, torch.tensor([0], device=model.device), end, vector[None], add=True)
        plain = model.engine.generate(ids, [], args.max_new_tokens)
        steered = model.engine.generate(ids, [steer], args.max_new_tokens)  # held on every new token
        shown = [model.tokenizer.decode(t[0]).split("\n")[0].strip() for t in (plain, steered)]
        print(f"Q: {word!r:16} plain: {shown[0]!r:28} steered: {shown[1]!r}")


if __name__ == "__main__":
    main()
