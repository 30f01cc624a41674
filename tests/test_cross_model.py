"""Cross-model patching (Patchscopes §4.4) on tiny random models of different widths, families and
tokenisers, and a model into itself."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPTNeoXConfig, PreTrainedTokenizerFast

import lenscope
from lenscope.datamodules.preprocessing import TrimSettings
from lenscope.errors import ConfigError
from lenscope.lenses.least_squares import NormalEquations
from lenscope.lenses.lens import AffineLens
from lenscope.lenses.patchscope import Patchscope, Target
from lenscope.model.frozen import FrozenModel
from lenscope.model.loading import LoadedModel
from lenscope.patchscopes.cross_model import (
    CrossModelMap,
    align,
    aligned_documents,
    evaluate_cross_model,
    fit_cross_model_map,
    read_position,
    token_translation,
)
from tests.conftest import make_tokenizer, random_text


def digit_tokenizer() -> PreTrainedTokenizerFast:
    """Another tokeniser of the same text: ``w12`` is three tokens, ``w``, ``1``, ``2``."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "w": 4, **{str(d): 5 + d for d in range(10)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return lenscope.load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def neox():
    """A wider model of another family, reading text with the digit tokeniser."""
    torch.manual_seed(3)
    config = GPTNeoXConfig(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
                           max_position_embeddings=256, vocab_size=16, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    return FrozenModel(LoadedModel(AutoModelForCausalLM.from_config(config).eval(), digit_tokenizer(), "tiny-neox", "local"))


def texts(n: int, seed: int, words=(25, 40)) -> list[tuple[int, str]]:
    rng = random.Random(seed)
    return [(k, random_text(rng, rng.randint(*words))) for k in range(n)]


def test_positions_align_where_both_tokenisers_have_read_the_same_text():
    doc = align(make_tokenizer(), digit_tokenizer(), "w12 w3 w150")
    # word tokens end at 3, 6, 11; digit tokens w,1,2 | w,3 | w,1,5,0 end at 1,2,3 | 5,6 | 8,9,10,11
    assert doc.source_ids == [16, 7, 154] and len(doc.target_ids) == 9
    assert doc.pairs == [(0, 2), (1, 4), (2, 8)]


def test_the_fit_is_least_squares_between_models_of_different_widths(llama, neox):
    docs = aligned_documents(llama, neox, texts(12, seed=0), max_tokens=200)
    source_layers, target_layers = [0, 2, 3], [1, 4]
    fitted = fit_cross_model_map(llama, neox, docs, source_layers, target_layers, ridge=0.0)
    assert fitted.weight.shape == (3, 2, 48, 32) and fitted.bias.shape == (3, 2, 48)
    # the reference: torch's least squares on the same pairs, gathered one document at a time
    xs, ys = [], []
    for d in docs:
        hs = llama.residuals(torch.tensor([d.source_ids]))[:, 0]
        ht = neox.residuals(torch.tensor([d.target_ids]))[:, 0]
        xs.append(torch.stack([hs[:, i] for i, _ in d.pairs], 1))
        ys.append(torch.stack([ht[:, j] for _, j in d.pairs], 1))
    x, y = torch.cat(xs, 1).double(), torch.cat(ys, 1).double()
    assert fitted.meta["fit_positions"] == x.shape[1] > 33
    for sl in source_layers:
        for tl in target_layers:
            design = torch.cat([x[sl], torch.ones(x.shape[1], 1, dtype=torch.float64)], 1)
            solution = torch.linalg.lstsq(design, y[tl]).solution
            torch.testing.assert_close(fitted(x[sl].float(), sl, tl), (design @ solution).float(), rtol=1e-3, atol=1e-3)


def test_evaluation_patches_the_mapped_state_into_the_other_model(llama, neox):
    fit = aligned_documents(llama, neox, texts(12, seed=0), 200)
    evaluation = aligned_documents(llama, neox, texts(6, seed=1), 200)
    mapping = fit_cross_model_map(llama, neox, fit, [1, 3], [0, 2, 4])
    result = evaluate_cross_model(llama, neox, mapping, evaluation, seed=7, batch_size=4, rows_per_pass=5)
    assert result.precision.shape == result.surprisal.shape == (2, 3) and result.positions == 6
    assert result.identity_error == {}  # widths differ: there is no identity to compare with
    # the reference, one unbatched engine pass per (document, pair)
    translate = token_translation(llama.tokenizer, neox.tokenizer)
    hits = torch.zeros(2, 3)
    for doc in evaluation:
        i, j = read_position(doc, 7, TrimSettings())
        own = llama.log_probs(llama.residuals(torch.tensor([doc.source_ids]))[-1, 0, i])
        h = llama.residuals(torch.tensor([doc.source_ids]))[:, 0, i]
        for s, sl in enumerate([1, 3]):
            for t, tl in enumerate([0, 2, 4]):
                at = torch.tensor([j])
                logits = neox.engine.run(torch.tensor([doc.target_ids[: j + 1]]), None, torch.tensor([tl]), at,
                                         mapping(h[sl], sl, tl)[None], at)[0]
                hits[s, t] += float(translate(logits.argmax(-1)[None])[0] == own.argmax())
    torch.testing.assert_close(result.precision, hits / 6)
    assert torch.isfinite(result.surprisal).all()


def test_a_model_into_itself_maps_a_layer_to_itself_and_its_last_column_is_the_affine_lens(llama):
    layers = [0, 1, 2]
    fit = aligned_documents(llama, llama, texts(20, seed=0), 200)
    evaluation = aligned_documents(llama, llama, texts(10, seed=1), 200)
    mapping = fit_cross_model_map(llama, llama, fit, layers, [*layers, llama.num_layers], ridge=1e-3)
    result = evaluate_cross_model(llama, llama, mapping, evaluation, seed=3)
    # ℓ* = ℓ: the identity, so the model's own prediction
    assert max(result.identity_error.values()) < 1e-2, result.identity_error
    assert torch.equal(result.precision[:, :3].diagonal(), torch.ones(3))
    torch.testing.assert_close(result.surprisal[:, :3].diagonal(), torch.full((3,), result.model_surprisal))
    # ℓ* = L: the least-squares affine lens on the same positions, decoded as lenscope evaluate does
    equations = NormalEquations(3, llama.d_model)
    for d in fit:
        r = llama.residuals(torch.tensor([d.source_ids]))[:, 0]
        at = torch.tensor([i for i, _ in d.pairs])
        equations.update(r[layers][:, at], r[-1][at])
    lens = equations.fit(AffineLens(layers, llama.d_model, bias=True), ridge=1e-3)
    positions = [read_position(d, 3, TrimSettings()) for d in evaluation]
    states = torch.stack([llama.residuals(torch.tensor([d.source_ids]))[layers, 0, i] for d, (i, _) in zip(evaluation, positions, strict=True)], 1)
    own = torch.stack([llama.log_probs(llama.residuals(torch.tensor([d.source_ids]))[-1, 0, i]) for d, (i, _) in zip(evaluation, positions, strict=True)])
    top = Patchscope(target=Target(layers="last"), mapping=lens).patch(llama, states, layers).logits.argmax(-1)  # (3, N)
    torch.testing.assert_close(result.precision[:, 3], (top == own.argmax(-1)).float().mean(-1))
    torch.testing.assert_close(result.surprisal[:, 3], -own.T[top, torch.arange(len(evaluation))].mean(-1))


def test_the_map_is_saved_and_refused_by_models_of_other_widths(llama, neox, tmp_path):
    mapping = fit_cross_model_map(llama, neox, aligned_documents(llama, neox, texts(12, seed=0), 200), [1], [2])
    path = mapping.save(tmp_path / "map.safetensors")
    again = CrossModelMap.load(path)
    assert again.source_layers == [1] and again.target_layers == [2] and torch.equal(again.weight, mapping.weight)
    assert again.meta["target_model"] == "tiny-neox"
    with pytest.raises(ConfigError, match="maps width 32 to 48, but the models have 32 and 32"):
        again.check(llama, llama)
    with pytest.raises(ConfigError, match="not a cross-model map"):
        (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
        CrossModelMap.load(tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match="covers source layers \\[1\\]"):
        again(torch.zeros(1, 32), 0, 2)


@pytest.fixture(scope="module")
def neox_dir(neox, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-neox")
    neox.hf.save_pretrained(path)
    neox.tokenizer.save_pretrained(path)
    return path


def test_lenscope_patchscope_crossmodel_then_describe_across_models(tiny_model_dir, neox_dir, corpus, tmp_path, capsys,
                                                                    wandb_spy):
    """The command fits and scores the maps, saves them, and `describe` uses them to describe the
    first model's states in the second model."""
    import json

    from lenscope import cli

    out = tmp_path / "cross"
    cli.main(["patchscope", "crossmodel", "--model", str(tiny_model_dir), "--target_model", str(neox_dir),
              "--data", str(corpus), "--n_fit", "12", "--n_eval", "6", "--source_layers", "[1, 2]",
              "--target_layers", "[0, 2, 4]", "--out", str(out), "--wandb_project", "lenscope-test"])
    printed = capsys.readouterr().out
    assert [i["job_type"] for i in wandb_spy.inits] == ["cross-model"]
    assert {"cross_model/grid", "cross_model/precision_at_1"} <= {key for data in wandb_spy.logged for key in data}
    assert "precision@1, source layer ℓ (rows) → target layer ℓ* (columns), 6 positions" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["positions"] == 6 and len(results["precision@1"]) == 2 and len(results["precision@1"][0]) == 3
    assert results["fit_documents"] == 12 and results["identity_error"] == {}
    assert all((out / name).read_bytes()[:4] == b"\x89PNG" for name in ("precision_at_1.png", "surprisal_nats.png"))
    assert len((out / "grid.csv").read_text().splitlines()) == 1 + 6
    mapping = CrossModelMap.load(out / "map.safetensors")
    assert mapping.weight.shape == (2, 3, 48, 32)

    entities = tmp_path / "entities.json"
    entities.write_text(json.dumps({"few_shot": [["w1", "w2"]], "entities": [{"name": "w5", "description": "w6", "split": "rare"}]}))
    with pytest.raises(SystemExit):  # layer 1 is not mapped to itself (target layers 0, 2, 4)
        cli.main(["patchscope", "describe", "--model", str(tiny_model_dir), "--target_model", str(neox_dir),
                  "--mapping", str(out / "map.safetensors"), "--entities", str(entities), "--layers", "[1]", "--out", str(tmp_path / "d0")])
    assert "no map from layer 1 to itself" in capsys.readouterr().err
    cli.main(["patchscope", "describe", "--model", str(tiny_model_dir), "--target_model", str(neox_dir),
              "--mapping", str(out / "map.safetensors"), "--entities", str(entities), "--max_new_tokens", "3",
              "--stop", "null", "--out", str(tmp_path / "described")])
    described = json.loads((tmp_path / "described" / "results.json").read_text())
    assert described["layers"] == [2] and described["target_model"] == str(neox_dir)
    # the generation is the second model's, from the first model's mapped state
    h = lenscope.load_model(str(tiny_model_dir)).residuals(torch.tensor([[make_tokenizer()("w5")["input_ids"][-1]]]))[2, 0, -1]
    neox_model = lenscope.load_model(str(neox_dir))
    reference = Patchscope(target=Target("w1: w2, x", layers="same", placeholder="x"), mapping=mapping,
                           readout=__import__("lenscope.lenses.patchscope", fromlist=["Generate"]).Generate(3, stop=None))
    expected = reference.patch(neox_model, h[None, None], [2]).texts[0][0].strip()
    assert described["entities"][0]["generations"] == [expected]


def test_crossmodel_refuses_bad_settings_in_one_line(tiny_model_dir, corpus, capsys):
    from lenscope import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["patchscope", "crossmodel", "--model", str(tiny_model_dir), "--data", str(corpus),
                  "--target_layers", "[9]"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--target_layers [9] out of range: residual indices are 0..3" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        cli.main(["patchscope", "crossmodel", "--model", str(tiny_model_dir), "--data", str(corpus), "--n_fit", "5000"])
    err = capsys.readouterr().err
    assert "has no evaluation documents" in err and "lower --n_fit" in err and "--data." not in err
    with pytest.raises(SystemExit):
        cli.main(["patchscope", "crossmodel", "--model", str(tiny_model_dir), "--data", str(corpus), "--seq_len", "999"])
    assert "--seq_len is 999 but the model's context is 256; lower --seq_len" in capsys.readouterr().err
