"""lenscope: see what a transformer predicts at every layer.

    import lenscope
    model = lenscope.load_model("embedded:smollm2-135m")           # or a hub id, or a folder
    lens = lenscope.load_lens("artifacts/quickstart/tuned", model)  # refuses a lens made for another model

Train lenses (tuned, future, least-squares affine, learned prompt) on real text, score them as
patchscope mappings, and inspect models with them. The command line is ``lenscope train …`` and
``lenscope evaluate …`` (``lenscope --help``); the packages:

* ``lenscope.lenses``: the lenses themselves and their artifact format;
* ``lenscope.model``: the frozen base model (loading, architecture adapter, residuals, patching);
* ``lenscope.datamodules``: documents in, batches out (training and evaluation data);
* ``lenscope.training``: the LightningModule that trains lenses, its callbacks and checks;
* ``lenscope.evaluation``: the Patchscopes protocol, metrics and reports;
* ``lenscope.patchscopes``: the Patchscopes paper's experiments (attribute extraction, entity
  description, multi-hop, cross-model);
* ``lenscope.steering``: in-context tasks, h-vectors and function vectors;
* ``lenscope.cli``: the command lines.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("lenscope")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from lenscope.lenses.artifact import load_lens
    from lenscope.model.frozen import FrozenModel

__all__ = ["FrozenModel", "load_lens", "load_model"]


def load_model(name: str = "embedded:smollm2-135m", revision: str | None = None, dtype: str = "float32") -> FrozenModel:
    """The frozen model lenses read and decode: a hub id, a local folder, or the embedded
    ``embedded:smollm2-135m`` (see :class:`lenscope.model.frozen.FrozenModel`)."""
    from lenscope.model.frozen import FrozenModel

    return FrozenModel.load(name, revision, dtype)


def __getattr__(name: str):
    # Torch, transformers and nnsight load on first use, not on `import lenscope`.
    if name == "FrozenModel":
        from lenscope.model.frozen import FrozenModel

        return FrozenModel
    if name == "load_lens":
        from lenscope.lenses.artifact import load_lens

        return load_lens
    raise AttributeError(f"module 'lenscope' has no attribute {name!r}")
