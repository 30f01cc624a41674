"""Benchmark the reference tuned lens (``tuned-lens==0.2.0``) on pre-tokenized chunks.

Run it with the interpreter of the reference environment, e.g.::

    /work/refvenv/bin/python bench/reference_tuned_lens.py --model-dir DIR \
        --train-tokens train.npy --val-tokens val.npy --out result.json

``train.npy`` / ``val.npy`` are int64 arrays of shape (n_chunks, seq_len) holding
already packed token chunks. The script trains a ``TunedLens`` for one in-order pass
over the train chunks (``--batch-size`` chunks per optimizer step) and then evaluates
the tuned lens and the logit lens on the val chunks.

What it measures
----------------
* Training throughput: train tokens / wall-clock seconds of the training loop (from
  the first batch until the last optimizer step; model loading, lens construction
  and saving excluded), and the time of every optimizer step.
* Per lensed layer (the embeddings and the outputs of blocks 0..L-2, i.e.
  ``output_hidden_states[:-1]``, which are pre-final-norm residuals; the target
  distribution is the model's own logits), for the trained tuned lens and the logit
  lens: mean KL(p_final || q_lens) per token (nats and bits) and the next-token
  cross-entropy (nats).

How training relates to the reference
-------------------------------------
The training loop *is* the reference's: ``tuned_lens.scripts.train_loop.Train.execute``
runs unchanged (KL loss against the final log-probs with token shift 0, one backward
per layer, grad-norm clipping at 1.0, ``opt.step`` / ``zero_grad`` / ``scheduler.step``).
The lens, optimizer and schedule are built by the reference's own helpers
(``Train.get_lens`` -> ``TunedLens.from_model``, ``ingredients.Optimizer.create_optim``:
SGD with Nesterov momentum 0.9, lr = lr_scale * (1 - momentum), weight decay 1e-3;
``create_scheduler``: linear decay to 0 over the steps, no warmup for SGD;
``Train.calculate_gradient_accumulation_steps``).

Only ``Train.setup`` is replaced, because the reference setup loads and tokenizes an
HF dataset and feeds it through a *shuffling* torchdata ``DataLoader2``. Here the
batches come from the given token arrays, in order, as ``{"input_ids": LongTensor}``
(the same dict the reference collate produces). The model is loaded the way
``ingredients.Model.load`` does (eval mode, frozen weights, dtype "auto"), but
without the ``load_in_8bit`` argument, which transformers 5.x rejects.

Precision: the reference wraps the lens forward + loss in
``torch.autocast(device.type, dtype=torch.bfloat16)``, and on a CPU-only machine the
device type is "cpu", so CPU autocast *is* active. The translators and the unembedding
then run in bfloat16, and so does the lens log-softmax (CPU autocast leaves it in
bf16). The base model forward is outside the autocast region and runs in float32.
``--autocast reference`` (the default) keeps that behaviour. ``--autocast off`` trains
in plain float32 by making ``torch.autocast`` disabled while the loop runs. Either way,
evaluation runs in float32, like the reference ``Eval`` on CPU (its autocast is
CUDA-only).

Evaluation calls the reference ``Eval._evaluate_lenses_on_hidden`` for every layer
and batch (token shift 1 for CE). The per-token sums are accumulated here so that
a smaller final batch gets the right weight (the reference averages per batch).
Results are in nats per token; the reference CLI reports bits per byte.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch as th

# torchdata 0.9 prints a large deprecation banner when tuned_lens imports dataloader2.
warnings.filterwarnings("ignore", message=r"(?s).*'datapipes', 'dataloader2' modules")

import transformers  # noqa: E402
import tuned_lens  # noqa: E402
import tuned_lens.scripts.ingredients as ing  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedModel  # noqa: E402
from tuned_lens.nn.lenses import LogitLens  # noqa: E402
from tuned_lens.scripts.eval_loop import Eval, _nested_dict  # noqa: E402
from tuned_lens.scripts.train_loop import LossChoice, State, Train  # noqa: E402
from tuned_lens.utils import shift_labels, shift_preds  # noqa: E402

IMPLEMENTATION = "tuned-lens 0.2.0"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True, help="HF model folder")
    p.add_argument("--train-tokens", required=True, type=Path)
    p.add_argument("--val-tokens", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="result JSON")
    p.add_argument("--batch-size", type=int, default=8, help="chunks per step")
    p.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="chunks per forward (reference per_gpu_batch_size); the rest is "
        "gradient accumulation. Default: --batch-size",
    )
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=1.0, help="reference lr_scale")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument(
        "--autocast",
        choices=["reference", "off"],
        default="reference",
        help="reference: keep the bf16 autocast the reference uses (active on CPU); "
        "off: train in float32",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--save-lens", type=Path, default=None, help="keep the lens here")
    p.add_argument(
        "--snapshot-steps",
        default="",
        help="comma-separated optimizer steps after which to keep the lens's translators "
        "(held in memory during the loop, written after it, so keeping them costs no loop time)",
    )
    p.add_argument("--snapshot-dir", type=Path, default=None, help="where the snapshots go")
    p.add_argument("--skip-eval", action="store_true", help="no evaluation after training")
    return p.parse_args()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    th.manual_seed(seed)


def load_chunks(path: Path, vocab_size: int) -> np.ndarray:
    chunks = np.load(path)
    if chunks.ndim != 2 or chunks.dtype != np.int64:
        raise ValueError(f"{path}: expected 2-D int64, got {chunks.dtype} {chunks.shape}")
    if chunks.size and (chunks.min() < 0 or chunks.max() >= vocab_size):
        raise ValueError(f"{path}: token ids outside [0, {vocab_size})")
    return chunks


def load_model(model_dir: str) -> PreTrainedModel:
    """What ``ingredients.Model.load`` does on CPU, minus ``load_in_8bit``."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    model.eval()
    model.requires_grad_(False)
    return model


