"""Every command checks its inputs, its numbers and its outputs before any work: an earlier run's
results are never replaced without --overwrite, a folder another run writes to is refused, every
float option is finite and in range, and every JSON file written is strict JSON."""

from __future__ import annotations

import inspect
import json
import math

import pytest

from lenscope import cli, strict_json
from lenscope.cli import evaluate
from lenscope.cli.patchscope import COMMANDS
from lenscope.cli.steer import steer
from lenscope.evaluation.patchscope_module import PatchscopeEvaluation
from lenscope.training.preflight import lock_folders, release_locks

PROMPT = "w5 w6 w7 w8 w9 w10 w11"
SUBJECT = "w7 w8"

# Per command: the arguments it needs besides --model and --out, what --out names (a folder, or a
# file name for `run` and `show`), and one file of an earlier run there.
OUTPUTS = {
    "run": (["patchscope", "run", "--source.prompts", "['w1 w2 w3']", "--source.layers", "[1]"], "scope.json", None),
    "attribute": (["patchscope", "attribute"], "results", "heatmap_capital.png"),
    "describe": (["patchscope", "describe"], "results", "rouge_l.png"),
    "multihop": (["patchscope", "multihop"], "results", "queries.csv"),
    "crossmodel": (["patchscope", "crossmodel"], "results", "map.safetensors"),
    "trace": (["patchscope", "trace", "--prompt", PROMPT, "--subject", SUBJECT], "results", "trace.json"),
    "knockout": (["patchscope", "knockout", "--prompt", PROMPT, "--subject", SUBJECT], "results", "knockout.json"),
    "lre": (["patchscope", "lre"], "results", "table.csv"),
    "steer": (["steer", "--tasks", "[antonyms]"], "results", "aie_antonyms.png"),
    "show": (["show", "w3 w4"], "traj", None),
}


def _command(name: str, tmp_path, model, overwrite: bool) -> tuple[list[str], object]:
    """The command line, and the earlier result file it must not replace silently."""
    argv, out, earlier = OUTPUTS[name]
    argv = [*argv, "--model", str(model), "--out", str(tmp_path / out)]
    if name == "show":
        earlier_file = tmp_path / "traj.html"
        argv += ["--overwrite"] if overwrite else []
    else:
        earlier_file = tmp_path / out if earlier is None else tmp_path / out / earlier
        argv += ["--overwrite", "true"] if overwrite else []
    earlier_file.parent.mkdir(parents=True, exist_ok=True)
    return argv, earlier_file


def _fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("name", list(OUTPUTS))
def test_an_earlier_result_is_refused_before_any_work_and_overwrite_passes(name, tmp_path, capsys):
    """With a model that does not exist: the refusal comes first (nothing was loaded), and with
    --overwrite the command gets past its outputs to the model (which then fails)."""
    missing = tmp_path / "no-such-model"
    argv, earlier = _command(name, tmp_path, missing, overwrite=False)
    earlier.write_text("earlier")
    err = _fails(argv, capsys)
    assert f"already holds an earlier run's results ({earlier.name}" in err and "--overwrite" in err, err
    argv, _ = _command(name, tmp_path, missing, overwrite=True)
    err = _fails(argv, capsys)
    assert "already holds" not in err and "no-such-model" in err, err
    assert earlier.read_text() == "earlier"


@pytest.mark.parametrize("name", ["run", "trace", "show"])
def test_overwrite_replaces_an_earlier_result(name, tmp_path, tiny_model_dir, capsys):
    argv, earlier = _command(name, tmp_path, tiny_model_dir, overwrite=True)
    earlier.write_text("earlier")
    cli.main(argv)
    assert earlier.read_text() != "earlier"
    if earlier.suffix == ".json":
        json.loads(earlier.read_text())
    if name == "trace":  # what the writer wrote is what the claim looked for
        from fnmatch import fnmatch

        from lenscope.patchscopes.report import OUTPUTS as CLAIMED

        written = [p.name for p in earlier.parent.iterdir() if p.name != ".lenscope.lock"]
        assert written and all(any(fnmatch(n, pattern) for pattern in CLAIMED["causal-trace"]) for n in written), written


def test_show_refuses_to_replace_its_default_page(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "trajectory.png").write_bytes(b"earlier")
    err = _fails(["show", "w3", "--model", str(tiny_model_dir)], capsys)
    assert "already holds an earlier run's results (trajectory.png)" in err and "pass --overwrite to" in err
    assert (tmp_path / "trajectory.png").read_bytes() == b"earlier"


