"""How each kind of lens is trained: the one place that knows the kinds apart.

``LensTrainingModule`` holds the recipe its ``--model.lens_type`` names (``RECIPES``) and asks it
what differs between kinds: which lens to build, what may warm-start it, its optimizer, which
positions of a batch it is trained on, what it cannot run under. The rest of a step (reading the
residuals, pairing t with t + k, the KL to the model's output, validation) is the same for every
kind, because each lens scores itself (``Lens.kl``, ``Lens.metrics``).
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import FSDPStrategy

from lenscope.errors import ConfigError
from lenscope.lenses.learned_prompt import IDENTITY_PROMPT, LearnedPromptLens
from lenscope.lenses.least_squares import LeastSquaresFit, NormalEquations
from lenscope.lenses.lens import AffineLens, Lens, TunedLens
from lenscope.model.frozen import FrozenModel


class Recipe:
    """Gradient training of a lens on the KL to the model's own distribution (subclasses say which)."""

    lens_type: str
    closed_form = False
    """Fitted in closed form (no gradients) rather than trained by gradient steps."""
    lr_flag = "--model.lr"
    """The setting to lower when training diverges."""
    starts_from: tuple[str, ...] = ()
    """Kinds of lens artifact ``--model.init_lens`` may start this kind from."""
    warm_starts = False
    """Starts from the least-squares affine fit of the run's first batches (``--model.warm_start_batches``)."""
    trained_with: tuple[str, ...] = ("init_lens",)
    """``--model.*`` settings that shape how this kind trains. A checkpoint's optimizer state, its
    warm start and its starting lens win over the command line's when a run resumes, so a resumed
    run refuses any of these that differ from the checkpoint's (preflight.check_resume)."""
    schedules_lr = True
    """Its learning rate follows ``lr_factor`` over ``--trainer.max_steps``."""

    def __init__(self, hparams):
        self.hp = hparams

    def make_lens(self, model: FrozenModel, layers: list[int], offset: int) -> Lens:
        raise NotImplementedError

    def equations(self, lenses: dict[str, Lens]) -> dict[str, NormalEquations]:
        """The running least-squares sums a closed-form kind accumulates, per lens (none here)."""
        return {}

    def optimizer(self, lenses: torch.nn.ModuleDict, equations: dict[str, NormalEquations]) -> torch.optim.Optimizer:
        raise NotImplementedError

    def positions(self, n: int, seed: int | None, device: torch.device) -> torch.Tensor | None:
        """Which of a batch's ``n`` positions the lens is trained (``seed``: the step) or validated
        (``seed`` None) on; None: all of them."""
        return None

    def check_strategy(self, strategy) -> None:
        """Refuse, in one line, a distributed strategy this kind cannot train under."""


class TunedRecipe(Recipe):
    """The tuned lens (Belrose et al. 2023): SGD with Nesterov momentum, the reference's units."""

    lens_type = "tuned"
    starts_from = ("tuned", "affine")  # an affine fit is a tuned lens's best starting point
    warm_starts = True
    trained_with = ("init_lens", "lr", "momentum", "nesterov", "weight_decay", "warmup_steps", "warm_start_batches", "ridge")

    def make_lens(self, model, layers, offset):
        return TunedLens(layers, model.d_model, bias=self.hp.bias, offset=offset)

    def optimizer(self, lenses, equations):
        # The reference scales lr by (1 − momentum) so that lr=1.0 is a sensible SGD step size.
        hp = self.hp
        return torch.optim.SGD(lenses.parameters(), lr=hp.lr * (1 - hp.momentum), momentum=hp.momentum,
                               nesterov=hp.nesterov, weight_decay=hp.weight_decay)


class PromptRecipe(Recipe):
    """The learned-prompt future lens (Pal et al. 2023): Adam on a soft prompt that starts as the
    token-identity prompt, trained on a subsample of positions (each costs a model pass per layer)."""

    lens_type = "learned_prompt"
    lr_flag = "--model.prompt_lr"
    starts_from = ("learned_prompt",)
    trained_with = ("init_lens", "prompt_lr", "warmup_steps", "prompt_positions")

    def make_lens(self, model, layers, offset):
        lens = LearnedPromptLens(layers, model.d_model, offset=offset, prompt_length=self.hp.prompt_length)
        # A patchscope that already decodes the next token is where the prompt starts.
        lens.init_from_tokens(model.hf.get_input_embeddings(), model.tokenizer(IDENTITY_PROMPT)["input_ids"])
        return lens

    def optimizer(self, lenses, equations):
        return torch.optim.Adam(lenses.parameters(), lr=self.hp.prompt_lr)

    def positions(self, n, seed, device):
        m = min(n, self.hp.prompt_positions)
        if seed is None:  # validation: evenly spread, the same every time
            return torch.linspace(0, n - 1, m, device=device).round().long()
        # Seeded by the step, so that a resumed run trains on the same positions.
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m].to(device)

    def check_strategy(self, strategy):
        if isinstance(strategy, FSDPStrategy):
            # Its passes through the frozen model depend on each rank's batch, and under FSDP every
            # pass gathers the blocks from all ranks: ranks with different batches would hang.
            raise ConfigError("--model.lens_type learned_prompt cannot train under FSDP (configs/trainer/fsdp.yaml); "
                              "use configs/trainer/ddp.yaml")


class LeastSquaresRecipe(Recipe):
    """The least-squares affine lens (Patchscopes' "tuned lens"): normal equations accumulated
    step by step (``LeastSquaresFit``) and solved in float64 before each validation."""

    lens_type = "affine"
    closed_form = True
    starts_from = ("affine",)
    schedules_lr = False
    # Its --model.ridge is applied when the accumulated equations are solved: a changed one is used in full.

    def make_lens(self, model, layers, offset):
        return AffineLens(layers, model.d_model, bias=True, offset=offset)

    def equations(self, lenses):
        return {key: NormalEquations(lens.num_layers, lens.d_model) for key, lens in lenses.items()}

    def optimizer(self, lenses, equations):
        return LeastSquaresFit(lenses.parameters(), equations)


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """The learning rate at ``step`` as a fraction of the configured one: a linear warm-up over
    ``warmup_steps``, then a linear decay to 0 at ``max_steps`` (the reference's schedule)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


RECIPES: dict[str, type[Recipe]] = {r.lens_type: r for r in (TunedRecipe, PromptRecipe, LeastSquaresRecipe)}
"""The trainable kinds, by ``--model.lens_type`` (the logit lens has nothing to train)."""