def iter_batches(chunks: np.ndarray, batch_size: int) -> Iterator[dict[str, th.Tensor]]:
    for start in range(0, len(chunks), batch_size):
        yield {"input_ids": th.from_numpy(chunks[start : start + batch_size])}


@contextmanager
def autocast_disabled():
    """Make every ``torch.autocast(...)`` created inside the block a disabled one."""
    original = th.autocast

    def disabled(device_type, dtype=None, enabled=True, cache_enabled=None):
        return original(device_type, dtype=dtype, enabled=False)

    th.autocast = disabled
    try:
        yield
    finally:
        th.autocast = original


class ArrayTrain(Train):
    """The reference ``Train`` with ``setup`` fed by an in-order token array."""

    def bind(self, model: PreTrainedModel, chunks: np.ndarray, snapshot_steps: set[int] = frozenset()) -> ArrayTrain:
        self.base_model = model
        self.chunks = chunks
        self.step_ends: list[float] = []
        self.loop_start = math.nan
        self.snapshot_steps = set(snapshot_steps)
        self.snapshots: dict[int, dict] = {}
        return self

    def _after_step(self) -> None:
        self.step_ends.append(time.perf_counter())
        step = len(self.step_ends)
        if step in self.snapshot_steps:
            state = {k: v.detach().clone() for k, v in self.lens.layer_translators.state_dict().items()}
            self.snapshots[step] = state

    def setup(self):
        # Same order of operations as Train.setup, minus dataset loading,
        # distributed init and snapshot resuming.
        lens = self.get_lens(self.base_model)
        params = [p for p in lens.parameters() if p.requires_grad]
        opt = self.opt.create_optim(params)
        scheduler = self.opt.create_scheduler(opt, self.num_steps)
        state = State(
            dataloader=iter_batches(self.chunks, self.dist.per_gpu_batch_size),
            lens=self.dist.distribute_lens(lens),
            opt=opt,
            scheduler=scheduler,
            wandb_id=None,
            nats_to_bpb=1.0,
        )
        grad_acc_steps = self.calculate_gradient_accumulation_steps(self.chunks.shape[1])
        self.lens = lens
        opt.register_step_post_hook(lambda *_: self._after_step())
        self.loop_start = time.perf_counter()
        return state, self.base_model, grad_acc_steps