def test_an_output_folder_that_is_a_file_is_refused_before_the_experiment(tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    err = _fails(["patchscope", "attribute", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "taken")],
                 capsys)
    assert f"output folder {tmp_path / 'taken'} is a file" in err and (tmp_path / "taken").read_text() == "mine"


def test_a_folder_where_a_result_file_goes_is_refused(tmp_path, capsys):
    (tmp_path / "scope.json").mkdir()
    argv, _ = _command("run", tmp_path, tmp_path / "no-such-model", overwrite=True)
    err = _fails(argv, capsys)
    assert f"{tmp_path / 'scope.json'} is a folder, where a result file would be written" in err


def test_a_folder_another_run_writes_to_is_refused(tmp_path, capsys):
    lock_folders({tmp_path / "results": "--out"})
    try:
        argv, _ = _command("trace", tmp_path, tmp_path / "no-such-model", overwrite=True)
        err = _fails(argv, capsys)
    finally:
        release_locks()
    assert f"is writing to {tmp_path / 'results'}" in err


# --- float options ------------------------------------------------------------------------------------
def _float_options():
    """Every float option of every command (found from their signatures: a new one is walked too)."""
    functions = {**{("patchscope", name): f for name, f in COMMANDS.items()}, ("steer",): steer}
    for words, function in functions.items():
        for p in inspect.signature(function).parameters.values():
            if p.annotation in ("float", float):
                yield [*words], p.name
    for p in inspect.signature(PatchscopeEvaluation.__init__).parameters.values():
        if p.annotation in ("float", float):
            yield ["evaluate"], f"model.{p.name}"


FLOAT_OPTIONS = list(_float_options())


def test_the_walk_finds_the_float_options():
    assert {(" ".join(w), o) for w, o in FLOAT_OPTIONS} == {
        ("patchscope crossmodel", "ridge"), ("patchscope trace", "noise"), ("patchscope lre", "beta"),
        ("steer", "test_share"), ("evaluate", "model.ridge")}


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-inf", "-1"])
@pytest.mark.parametrize(("words", "option"), FLOAT_OPTIONS, ids=[" ".join(w) + " " + o for w, o in FLOAT_OPTIONS])
def test_every_float_option_is_checked_before_any_work(words, option, value, tmp_path, tiny_model_dir, corpus, capsys):
    if words == ["evaluate"]:
        from tests.test_evaluation import eval_args

        with pytest.raises(SystemExit) as stop:
            evaluate.main(eval_args(tmp_path / "eval", tiny_model_dir, corpus, f"--{option}={value}"))
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    else:
        name = words[-1]
        argv = [*(OUTPUTS[name][0] if name in OUTPUTS else words), "--model", str(tmp_path / "no-such-model"),
                "--out", str(tmp_path / "out"), f"--{option}={value}"]
        err = _fails(argv, capsys)
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # Refused by the parser (nan, inf: not numbers to jsonargparse) or by the command's own check.
    assert f"--{option}: Expected a float" in err or f"--{option} must be" in err, err
    assert "no-such-model" not in err


# --- strict JSON --------------------------------------------------------------------------------------
def test_json_is_strict_with_non_finite_numbers_as_null():
    text = strict_json.dumps({"a": [1.0, math.nan, {"b": math.inf}], "c": (-math.inf, 2), "d": "NaN"})
    assert json.loads(text) == {"a": [1.0, None, {"b": None}], "c": [None, 2], "d": "NaN"}
    assert "NaN" not in text.replace('"NaN"', "") and "Infinity" not in text


