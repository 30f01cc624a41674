"""The ``LightningModule`` that trains lenses on every layer from one frozen-model pass per batch:
tuned lenses, future lenses of any set of offsets, least-squares affine lenses, learned prompts.

It is a thin wrapper: the science lives in ``lenses`` (the lens, the decoder, the fused KL) and
``lenscope.model`` (loading, the architecture adapter, nnsight reading, the hidden-state cache). This
module wires them to Lightning: optimizer and schedule, logging, validation, checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from lenscope.datamodules.preprocessing import offset_pairs
from lenscope.datamodules.sources import DataSourceError
from lenscope.errors import ConfigError, UserError, check_finite
from lenscope.lenses.artifact import load_lens
from lenscope.lenses.least_squares import NormalEquations
from lenscope.lenses.lens import LogitLens, lens_key
from lenscope.lenses.metrics import PerLayerMeans
from lenscope.lenses.unembed import NATS_PER_BIT
from lenscope.model.frozen import FrozenModel
from lenscope.model.hidden_cache import HiddenStateCache, batch_key
from lenscope.model.loading import (
    BaseModelSettings,
    cache_root,
    compute_dtype,
    resolve_dtype,
)
from lenscope.model.residuals import HiddenStatesNotFiniteError
from lenscope.training.fsdp import FSDP_PREFIX
from lenscope.training.fsdp import tag as fsdp_tag
from lenscope.training.recipes import RECIPES, lr_factor

log = logging.getLogger(__name__)


def _frozen_model_is_not_checkpointed(module, incompatible_keys) -> None:
    """Load-state-dict post-hook: the frozen model's weights are never in a checkpoint, so only a
    missing lens weight counts as missing. A hook rather than a ``load_state_dict`` override
    because under FSDP Lightning loads through the wrapper, which never calls the override."""
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if key.replace(FSDP_PREFIX, "").startswith("lenses.")]


HiddenStateError = HiddenStatesNotFiniteError
"""The frozen model produced NaN or inf: a lens trained on it would be garbage. Raised by the one
check of the model's states, where every command reads them (``ResidualReader.read``)."""


class DivergedError(UserError):
    """The lens's gradients became NaN or inf: training diverged, and a step would ruin the lens."""