@th.no_grad()
def evaluate(
    model: PreTrainedModel,
    lenses: dict,
    chunks: np.ndarray,
    batch_size: int,
    model_dir: str,
) -> dict:
    """Per-layer KL and CE with the reference's per-layer evaluation code."""
    evaluator = Eval(
        data=ing.Data(),
        model=ing.Model(name=model_dir),
        dist=ing.Distributed(per_gpu_batch_size=batch_size),
        output=Path(tempfile.gettempdir()),
        token_shift=1,
    )
    num_layers = model.config.num_hidden_layers
    evaluator._initialize_logit_stats_recorders(lenses, num_layers)
    for lens in lenses.values():
        lens.eval()

    kl_sum = {name: np.zeros(num_layers) for name in lenses}
    ce_sum = {name: np.zeros(num_layers) for name in lenses}
    final_ce_sum = 0.0
    kl_count = ce_count = 0
    for batch in iter_batches(chunks, batch_size):
        output = model(**batch, output_hidden_states=True)
        hidden_states = output.hidden_states[:-1]
        final_lps = output.logits.log_softmax(dim=-1)
        final_probs = final_lps.exp()
        labels = shift_labels(batch["input_ids"], evaluator.token_shift)

        batch_output = _nested_dict()
        for layer, h in zip(range(num_layers), hidden_states, strict=True):
            evaluator._evaluate_lenses_on_hidden(
                lenses=lenses,
                hidden=h,
                layer=layer,
                final_probs=final_probs,
                final_lps=final_lps,
                labels=labels,
                batch_output=batch_output,
                total_layers=num_layers,
            )
        for name in lenses:
            for layer in range(num_layers):
                kl_sum[name][layer] += batch_output[name]["kl"][f"layer_{layer}"].sum().item()
                ce_sum[name][layer] += batch_output[name]["ce"][f"layer_{layer}"].sum().item()
        final_ce_sum += th.nn.functional.cross_entropy(
            shift_preds(final_lps, evaluator.token_shift).flatten(0, 1),
            labels.flatten(),
            reduction="sum",
        ).item()
        kl_count += final_lps.shape[0] * final_lps.shape[1]
        ce_count += labels.numel()

    kl = {name: (kl_sum[name] / kl_count).tolist() for name in lenses}
    return {
        "kl_nats": kl,
        "kl_bits": {name: [v / math.log(2) for v in vals] for name, vals in kl.items()},
        "ce_nats": {
            **{name: (ce_sum[name] / ce_count).tolist() for name in lenses},
            "final": final_ce_sum / ce_count,
        },
        "val_tokens_kl": kl_count,
        "val_tokens_ce": ce_count,
    }


