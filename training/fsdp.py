"""FSDP for lens training: shard the frozen model's decoder blocks, keep the lenses whole.

``configs/trainer/fsdp.yaml`` hands ``LensShardingPolicy`` to Lightning's ``FSDPStrategy`` as its
auto-wrap policy. The training module tags its modules (``ROLE``): each decoder block of the frozen
model becomes its own fully sharded FSDP unit (gathered only while it runs, so a model that does
not fit one device still runs), and the lenses become one unit with ``NO_SHARD`` (whole on every
rank, gradients all-reduced as under DDP). What is left (embeddings, final norm, unembedding) is the
root unit, gathered for each step, since every lens decodes through the unembedding.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import CustomPolicy, ModuleWrapPolicy

ROLE = "_lenscope_fsdp_role"
"""Attribute naming a module's role: ``block`` (a frozen decoder block) or ``lens``."""


def tag(module: nn.Module, role: str) -> None:
    setattr(module, ROLE, role)


def _unit(module: nn.Module) -> bool | dict:
    role = getattr(module, ROLE, None)
    if role == "block":
        return True
    if role == "lens":
        return {"sharding_strategy": ShardingStrategy.NO_SHARD}
    return False


class LensShardingPolicy(ModuleWrapPolicy):
    """Frozen decoder blocks: fully sharded units; lenses: one unsharded unit.

    A ``ModuleWrapPolicy`` by type, so that ``FSDPStrategy``'s ``auto_wrap_policy`` accepts it from
    a YAML config; it picks modules by role rather than by class.
    """

    def __init__(self) -> None:
        super().__init__(set())
        self._by_role = CustomPolicy(_unit)

    def _run_policy(self, root_module, ignored_modules, root_kwargs):
        return self._by_role._run_policy(root_module, ignored_modules, root_kwargs)
