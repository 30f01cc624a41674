"""The tuned-lens format both ways, on the documented layout (the check against the real
tuned-lens 0.2 is bench/tuned_lens_interop.py, which needs the reference's own environment)."""

from __future__ import annotations

import json
import os

import pytest
import torch

import lenscope
from lenscope.lenses.artifact import LensArtifactError
from lenscope.lenses.lens import TunedLens
from lenscope.lenses.tuned_lens_format import save_tuned_lens, tuned_lens_hash


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return lenscope.load_model(str(tiny_model_dir))


def _translators(n: int, d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(n):
        state[f"{i}.weight"] = torch.randn(d, d, generator=g) * 0.05
        state[f"{i}.bias"] = torch.randn(d, generator=g) * 0.05
    return state


def _hash(m) -> str:
    return tuned_lens_hash(m.adapter.unembedding_weight)


CONFIGS = {
    "tuned-lens 0.2": lambda m: {"base_model_name_or_path": "tiny", "d_model": m.d_model, "num_hidden_layers": m.num_layers,
                                 "bias": True, "base_model_revision": None, "unembed_hash": _hash(m),
                                 "lens_type": "linear_tuned_lens"},
    "tuned-lens 0.1 (misspelt hash)": lambda m: {"base_model_name_or_path": "tiny", "d_model": m.d_model,
                                                 "num_hidden_layers": m.num_layers, "bias": True, "unemebd_hash": _hash(m)},
    "legacy": lambda m: {"bias": True, "include_input": True, "d_model": m.d_model, "num_layers": m.num_layers,
                         "vocab_size": m.vocab_size},
}


def _legacy_state(state: dict, m) -> dict:
    """tuned-lens <= 0.0.5 saved the whole module: input_translator (residual 0), layer_translators.i
    (residual i + 1), and its own copy of the decoder."""
    out = {"unembedding.weight": torch.zeros(m.vocab_size, m.d_model), "layer_norm.weight": torch.ones(m.d_model)}
    for key, value in state.items():
        i, kind = key.split(".")
        out[f"input_translator.{kind}" if i == "0" else f"layer_translators.{int(i) - 1}.{kind}"] = value
    return out


@pytest.mark.parametrize("shape", list(CONFIGS))
def test_a_published_lens_reads_as_the_translators_it_holds(model, tmp_path, shape, recwarn):
    state = _translators(model.num_layers, model.d_model)
    torch.save(_legacy_state(state, model) if shape == "legacy" else state, tmp_path / "params.pt")
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[shape](model)))
    lens = lenscope.load_lens(tmp_path, model)
    assert isinstance(lens, TunedLens) and lens.layers == model.layers
    # Translator i acts on residual i (0 = the embeddings) as h + W h + b.
    h = torch.randn(model.num_layers, 4, model.d_model)
    with torch.no_grad():
        expected = torch.stack([h[i] + h[i] @ state[f"{i}.weight"].T + state[f"{i}.bias"] for i in range(model.num_layers)])
        torch.testing.assert_close(lens(h), expected, rtol=1e-5, atol=1e-6)
    assert not recwarn.list, [str(w.message) for w in recwarn.list]  # the hash, where there is one, matches


def test_a_lens_whose_hash_names_another_unembedding_warns(model, tmp_path):
    torch.save(_translators(model.num_layers, model.d_model), tmp_path / "params.pt")
    (tmp_path / "config.json").write_text(json.dumps({**CONFIGS["tuned-lens 0.2"](model), "unembed_hash": "0" * 64}))
    with pytest.warns(UserWarning, match="unembedding differs from this model's"):
        lenscope.load_lens(tmp_path, model)


def test_a_lenscope_lens_written_in_the_format_reads_back_the_same(model, tmp_path):
    lens = TunedLens(model.layers, model.d_model)
    torch.nn.init.normal_(lens.weight, std=0.05)
    torch.nn.init.normal_(lens.bias, std=0.05)
    save_tuned_lens(lens, tmp_path / "out", model)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert set(config) == {"base_model_name_or_path", "d_model", "num_hidden_layers", "bias", "base_model_revision",
                           "unembed_hash", "lens_type"}
    assert config["lens_type"] == "linear_tuned_lens" and config["num_hidden_layers"] == model.num_layers
    state = torch.load(tmp_path / "out" / "params.pt", weights_only=True)
    assert set(state) == {f"{i}.{p}" for i in range(model.num_layers) for p in ("weight", "bias")}
    back = lenscope.load_lens(tmp_path / "out", model)
    h = model.residuals(model.tokenize("w1 w2 w3"))[model.layers]
    with torch.no_grad():
        torch.testing.assert_close(back.logits(model, h), lens.logits(model, h))


class _Exploit:
    def __reduce__(self):
        return (os.mkdir, (os.environ["LENSCOPE_TEST_PWNED"],))


def test_params_are_read_as_tensors_never_as_code(model, tmp_path, monkeypatch):
    flag = tmp_path / "pwned"
    monkeypatch.setenv("LENSCOPE_TEST_PWNED", str(flag))
    (tmp_path / "lens").mkdir()
    torch.save({"0.weight": _Exploit()}, tmp_path / "lens" / "params.pt")
    (tmp_path / "lens" / "config.json").write_text(json.dumps(CONFIGS["tuned-lens 0.2"](model)))
    with pytest.raises(LensArtifactError, match="cannot be read as tensors"):
        lenscope.load_lens(tmp_path / "lens", model)
    assert not flag.exists()


@pytest.mark.parametrize("change, message", [
    (lambda state, config: state.pop("2.weight"), "translators 0 … L-1"),
    (lambda state, config: config.update(d_model=7), "does not fit d_model 7"),
    (lambda state, config: state.update({"extra": torch.zeros(1)}), "not a translator"),
    (lambda state, config: config.update(lens_type="something_else"), "lenscope reads the 'linear_tuned_lens' kind"),
])
def test_a_malformed_tuned_lens_folder_is_refused_in_one_line(model, tmp_path, change, message):
    state = _translators(model.num_layers, model.d_model)
    config = CONFIGS["tuned-lens 0.2"](model)
    change(state, config)
    torch.save(state, tmp_path / "params.pt")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LensArtifactError, match=message) as err:
        lenscope.load_lens(tmp_path, model)
    assert "\n" not in str(err.value)


def test_a_tuned_lens_of_another_model_is_refused(model, tmp_path):
    torch.save(_translators(model.num_layers + 1, model.d_model), tmp_path / "params.pt")
    (tmp_path / "config.json").write_text(json.dumps({**CONFIGS["tuned-lens 0.2"](model), "num_hidden_layers": model.num_layers + 1}))
    with pytest.raises(LensArtifactError, match="use a lens trained on this model"):
        lenscope.load_lens(tmp_path, model)