def main() -> None:
    args = parse_args()
    th.set_num_threads(args.threads)
    seed_everything(args.seed)
    micro = args.micro_batch_size or args.batch_size
    if args.batch_size % micro:
        raise ValueError("--batch-size must be a multiple of --micro-batch-size")

    model = load_model(args.model_dir)
    vocab = model.config.vocab_size
    train = load_chunks(args.train_tokens, vocab)
    val = load_chunks(args.val_tokens, vocab)
    seq_len = train.shape[1]
    steps = len(train) // args.batch_size
    if steps == 0:
        raise ValueError("fewer train chunks than --batch-size")
    train = train[: steps * args.batch_size]  # one pass, full steps only
    train_tokens = int(train.size)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = ArrayTrain(
            model=ing.Model(name=args.model_dir),
            data=ing.Data(max_length=seq_len),
            opt=ing.Optimizer(
                lr_scale=args.lr,
                momentum=args.momentum,
                weight_decay=args.weight_decay,
            ),
            dist=ing.Distributed(per_gpu_batch_size=micro),
            output=args.save_lens or Path(tmp) / "lens",
            seed=args.seed,
            num_steps=steps,
            tokens_per_step=args.batch_size * seq_len,
            loss=LossChoice.KL,
        ).bind(model, train, {int(x) for x in args.snapshot_steps.split(",") if x.strip()})
        precision = autocast_disabled() if args.autocast == "off" else nullcontext()
        with precision:
            trainer.execute()  # the reference training loop, unmodified

    if len(trainer.step_ends) != steps:
        raise RuntimeError(f"expected {steps} optimizer steps, saw {len(trainer.step_ends)}")
    seconds = trainer.step_ends[-1] - trainer.loop_start
    step_seconds = np.diff([trainer.loop_start, *trainer.step_ends])
    if args.snapshot_dir is not None:
        args.snapshot_dir.mkdir(parents=True, exist_ok=True)
        for step, state in trainer.snapshots.items():
            th.save(state, args.snapshot_dir / f"step_{step}.pt")
        (args.snapshot_dir / "times.json").write_text(json.dumps({
            str(step): trainer.step_ends[step - 1] - trainer.loop_start for step in sorted(trainer.snapshots)}))

    lenses = {"tuned": trainer.lens, "logit": LogitLens.from_model(model)}
    if args.skip_eval:
        metrics = {}
    else:
        metrics = evaluate(model, lenses, val, args.eval_batch_size or args.batch_size, args.model_dir)

    num_layers = model.config.num_hidden_layers
    result = {
        "implementation": IMPLEMENTATION,
        "train_tokens": train_tokens,
        "steps": steps,
        "seconds": seconds,
        "tokens_per_s": train_tokens / seconds,
        "step_seconds": step_seconds.tolist(),
        "step_seconds_median": float(np.median(step_seconds)),
        "layers": ["embeddings"] + [f"block_{i}" for i in range(num_layers - 1)],
        **metrics,
        "settings": {
            "model_dir": str(args.model_dir),
            "seq_len": seq_len,
            "batch_size": args.batch_size,
            "micro_batch_size": micro,
            "tokens_per_step": args.batch_size * seq_len,
            "val_chunks": len(val),
            "threads": args.threads,
            "seed": args.seed,
            "optimizer": "SGD nesterov",
            "lr_scale": args.lr,
            "lr": args.lr * (1 - args.momentum),
            "momentum": args.momentum,
            "weight_decay": args.weight_decay,
            "schedule": "linear to 0, no warmup",
            "grad_clip": 1.0,
            "loss": "KL(final || lens), token shift 0",
            "train_autocast": "bfloat16 (cpu)" if args.autocast == "reference" else "off",
            "model_dtype": str(next(model.parameters()).dtype),
            "residuals": "output_hidden_states[:-1] (embeddings + blocks 0..L-2, pre-norm)",
            "data_order": "in order, no shuffling",
            "versions": {
                "tuned_lens": getattr(tuned_lens, "__version__", "0.2.0"),
                "torch": th.__version__,
                "transformers": transformers.__version__,
            },
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    print(
        f"\n{IMPLEMENTATION}: {train_tokens} tokens, {steps} steps, {seconds:.2f} s, "
        f"{result['tokens_per_s']:.1f} tok/s, median step {result['step_seconds_median']:.3f} s"
    )
    if args.skip_eval:
        return
    print(f"{'layer':>12} {'KL tuned':>9} {'KL logit':>9} {'CE tuned':>9} {'CE logit':>9}  (nats)")
    for i, name in enumerate(result["layers"]):
        print(
            f"{name:>12} {metrics['kl_nats']['tuned'][i]:9.3f} {metrics['kl_nats']['logit'][i]:9.3f}"
            f" {metrics['ce_nats']['tuned'][i]:9.3f} {metrics['ce_nats']['logit'][i]:9.3f}"
        )
    print(f"{'final':>12} {'':>9} {'':>9} {metrics['ce_nats']['final']:9.3f}")


if __name__ == "__main__":
    main()
