"""FSDP for lens training: shard the frozen model's decoder blocks, keep the lenses whole.

``configs/trainer/fsdp.yaml`` hands ``LensShardingPolicy`` to Lightning's ``FSDPStrategy`` as its
auto-wrap policy and makes the root unit ``NO_SHARD``. The training module tags its modules
(``ROLE``), and the units are:

* each decoder block of the frozen model (``block``): fully sharded, gathered only while it runs,
  so a model that does not fit one device still runs;
* the rest of the frozen model (``base``: embeddings, final norm, unembedding): one unit, whole on
  every rank. Every lens decodes through the unembedding for the whole step, so sharding it would
  add an all-gather per step and save no peak memory;
* the root, the training module itself, which then holds the lenses alone: whole on every rank,
  gradients all-reduced after each backward as under DDP (the step runs inside the root's forward).

The root holding nothing but the lenses is what keeps checkpoints lens-only under FSDP: a full
state dict of the root visits the lenses and never gathers a block.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import CustomPolicy, ModuleWrapPolicy

ROLE = "_lenscope_fsdp_role"
"""Attribute naming a module's role: ``block`` (a frozen decoder block) or ``base`` (the frozen model)."""

FSDP_PREFIX = "_fsdp_wrapped_module."
"""What FSDP inserts in the parameter names of a wrapped module."""


def tag(module: nn.Module, role: str) -> None:
    setattr(module, ROLE, role)


def _unit(module: nn.Module) -> bool | dict:
    role = getattr(module, ROLE, None)
    if role == "block":
        return {"sharding_strategy": ShardingStrategy.FULL_SHARD}
    if role == "base":
        return {"sharding_strategy": ShardingStrategy.NO_SHARD}
    return False


class LensShardingPolicy(ModuleWrapPolicy):
    """Frozen decoder blocks: fully sharded units; the rest of the frozen model: one whole unit.

    A ``ModuleWrapPolicy`` by type, so that ``FSDPStrategy``'s ``auto_wrap_policy`` accepts it from
    a YAML config; it picks modules by role rather than by class.
    """

    def __init__(self) -> None:
        super().__init__(set())
        self._by_role = CustomPolicy(_unit)

    def _run_policy(self, root_module, ignored_modules, root_kwargs):
        return self._by_role._run_policy(root_module, ignored_modules, root_kwargs)