# --- non-finite hidden states -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def overflowing_dirs(tmp_path_factory):
    """Two tiny LLaMAs whose states are inf after block 0 for the test words: one in float16 (as
    Gemma 3 270M from block 11), one even in float32 (the commands that always load float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tokenizer
    from tests.test_bad_inputs import overflowing_llama_dir

    root = tmp_path_factory.mktemp("overflowing")
    in_float16 = overflowing_llama_dir(root / "float16")
    model = AutoModelForCausalLM.from_pretrained(in_float16)
    with torch.no_grad():
        embeddings = model.model.embed_tokens.weight
        embeddings[embeddings.abs() > 1e4] = 3e38  # the rows the helper made large; fp32's max is 3.4e38
        model.model.layers[0].mlp.down_proj.bias.fill_(3e38)
    model.save_pretrained(root / "float32")
    make_tokenizer().save_pretrained(root / "float32")
    return in_float16, root / "float32"


NON_FINITE = "the model's hidden states contain NaN or inf at the output of block 0 (residual index 1)"


def test_evaluate_refuses_overflowing_float16_states(overflowing_dirs, tmp_path, corpus, capsys):
    """It scored them as a perfect lens (KL 0, precision@5 = 1)."""
    from tests.test_evaluation import eval_args

    with pytest.raises(SystemExit) as stop:
        evaluate.main(eval_args(tmp_path / "eval", overflowing_dirs[0], corpus, "--model.base.dtype", "float16",
                                "--model.methods", "[logit, token_identity]", "--model.future_offsets", "[]"))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "Traceback" not in err, err
    assert f"{NON_FINITE}; with float16 weights this is overflow: use float32 or bfloat16" in err
    assert not (tmp_path / "eval" / "results.json").exists()


@pytest.mark.parametrize("command", [
    ["show", "w3 w4 w5", "--out", "traj"],
    ["patchscope", "run", "--source.prompts", "['w3 w4 w5']", "--source.layers", "[1, 2]", "--out", "scope.json"],
    ["patchscope", "trace", "--prompt", PROMPT, "--subject", SUBJECT, "--out", "results"],
], ids=["show", "patchscope-run", "patchscope-trace"])
def test_the_commands_refuse_non_finite_states(command, overflowing_dirs, tmp_path, capsys, monkeypatch):
    """show printed <unk> in every cell."""
    monkeypatch.chdir(tmp_path)
    err = _fails([*command, "--model", str(overflowing_dirs[1])], capsys)
    assert f"{NON_FINITE}; in float32 this is not float16 overflow: check the model's weights" in err, err
    assert [p.name for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lenscope.lock"] == []


def test_the_patchscope_api_refuses_non_finite_states(overflowing_dirs):
    from lenscope.lenses.patchscope import Patchscope, Source
    from lenscope.model.frozen import FrozenModel
    from lenscope.model.residuals import HiddenStatesNotFiniteError

    model = FrozenModel.load(str(overflowing_dirs[1]))
    with pytest.raises(HiddenStatesNotFiniteError, match=r"at the output of block 0 \(residual index 1\)"):
        Patchscope(Source(["w3 w4 w5"], [1])).run(model)


def test_a_patch_that_writes_inf_is_named_as_the_cause(tiny_model_dir):
    """The model's own states are finite: the written state is what broke the pass."""
    import torch

    from lenscope.model.frozen import FrozenModel
    from lenscope.model.residuals import HiddenStatesNotFiniteError

    model = FrozenModel.load(str(tiny_model_dir))
    ids = model.tokenize("w3 w4 w5")
    one = torch.tensor([1])
    state = torch.full((1, model.d_model), math.inf)
    with pytest.raises(HiddenStatesNotFiniteError, match="the states written into it are NaN, inf or too large"):
        model.patch(ids, None, one, one, state, torch.tensor([2]))
    assert torch.isfinite(model.patch(ids, None, one, one, torch.zeros(1, model.d_model), torch.tensor([2]))).all()


# --- underdetermined least-squares fits ---------------------------------------------------------------
def test_an_underdetermined_fit_warns_with_its_numbers():
    import warnings

    import torch

    from lenscope.lenses.least_squares import NormalEquations, UnderdeterminedFitWarning

    eq = NormalEquations(num_layers=2, d_model=8)
    eq.update(torch.randn(2, 5, 8), torch.randn(5, 8))
    assert eq.underdetermined and eq.unknowns == 9
    with pytest.warns(UnderdeterminedFitWarning, match=r"on 5 positions for inputs of width 8 \(9 unknowns per output"):
        eq.solve()
    eq.update(torch.randn(2, 4, 8), torch.randn(4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnderdeterminedFitWarning)
        eq.solve()  # 9 positions for 9 unknowns: determined, no warning


def test_the_evaluation_marks_an_underdetermined_affine_fit_and_lists_it_last(tmp_path, tiny_model_dir, corpus, capsys):
    from lenscope.lenses.least_squares import UnderdeterminedFitWarning
    from tests.test_evaluation import eval_args

    with pytest.warns(UnderdeterminedFitWarning, match="on 20 positions for inputs of width 32"):
        evaluate.main(eval_args(tmp_path / "eval", tiny_model_dir, corpus, "--data.n_fit", "20",
                                "--data.fit_positions", "one", "--model.methods", "[affine, logit]",
                                "--model.future_offsets", "[]"))
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["underdetermined_fits"] == {"affine": {"positions": 20, "unknowns": 33}}
    summary = capsys.readouterr().out.split("Summary on")[1].splitlines()[1:3]
    assert summary[0].lstrip().startswith("logit") and summary[1].lstrip().startswith("affine"), summary
    assert "[an underdetermined fit (20 positions for 33 unknowns: raise --data.n_fit" in summary[1]
    assert "affine is an underdetermined fit" in (tmp_path / "eval" / "results.md").read_text()
