"""lenscope: see what a transformer predicts at every layer.

Train lenses (tuned, future, least-squares affine, learned prompt) on real text, score them as
patchscope mappings, and inspect models with them. The command line is ``lenscope train …`` and
``lenscope evaluate …`` (``lenscope --help``); the packages:

* ``lenscope.lenses``: the lenses themselves and their artifact format;
* ``lenscope.model``: the frozen base model (loading, architecture adapter, residuals, patching);
* ``lenscope.datamodules``: documents in, batches out (training and evaluation data);
* ``lenscope.training``: the LightningModule that trains lenses, its callbacks and checks;
* ``lenscope.evaluation``: the Patchscopes protocol, metrics and reports;
* ``lenscope.cli``: the command lines.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lenscope")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"
