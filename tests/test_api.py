"""What a researcher imports: ``lenscope.load_model`` and ``lenscope.load_lens``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lenscope
from lenscope.lenses.artifact import LensArtifactError, save_lens
from lenscope.lenses.lens import TunedLens


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return lenscope.load_model(str(tiny_model_dir))


def test_import_is_light():
    # A notebook's `import lenscope` (or a command's --help) does not pay for torch and transformers.
    code = "import sys, lenscope; print(sorted({'torch', 'transformers', 'nnsight'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_the_frozen_model_reads_and_decodes_as_the_model_does(model):
    ids = model.tokenizer("w1 w2 w3 w4 w5", return_tensors="pt").input_ids
    h = model.residuals(ids)
    assert h.shape == (model.num_layers + 1, 1, ids.shape[1], model.d_model)
    assert model.layers == list(range(model.num_layers)) and model.num_layers == 3
    with torch.no_grad():
        own = model.hf(ids).logits
    torch.testing.assert_close(model.decode(h[-1]), own, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.log_probs(h[-1]), torch.log_softmax(own.float(), -1), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in model.hf.parameters()) and not model.hf.training
    assert "layers=3" in repr(model)


def test_load_lens_takes_the_model_and_refuses_another(model, tmp_path):
    lens = TunedLens(model.layers, model.d_model)
    torch.nn.init.normal_(lens.weight, std=0.01)
    kwargs = dict(base_model=model.name, revision=model.revision, num_hidden_layers=model.num_layers)
    save_lens(lens, tmp_path / "ours", unembed_hash=model.unembed_hash, **kwargs)
    loaded = lenscope.load_lens(tmp_path / "ours", model)
    torch.testing.assert_close(loaded.weight, lens.weight)
    save_lens(lens, tmp_path / "theirs", unembed_hash="0" * 16, **kwargs)
    with pytest.raises(LensArtifactError, match="use a lens trained on this model"):
        lenscope.load_lens(tmp_path / "theirs", model)


def test_every_kind_of_lens_decodes_itself(model):
    from lenscope.lenses.learned_prompt import LearnedPromptLens
    from lenscope.lenses.lens import AffineLens, LogitLens

    ids = model.tokenizer("w1 w2 w3 w4 w5", return_tensors="pt").input_ids
    h = model.residuals(ids)[model.layers]  # (L, 1, T, d), as a notebook has it
    torch.manual_seed(0)
    tuned = TunedLens(model.layers, model.d_model, offset=2)
    torch.nn.init.normal_(tuned.weight, std=0.05)
    prompt = LearnedPromptLens(model.layers, model.d_model, offset=1, prompt_length=3)
    torch.nn.init.normal_(prompt.prompt, std=0.05)
    with torch.no_grad():
        torch.testing.assert_close(LogitLens(model.layers, model.d_model).logits(model, h), model.decode(h).float())
        torch.testing.assert_close(tuned.logits(model, h), model.decode(tuned(h)))
        got = prompt.logits(model, h)
        assert got.shape == (*h.shape[:-1], model.vocab_size) and torch.isfinite(got).all()
        # Each state decodes on its own: the same state gives the same logits in any batch.
        torch.testing.assert_close(prompt.logits(model, h[:, :, 2:3]), got[:, :, 2:3], rtol=1e-4, atol=1e-5)
    assert [lens.key for lens in (tuned, prompt, AffineLens(model.layers, model.d_model))] == ["tuned+2", "learned_prompt+1", "affine"]
