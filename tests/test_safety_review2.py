"""A review of the commands' checks (outputs, float options, non-finite states): the passes that
run outside ``ResidualReader.read`` (attention knockout's clean pass, the greedy generations that
choose attribute extraction's facts) refuse non-finite states as the others do, and the
``rows_per_pass`` of knockout and trace is checked like every other command's."""

from __future__ import annotations

import math
import re

import pytest

from lenscope import cli
from tests.test_safety_commands import PROMPT, SUBJECT, _fails

NON_FINITE = "the model's hidden states contain NaN or inf at the embeddings (residual index 0)"


def _poisoned(model, *words: str):
    """``model`` with the embeddings of ``words`` set to inf, after its heads were found (the
    attention probe scales its inputs by the embeddings' spread, which an inf row makes inf)."""
    import torch

    assert model.heads is not None  # found now, while the embeddings are finite
    with torch.no_grad():
        model.hf.get_input_embeddings().weight[model.tokenizer.convert_tokens_to_ids(list(words))] = torch.inf
    return model


def _written(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and p.name != ".lenscope.lock")


def test_knockout_refuses_non_finite_states(tiny_model_dir):
    """Its clean pass runs the model directly: it wrote knockout.json with answer `<unk>` and
    every change null (NaN probabilities)."""
    from lenscope.model.frozen import FrozenModel
    from lenscope.model.residuals import HiddenStatesNotFiniteError
    from lenscope.patchscopes.attention_knockout import attention_knockout

    model = _poisoned(FrozenModel.load(str(tiny_model_dir)), "w5")
    with pytest.raises(HiddenStatesNotFiniteError, match=re.escape(NON_FINITE)):
        attention_knockout(model, PROMPT, SUBJECT, window=1, layers=[0])


def test_attribute_extraction_refuses_non_finite_states(tiny_model_dir, tmp_path):
    """Its facts are chosen by `generate`, outside the reader: NaN logits decoded to token 0, so the
    model answered no fact and every relation was left unscored, without a word about why."""
    from lenscope.model.frozen import FrozenModel
    from lenscope.model.residuals import HiddenStatesNotFiniteError
    from lenscope.patchscopes.attribute_extraction import attribute_extraction
    from tests.test_attribute_extraction import tiny_facts

    model = FrozenModel.load(str(tiny_model_dir))
    facts = tiny_facts(model, tmp_path)  # every fact answered by the finite model
    _poisoned(model, "w10", "w30")  # the first word of each relation's questions
    with pytest.raises(HiddenStatesNotFiniteError, match=re.escape(NON_FINITE)):
        attribute_extraction(model, facts, source_layers=[0], target_layers=[0], max_new_tokens=2)


def test_a_finite_model_passes_the_checks_outside_the_reader(tiny_model_dir):
    """The checks add no refusal where the states are finite."""
    from lenscope.model.frozen import FrozenModel
    from lenscope.patchscopes.attention_knockout import attention_knockout
    from lenscope.patchscopes.attribute_extraction import greedy_continuations

    model = FrozenModel.load(str(tiny_model_dir))
    assert len(greedy_continuations(model, ["w5 w6 w7", "w8"], 2)) == 2
    assert attention_knockout(model, PROMPT, SUBJECT, window=1, layers=[0]).probability > 0


@pytest.mark.parametrize("command", [["knockout"], ["trace", "--samples", "2"]])
@pytest.mark.parametrize("rows", ["0", "-3"])
def test_rows_per_pass_below_one_is_refused(command, rows, tiny_model_dir, tmp_path, capsys):
    """knockout crashed with `range() arg 3 must not be zero`; trace ran, ignoring the setting."""
    err = _fails(["patchscope", *command, "--prompt", PROMPT, "--subject", SUBJECT, "--model", str(tiny_model_dir),
                  "--out", str(tmp_path / "out"), "--rows_per_pass", rows], capsys)
    assert f"rows_per_pass must be at least 1, got {rows}" in err, err
    assert _written(tmp_path) == []