class LensTrainingModule(L.LightningModule):
    def __init__(
        self,
        base: BaseModelSettings = BaseModelSettings(),  # noqa: B008 (frozen, never mutated)
        lens_type: str = "tuned",
        bias: bool = True,
        offsets: list[int] = [0],  # noqa: B006 (jsonargparse needs a plain default; never mutated)
        lr: float = 1.0,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 1e-3,
        warmup_steps: int = 0,
        lens_dtype: str = "auto",
        eval_dtype: str = "float32",
        cache: str = "device",
        cache_dir: str | None = None,
        cache_max_gb: float = 8.0,
        cache_dtype: str | None = None,
        init_lens: str | None = None,
        warm_start_batches: int = 16,
        ridge: float = 1e-3,
        prompt_length: int = 10,
        prompt_lr: float = 1e-3,
        prompt_positions: int = 16,
    ):
        """
        Args:
            base: the frozen base model (``--model.base.name``, ``.revision``, ``.dtype``; from
                Python, a model name is enough).
            lens_type: lens to train: ``tuned`` (affine translators trained with the KL loss) or
                ``affine`` (the same map fitted in closed form by least squares to the last block's
                output, Patchscopes' "tuned lens"; no optimizer). ``logit`` has nothing to train.
            bias: give each translator a bias vector.
            offsets: token offsets of the targets, one lens per offset, all trained from the same
                model pass: 0 is the tuned lens (the model's own next-token distribution at the same
                position); k ≥ 1 a future lens of the affine kind (layer ℓ at position t matches the
                model's final distribution at position t + k, the reference's ``token_shift``).
            lr: learning rate in the reference's units: PyTorch's SGD gets ``lr × (1 − momentum)``
                (tuned-lens 0.2.0 default 1.0, i.e. 0.1).
            momentum: SGD momentum.
            nesterov: Nesterov momentum (reference: on).
            weight_decay: SGD weight decay; with the residual parametrisation it pulls each
                translator towards the identity.
            warmup_steps: linear warm-up steps before the linear decay to 0 (reference: 0).
            lens_dtype: dtype of the lens's matrix products in training: ``auto`` (bf16 where the
                hardware multiplies it natively, GPUs and CPUs with AVX512-BF16 or AMX, ~4× faster than
                fp32 there; fp32 elsewhere, where bf16 is emulated and ~30× slower), ``bfloat16`` or
                ``float32``. Softmax and KL stay fp32.
            eval_dtype: dtype of the matrix products in validation (``auto`` as above).
            cache: where cached hidden states live: ``device`` (memory of the device the model runs
                on), ``disk`` (safetensors shards in ``cache_dir``) or ``none``.
            cache_dir: folder of the disk cache (default: a folder under the lenscope cache).
            cache_max_gb: memory budget of the device cache, in GiB.
            cache_dtype: dtype of cached states (default: the model's dtype).
            init_lens: lens artifact folder to start the lens of the same offset from (continue
                training a lens, or warm-start a tuned lens from an affine one); it must have been
                made for this model.
            warm_start_batches: training batches on which a tuned or future lens is first fitted by
                least squares, in closed form (the affine lens), before its first KL step; the KL
                steps then train on the batches after them, so the two never share a batch. The
                fit costs only the model passes, and starts the KL steps where hundreds of steps from
                zero would reach (docs/results.md). 0: the paper's recipe, from zero (the logit
                lens). Not used with ``init_lens``, nor by the other lens types.
            ridge: relative ridge term of the least-squares fits (``lens_type: affine`` and the warm start).
            prompt_length: soft-prompt vectors of a learned-prompt lens (Future Lens: 10).
            prompt_lr: Adam learning rate of the learned prompt (its own optimizer: a soft prompt
                is not an affine map near the identity, the SGD recipe above does not apply).
            prompt_positions: positions per batch at which the learned prompt is trained and
                validated; each costs one frozen-model pass per layer, so a batch is subsampled
                (seeded by the step: a resumed run picks the same ones).
        """
        super().__init__()
        base = BaseModelSettings.of(base)
        self.save_hyperparameters()
        self.hparams.base = asdict(base)  # plain values: a checkpoint loads without unpickling classes
        if lens_type not in RECIPES:
            raise ConfigError(
                f"--model.lens_type {lens_type!r} is unknown; use one of {sorted(RECIPES)} "
                "(the logit lens has nothing to train and is always scored as the baseline)"
            )
        offsets = [int(k) for k in offsets]
        if not offsets or min(offsets) < 0 or len(set(offsets)) != len(offsets):
            raise ConfigError(f"--model.offsets must be distinct integers >= 0, got {offsets}")
        if warmup_steps < 0:
            raise ConfigError(f"--model.warmup_steps must be >= 0, got {warmup_steps}")
        # NaN slips through YAML (``lr: .nan``) and would train a lens of NaNs: every number is checked.
        check_finite("--model.lr", lr)
        check_finite("--model.momentum", momentum, below=1.0)
        if nesterov and momentum == 0:
            raise ConfigError("--model.nesterov needs --model.momentum > 0 (Nesterov momentum without momentum is "
                              "undefined); pass --model.nesterov false or a momentum such as 0.9")
        check_finite("--model.weight_decay", weight_decay)
        check_finite("--model.ridge", ridge)
        check_finite("--model.prompt_lr", prompt_lr, low_open=True)
        check_finite("--model.cache_max_gb", cache_max_gb)
        for flag, value in (("prompt_length", prompt_length), ("prompt_positions", prompt_positions)):
            if value < 1:
                raise ConfigError(f"--model.{flag} must be at least 1, got {value}")
        if warm_start_batches < 0:
            raise ConfigError(f"--model.warm_start_batches must be >= 0 (0: start from zero), got {warm_start_batches}")
        for flag, value in (("lens_dtype", lens_dtype), ("eval_dtype", eval_dtype), ("cache_dtype", cache_dtype)):
            if value is not None and not (value == "auto" and flag != "cache_dtype"):
                resolve_dtype(value, f"--model.{flag}")
        self.frozen = FrozenModel.load(base)
        self.base = self.frozen.hf  # registered as a submodule: Lightning places it, FSDP shards its blocks
        layers = self.frozen.layers  # embeddings + blocks 0..L-2 (see lenscope.lenses.lens)
        self.offsets = offsets
        self.recipe = RECIPES[lens_type](self.hparams)
        # One lens per offset, keyed "tuned", "tuned+1", ... (see lens_key).
        self.lenses = torch.nn.ModuleDict({lens_key(lens_type, k): self.recipe.make_lens(self.frozen, layers, k) for k in offsets})
        # A closed-form fit takes no gradient step: its optimizer (LeastSquaresFit) is stepped by hand.
        self.automatic_optimization = not self.recipe.closed_form
        self.normal_equations: dict[str, NormalEquations] = self.recipe.equations(self.lenses)
        if init_lens is not None:
            start = load_lens(init_lens, self.frozen)  # checked against this model (a tuned-lens folder too), on its device
            compatible = start.lens_type in self.recipe.starts_from
            start_offset = start.offset
            if not compatible or start.layers != layers or start_offset not in offsets:
                raise ConfigError(f"--model.init_lens {init_lens} is a {start.lens_type} lens of layers {start.layers} "
                                  f"and offset {start_offset}; this run trains {lens_type} lenses of layers {layers} "
                                  f"and offsets {offsets}")
            self.lenses[lens_key(lens_type, start_offset)].load_state_dict(start.state_dict())
        self.logit_lens = LogitLens(layers, self.frozen.d_model)
        # Roles for FSDP (configs/trainer/fsdp.yaml): shard the frozen blocks, keep the rest of the
        # frozen model whole in a unit of its own, so that the root unit holds the lenses alone.
        for block in self.frozen.adapter.blocks:
            fsdp_tag(block, "block")
        fsdp_tag(self.base, "base")
        # Checkpoints hold the lenses only (state_dict below); loading one leaves the frozen model be.
        self.register_load_state_dict_post_hook(_frozen_model_is_not_checkpointed)
        # Scored in validation, per offset: the logit lens (the baseline) and the trained lens.
        self.scored = [lens_key(name, k) for k in offsets for name in ("logit", lens_type)]
        self.val_metrics = PerLayerMeans([(m, key) for key in self.scored for m in ("kl_nats", "ce_nats")], len(layers))
        self.cache: HiddenStateCache | None = None
        self.last_results: dict | None = None
        self.tokens_seen = 0  # this process's training positions so far (a lens artifact records the sum)
        self._warm_started = False
        self._checkpoint_step: int | None = None  # the step of the checkpoint loaded, if any

    def train(self, mode: bool = True):
        """The frozen model stays in eval mode (no dropout) while the lens trains."""
        super().train(mode)
        self.base.eval()
        return self

    @property
    def layers(self) -> list[int]:
        """Residual indices lensed (the same for every lens of the run)."""
        return self.logit_lens.layers

    # --- checkpoints hold the lenses only ------------------------------------------------------------
    def state_dict(self, destination=None, prefix="", keep_vars=False):
        """Only the lenses: the frozen base model is reloaded from its name, never checkpointed.

        The frozen model is not even visited, so that under FSDP saving gathers no block.
        """
        return self.lenses.state_dict(destination=destination, prefix=prefix + "lenses.", keep_vars=keep_vars)

    # Lightning calls on_save_checkpoint on every rank and writes rank 0's checkpoint: what differs
    # between ranks (each one's data position and share of the least-squares fit) is gathered here.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lenscope"] = {"base_model": self.hparams.base["name"], "revision": self.frozen.revision,
                                  "unembed_hash": self.frozen.unembed_hash,
                                  "lens_compute_dtype": str(self.lens_compute_dtype).removeprefix("torch.")}
        if self.normal_equations:  # the fit so far, so that a resumed fit goes on from it
            checkpoint["lenscope"]["normal_equations"] = {
                key: {"xtx": eq.xtx, "xty": eq.xty, "count": eq.count}
                for key, eq in self._summed_normal_equations().items()}
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        if "combined_loader" in fit_loop:
            # Each rank reads its own share of the stream: keep every rank's position, not rank 0's alone.
            checkpoint["lenscope"]["loader_state_by_rank"] = self._gather_from_ranks(fit_loop["combined_loader"])
        checkpoint["lenscope"]["tokens_seen_by_rank"] = self._gather_from_ranks(self.tokens_seen)
        if not self.recipe.closed_form:
            # The trainer settings that shape the gradient steps (Lightning keeps none of them): a
            # resumed run compares its own with them (preflight.check_resume). Plain values only.
            trainer = self.trainer
            algorithm = trainer.gradient_clip_algorithm
            checkpoint["lenscope"]["trainer"] = {
                "max_steps": trainer.max_steps, "accumulate_grad_batches": trainer.accumulate_grad_batches,
                "gradient_clip_val": trainer.gradient_clip_val,
                "gradient_clip_algorithm": str(algorithm.value if algorithm is not None else "norm"),
            }
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):  # so that a resumed run logs into the same W&B run
                checkpoint["lenscope"]["wandb_run_id"] = logger.version

    @property
    def scored_step(self) -> int:
        """The step of the lenses scored now: the trainer's while fitting; in ``validate``, which
        restores the lenses but not the step counter, the step of the checkpoint they came from."""
        fitting = self._trainer is not None and self._trainer.state.fn == "fit"
        return self.global_step if fitting or self._checkpoint_step is None else self._checkpoint_step

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._checkpoint_step = checkpoint.get("global_step")
        saved = checkpoint.get("lenscope", {})
        if saved.get("unembed_hash") not in (None, self.frozen.unembed_hash):
            raise ConfigError(
                f"checkpoint was made for {saved.get('base_model')!r}, not for {self.hparams.base['name']!r} "
                "(different unembedding); resume with the same --model.base.name"
            )
        fitting = self._trainer is not None and self._trainer.state.fn == "fit"
        before = saved.get("lens_compute_dtype")
        here = str(self.lens_compute_dtype).removeprefix("torch.")
        if fitting and before is not None and before != here and not self.recipe.closed_form:
            raise ConfigError(
                f"the checkpoint trained with {before} lens matmuls and this run would use {here} "
                f"(--model.lens_dtype {self.hparams.lens_dtype} on this machine), so it cannot resume exactly; "
                f"pass --model.lens_dtype {before}"
            )
        if self.normal_equations and "normal_equations" in saved:
            # The sums over all ranks go to rank 0, zeros elsewhere: summed again, they are the fit so far.
            for key, state in saved["normal_equations"].items():
                eq = self.normal_equations[key]
                first = self.global_rank == 0
                eq.xtx = state["xtx"].clone() if first else torch.zeros_like(state["xtx"])
                eq.xty = state["xty"].clone() if first else torch.zeros_like(state["xty"])
                eq.count = state["count"] if first else 0
        by_rank = saved.get("loader_state_by_rank")
        if by_rank is not None and fitting:
            world = self.trainer.world_size
            if len(by_rank) != world:
                raise ConfigError(
                    f"the checkpoint was written by {len(by_rank)} processes and this run has {world}; each "
                    f"process's place in its share of the data is in it, so resume with {len(by_rank)} "
                    "processes (--trainer.devices × --trainer.num_nodes)"
                )
            checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] = by_rank[self.global_rank]
        tokens = saved.get("tokens_seen_by_rank")
        if tokens is not None and fitting and len(tokens) == self.trainer.world_size:
            self.tokens_seen = tokens[self.global_rank]

    def _gather_from_ranks(self, obj) -> list:
        """``obj`` of every rank, in rank order (a list of one in a single process)."""
        if self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return [obj]
        gathered = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def total_tokens_seen(self) -> int:
        """Training positions seen by all processes together (a collective: call it on every rank)."""
        return sum(self._gather_from_ranks(self.tokens_seen))

    def _summed_normal_equations(self, equations: dict[str, NormalEquations] | None = None) -> dict[str, NormalEquations]:
        """A least-squares fit so far over all ranks (each accumulates its own share): the closed-form
        lens's (default), or ``equations``."""
        def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
            if self._trainer is None:  # used on its own (a notebook, a unit test): one process
                return t
            return self.trainer.strategy.reduce(t.to(self.device), reduce_op="sum")

        equations = self.normal_equations if equations is None else equations
        return {key: eq.summed(sum_over_ranks) for key, eq in equations.items()}

    @property
    def lens_compute_dtype(self) -> torch.dtype:
        """The dtype of the lens's matrix products in training (``--model.lens_dtype``, ``auto`` resolved)."""
        return compute_dtype(self.hparams.lens_dtype, self.device, "--model.lens_dtype")

    # --- set-up --------------------------------------------------------------------------------------
    def check_trainer(self, trainer) -> None:
        """Refuse what this lens kind cannot run under ``trainer``'s strategy; ``lenscope train``
        calls this before the ranks start (so the error is one line, not one per rank), ``setup``
        again for use outside it. A closed-form fit has no gradient to clip: the shared configs'
        ``gradient_clip_val`` is dropped for it (Lightning refuses clipping without gradient steps)."""
        self.recipe.check_strategy(trainer.strategy)
        if self.recipe.closed_form:
            # Lightning warns that a checkpoint of a manually optimised module holds the state after
            # the step; a fit's step leaves the lenses as they were, and the equations after it are
            # exactly what a resumed fit must start from.
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
        if self.recipe.closed_form and trainer.gradient_clip_val:
            rank_zero_info(f"--trainer.gradient_clip_val {trainer.gradient_clip_val} is not used: "
                           f"a {self.hparams.lens_type} lens is fitted in closed form, without gradients")
            trainer.gradient_clip_val = None

    def setup(self, stage: str) -> None:
        self.recipe.check_strategy(self.trainer.strategy)
        if stage == "fit" and not self.recipe.closed_form and self.hparams.lens_dtype == "auto":
            dtype = str(self.lens_compute_dtype).removeprefix("torch.")
            why = "native on this device" if dtype == "bfloat16" else f"bf16 is not native on this {self.device.type}"
            rank_zero_info(f"Lens matrix products in {dtype} ({why}; --model.lens_dtype sets it)")
        datamodule = getattr(self.trainer, "datamodule", None)
        seq_len = getattr(getattr(datamodule, "hparams", {}), "get", lambda *_: None)("seq_len")
        if seq_len is not None and max(self.offsets) >= seq_len:
            raise ConfigError(
                f"--model.offsets has {max(self.offsets)} but --data.seq_len is {seq_len}: no position has a "
                "target that far ahead; lower the offset or raise --data.seq_len"
            )
        describe = datamodule.describe() if datamodule is not None and hasattr(datamodule, "describe") else {}
        manifest = {
            "model": self.hparams.base["name"], "revision": self.frozen.revision, "unembed_hash": self.frozen.unembed_hash,
            "model_dtype": self.hparams.base["dtype"], "cache_dtype": self.hparams.cache_dtype, "data": describe,
            "layout": "residuals (num_layers + 1, positions, d_model) at the read positions",
        }
        cache_dir = self.hparams.cache_dir
        if self.hparams.cache == "disk" and cache_dir is None:
            # Default folder keyed by the settings themselves: other settings, other folder.
            digest = hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]
            cache_dir = cache_root() / "hidden-states" / digest
        if self.cache is None:
            self.cache = HiddenStateCache(
                self.hparams.cache, cache_dir, manifest, int(self.hparams.cache_max_gb * 2**30),
                resolve_dtype(self.hparams.cache_dtype) if self.hparams.cache_dtype else None,
            )
            if cache_dir is not None:
                log.info("hidden-state cache: %s", Path(cache_dir))

    # --- the shared step ------------------------------------------------------------------------------
    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Residuals at the N read positions (row-major), from the cache or one model pass:
        (num_layers + 1, N, d_model)."""
        positions = batch["positions"]
        valid = positions >= 0
        key = batch_key(batch["input_ids"], batch["attention_mask"], positions)
        states = self.cache.get(key, self.device) if self.cache is not None else None
        if self._all_ranks_run_the_model(states is None):
            residuals = self.frozen.reader.read(batch["input_ids"], batch["attention_mask"])
        if states is None:
            rows, cols = valid.nonzero(as_tuple=True)
            states = residuals[:, rows, positions[rows, cols]]  # finite: the reader checked them
            if self.cache is not None:
                self.cache.put(key, states)
        return states

    def _all_ranks_run_the_model(self, this_rank_needs_it: bool) -> bool:
        """Whether to run the frozen model on this batch. Under FSDP its forward gathers each block
        from every rank, so either every rank runs it or none: a cache hit on one rank and a miss
        on another would leave the first waiting forever. Elsewhere each rank decides alone."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1 or not isinstance(trainer.strategy, FSDPStrategy):
            return this_rank_needs_it
        needed = torch.tensor(float(this_rank_needs_it), device=self.device)
        return bool(trainer.strategy.reduce(needed, reduce_op="max") > 0)

    def lens_examples(self, batch: dict[str, torch.Tensor], states: torch.Tensor,
                      k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Lens inputs, target residuals and labels for the batch, with the target ``k`` tokens ahead.

        states: from ``hidden_states(batch)``. Returns h (num_lensed, M, d_model) at read positions
        t, the last block's raw output at t + k (M, d_model), and the real token after t + k (M,),
        for the M read positions whose target position was read too (k = 0: all); the pairing is
        the evaluation's (``offset_pairs``).
        """
        pairs = offset_pairs(batch, k)
        read = pairs.target >= 0
        source = pairs.source[read]
        layers = torch.tensor(self.layers, device=states.device)
        return states[layers[:, None], source[None, :]], states[-1][pairs.target[read]], pairs.next_token[read]

    def _recipe_positions(self, h: torch.Tensor, *rest: torch.Tensor, seed: int | None):
        """h (num_lensed, N, d) and per-position tensors (N, ...) at the positions the recipe picks."""
        keep = self.recipe.positions(h.shape[1], seed, self.device)
        if keep is None:
            return (h, *rest)
        return (h[:, keep], *(t[keep] for t in rest))

    def _target_log_probs(self, final: torch.Tensor) -> torch.Tensor:
        """final: (N, d_model) raw last-block output → (N, vocab) fp32 log-probs."""
        with torch.no_grad():
            return self.frozen.log_probs(final.to(self.frozen.adapter.unembedding_weight.dtype))

    def training_step(self, dataloader_iter) -> torch.Tensor:
        # The batch is pulled here rather than handed in: Lightning otherwise fetches one batch
        # ahead, so the data position saved in a checkpoint would be one batch past the last step
        # trained, and a resumed run would skip that batch.
        if self.warm_start_due:
            self._warm_start(dataloader_iter)
        batch, _batch_idx, _loader_idx = next(dataloader_iter)
        batch = self.transfer_batch_to_device(batch, self.device, 0)
        states = self.hidden_states(batch)  # one model pass (or cache hit) serves every offset
        n = states.shape[1]
        self.tokens_seen += n
        self.log("train/tokens", float(n), reduce_fx="sum", batch_size=n)
        if self.cache is not None:
            self.log("cache/hit_rate", self.cache.hit_rate, batch_size=n)
            self.log("cache/bytes_per_token", self.cache.bytes_per_token, batch_size=n)
        if self.recipe.closed_form:
            self._fit_step(batch, states)
            return None
        dtype = self.lens_compute_dtype
        loss = 0.0
        for key, lens in self.lenses.items():
            h, final, _ = self.lens_examples(batch, states, lens.offset)
            h, final = self._recipe_positions(h, final, seed=self.global_step)
            kl = lens.kl(self.frozen, h, self._target_log_probs(final), dtype)
            # Layers and lenses are independent; summing their losses gives each translator its own gradient.
            loss = loss + kl.sum()
            m = h.shape[1]
            self.log(f"train/{key}/kl_mean", kl.mean(), prog_bar=True, batch_size=m)
            self.log_dict({f"train/{key}/kl/layer_{layer:02d}": kl[i] for i, layer in enumerate(self.layers)},
                          batch_size=m)
        return loss

    @property
    def warm_start_batches(self) -> int:
        """Batches this run's lens was first fitted on by least squares (0: it started elsewhere)."""
        hp = self.hparams
        return hp.warm_start_batches if self.recipe.warm_starts and hp.init_lens is None else 0

    @property
    def warm_start_due(self) -> bool:
        """Before the first KL step of a trainer's run that starts from nothing (a resumed run has
        its lens in the checkpoint, and ``init_lens`` gives one). A step called by hand, outside a
        trainer, is just that step."""
        return (self._trainer is not None and self.warm_start_batches > 0 and self.global_step == 0
                and not self._warm_started)

    @torch.no_grad()
    def _warm_start(self, dataloader_iter) -> None:
        """Fit every lens by least squares on the stream's next ``warm_start_batches`` batches (h_ℓ(t)
        against the last block's output at t + k, as the affine lens), and start it there. The
        batches are consumed from the training stream itself: the KL steps train on the ones after
        them, and the loader state in a checkpoint counts them, so a resumed run neither refits
        nor reuses them."""
        equations = {key: NormalEquations(lens.num_layers, lens.d_model, self.device) for key, lens in self.lenses.items()}
        fitted = 0
        for _ in range(self.hparams.warm_start_batches):
            try:
                batch, _, _ = next(dataloader_iter)
            except StopIteration:  # a finite stream shorter than the fit: fit on what there was
                break
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            states = self.hidden_states(batch)
            self.tokens_seen += states.shape[1]
            fitted += 1
            for key, lens in self.lenses.items():
                h, final, _ = self.lens_examples(batch, states, lens.offset)
                equations[key].update(h, final)
        # Every rank fitted its own share of the batches: the fit is over their sum.
        summed = self._summed_normal_equations(equations)
        for key, eq in summed.items():
            if eq.count:
                eq.fit(self.lenses[key], self.hparams.ridge)
        self._warm_started = True
        positions = next(iter(summed.values())).count
        rank_zero_info(f"Warm start: least-squares fit of the lens on {fitted} batches ({positions:,} positions); "
                       f"the KL steps start from it")

    def _fit_step(self, batch: dict[str, torch.Tensor], states: torch.Tensor) -> None:
        """One step of a closed-form fit: the batch's (h_ℓ(t), last residual at t + k) pairs go to
        the normal equations through the fit's optimizer (so the trainer counts the step)."""
        pairs = {key: self.lens_examples(batch, states, lens.offset)[:2] for key, lens in self.lenses.items()}
        optimizer = self.optimizers() if self._trainer is not None else self.configure_optimizers()
        optimizer.step(closure=lambda: pairs)
        positions = next(iter(self.normal_equations.values())).count
        self.log("train/positions", float(positions), batch_size=states.shape[1])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        states = self.hidden_states(batch)
        if states.shape[1] == 0:  # padding (see DocumentStream.pad_shares): the model ran, nothing to score
            self.val_metrics.update("kl_nats", self.scored[0], torch.zeros(len(self.layers)), count=0)
            return
        dtype = compute_dtype(self.hparams.eval_dtype, self.device, "--model.eval_dtype")
        for k in self.offsets:
            h, final, labels = self.lens_examples(batch, states, k)
            h, final, labels = self._recipe_positions(h, final, labels, seed=None)
            target = self._target_log_probs(final)
            for lens in (self.logit_lens, self.lenses[lens_key(self.hparams.lens_type, k)]):
                sums = lens.metrics(self.frozen, h, target, labels, dtype)
                key = lens_key(lens.lens_type, k)
                self.val_metrics.update("kl_nats", key, sums["kl"], count=sums["n_tokens"])
                self.val_metrics.update("ce_nats", key, sums["ce"], count=sums["n_labels"])

    def on_validation_epoch_start(self) -> None:
        self.solve_closed_form_fits()

    def solve_closed_form_fits(self) -> None:
        """A closed-form fit is solved before each validation, over every rank's pairs so far: what
        validation scores and the artifact holds (a collective: every rank calls it)."""
        for key, eq in self._summed_normal_equations().items():
            if eq.count:
                eq.fit(self.lenses[key], self.hparams.ridge)

    def on_validation_epoch_end(self) -> None:
        nothing = DataSourceError("validation scored no positions: the held-out documents give no samples; "
                                  "raise --data.val_max_docs, lower --data.seq_len or pass --data.val_source")
        # Every rank has as many validation batches (DocumentStream.pad_shares), a padding batch
        # counts as an update of nothing: no batch on one rank means none on any.
        if self.val_metrics.update_count == 0:
            raise nothing
        computed = self.val_metrics.compute()  # one synchronisation for every lens, metric and layer
        self.val_metrics.reset()
        if computed["counts"]["kl_nats"][self.scored[0]] == 0:
            raise nothing
        results: dict = {"layers": self.layers, "lens_type": self.hparams.lens_type, "offsets": self.offsets,
                         "lenses": self.scored}
        for name in self.scored:
            values = {}
            for metric in ("kl", "ce"):
                nats = torch.tensor(computed["means"][f"{metric}_nats"][name], dtype=torch.float64)
                values[f"{metric}_nats"], values[f"{metric}_bits"] = nats, nats / NATS_PER_BIT
            # NaN (nothing to score, e.g. no labelled position) is null in results.json, not logged.
            results[name] = {k: [x if x == x else None for x in v.tolist()] for k, v in values.items()}
            for key, per_layer in values.items():
                if per_layer.isnan().any():
                    continue
                for i, layer in enumerate(self.layers):
                    self.log(f"val/{name}/{key}/layer_{layer:02d}", per_layer[i].float(), sync_dist=False)
                self.log(f"val/{name}/{key}_mean", per_layer.mean().float(), prog_bar=key == "kl_bits" and name != "logit")
        results["step"] = self.scored_step
        self.last_results = results

    # --- optimisation ---------------------------------------------------------------------------------
    def optimizer_step(self, *args, **kwargs) -> None:
        """Stop at the first update that leaves a lens weight NaN or inf (a NaN gradient, or a step
        so large it overflows), before anything writes that lens: a checkpoint is saved after
        this, the artifact at the end. Gradients are all-reduced, so every process stops alike."""
        super().optimizer_step(*args, **kwargs)
        weights = [p for p in self.lenses.parameters()]
        if weights and not bool(torch.stack([torch.isfinite(p).all() for p in weights]).all()):
            raise DivergedError(
                f"training diverged at step {self.global_step}: the lens weights became NaN or inf; "
                f"lower {self.recipe.lr_flag} (the checkpoints and artifacts written so far are untouched)"
            )

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip each lens on its own (the reference clips its one lens): a global norm over the
        lenses of several offsets would let one offset's gradients shrink another's steps."""
        if not gradient_clip_val:
            return
        for lens in self.lenses.values():
            if gradient_clip_algorithm in (None, "norm"):
                torch.nn.utils.clip_grad_norm_(lens.parameters(), gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_value_(lens.parameters(), gradient_clip_val)

    def configure_optimizers(self):
        optimizer = self.recipe.optimizer(self.lenses, self.normal_equations)
        if self.recipe.closed_form:
            return optimizer  # no learning rate to schedule
        hp = self.hparams
        total = self.trainer.max_steps
        if total is None or total <= 0:
            raise ConfigError(f"--trainer.max_steps must be a positive number of steps, got {total}")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, hp.warmup_steps, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
