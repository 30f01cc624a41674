"""What an adversarial review of the span and artifact changes found: each test failed before its fix."""

from __future__ import annotations

import pytest
import torch

import lenscope
from lenscope.lenses.artifact import load_lens, save_lens
from lenscope.lenses.lens import TunedLens, WrongModelError
from lenscope.lenses.patchscope import Patchscope, Source, Target
from tests.conftest import make_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return lenscope.load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A model of the same shape as ``model`` with other weights: a lens fits it but means nothing there."""
    path = tmp_path_factory.mktemp("other-llama")
    tiny_llama(seed=1).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return lenscope.load_model(str(path))


def _saved_lens(model, folder):
    torch.manual_seed(0)
    lens = TunedLens(model.layers, model.d_model)
    with torch.no_grad():
        lens.weight.normal_(0, 0.05)
    return save_lens(lens, folder, base_model=model.name, revision=model.revision, unembed_hash=model.unembed_hash,
                     num_hidden_layers=model.num_layers)


# --- a lens as a patchscope mapping is bound to the model whose states it maps ---------------------------
def test_a_lens_mapping_refuses_states_of_another_model(tmp_path, model, other_model):
    lens = load_lens(_saved_lens(model, tmp_path / "tuned"))  # loaded without a model: bound by its artifact
    scope = Patchscope(Source(["w1 w2 w3"], [1], position=-1), Target(layers="last"), mapping=lens)
    with pytest.raises(WrongModelError, match=r"^the tuned lens was made for .*; use a lens trained on this model$"):
        scope.run(other_model)
    states, _ = scope.read(other_model)
    with pytest.raises(WrongModelError):
        scope.patch(other_model, states, [1])
    assert scope.run(model).logits.isfinite().all()  # its own model's states: mapped as before
    # States of its own model written into another (cross-model patching, as `patchscope run
    # --target_model` does): the lens maps the source's states, so that is allowed.
    assert scope.run(model, other_model).logits.isfinite().all()