# --- the check of the states on every read ------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_states_check_finds_every_non_finite_value(value, dtype):
    import torch

    from lenscope.model.residuals import HiddenStatesNotFiniteError, check_finite_states

    residuals = torch.randn(4, 2, 5, 8).to(getattr(torch, dtype))
    check_finite_states(residuals)
    residuals[2, 1, 3, 7] = value
    with pytest.raises(HiddenStatesNotFiniteError, match=r"at the output of block 1 \(residual index 2\)"):
        check_finite_states(residuals)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3] = 0  # a padding position: not the model's state of a real token
    check_finite_states(residuals, mask)


def test_the_states_check_builds_no_tensor_of_the_states_size():
    """It runs on every read (training, evaluation, every command): `isfinite(residuals).all()`
    built a boolean copy of all the states first, 10× the time of one fused reduction on CPU."""
    import torch
    from torch.overrides import TorchFunctionMode

    from lenscope.model.residuals import check_finite_states

    residuals = torch.randn(4, 2, 5, 8)
    sizes = []

    class Sizes(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes.extend(t.numel() for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor))
            return out

    with Sizes():
        check_finite_states(residuals)
    assert sizes and max(sizes) < residuals.numel(), sizes


# --- --overwrite ---------------------------------------------------------------------------------------
def test_overwrite_leaves_no_earlier_result_beside_the_new_ones(tiny_model_dir, tmp_path, capsys):
    """A relation left out of the second run: its heatmap stayed in the folder beside the new
    results.json, as if this run had made it."""
    import json

    from lenscope.model.frozen import FrozenModel
    from tests.test_attribute_extraction import tiny_facts

    tiny_facts(FrozenModel.load(str(tiny_model_dir)), tmp_path)
    argv = ["patchscope", "attribute", "--model", str(tiny_model_dir), "--facts", str(tmp_path / "facts.json"),
            "--source_layers", "[0]", "--target_layers", "[0]", "--max_new_tokens", "2", "--out", str(tmp_path / "out")]
    cli.main(argv)
    assert (tmp_path / "out" / "heatmap_tiny.png").is_file()
    capsys.readouterr()
    cli.main([*argv, "--relations", "[other]", "--overwrite", "true"])
    assert "removed the earlier run's heatmap_tiny.png" in capsys.readouterr().out
    assert _written(tmp_path / "out") == ["results.json", "table.csv", "table.md"]
    assert [r["relation"] for r in json.loads((tmp_path / "out" / "results.json").read_text())["relations"]] == ["other"]


# --- underdetermined fits ------------------------------------------------------------------------------
@pytest.mark.parametrize(("fit_positions", "underdetermined"), [("one", True), ("all", False)])
def test_crossmodel_records_an_underdetermined_map(fit_positions, underdetermined, tiny_model_dir, corpus, tmp_path):
    """12 documents, one position each, for width 32 (33 unknowns): underdetermined; all their
    positions: not. The record comes from the fit itself (NormalEquations.underdetermined)."""
    import json
    import warnings

    from lenscope.lenses.least_squares import UnderdeterminedFitWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnderdeterminedFitWarning)
        cli.main(["patchscope", "crossmodel", "--model", str(tiny_model_dir), "--data", str(corpus), "--n_fit", "12",
                  "--n_eval", "4", "--fit_positions", fit_positions, "--source_layers", "[1]", "--target_layers", "[1]",
                  "--out", str(tmp_path / "cross")])
    results = json.loads((tmp_path / "cross" / "results.json").read_text())
    assert results["underdetermined_fit"] is underdetermined
    assert any(issubclass(w.category, UnderdeterminedFitWarning) for w in caught) is underdetermined


# --- show --out ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("out", ["pages/", "pages"])
def test_show_refuses_an_out_that_names_a_folder(out, tmp_path, capsys, monkeypatch):
    """`--out pages/` (or an existing folder `pages`) wrote pages.html and pages.png beside the
    folder, not in it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pages").mkdir()
    err = _fails(["show", "w3", "--model", str(tmp_path / "no-such-model"), "--out", out], capsys)
    assert f"--out {out!r} names a folder" in err, err
    assert _written(tmp_path) == []
