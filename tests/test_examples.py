"""Every script in examples/ runs, on a tiny model and a lens saved for it, and says what it claims."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

import lenscope
from lenscope.lenses.artifact import save_lens
from lenscope.lenses.lens import TunedLens

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return lenscope.load_model(str(tiny_model_dir))


def run_example(name: str, *argv: str, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *argv])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_every_example_is_tested():
    tested = {"prediction_depth.py", "steer_generation.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_prediction_depth(tmp_path, tiny_model_dir, model, monkeypatch, capsys):
    lens = TunedLens(model.layers, model.d_model)  # zero translators: the logit lens again
    folder = save_lens(lens, tmp_path / "tuned", base_model=str(tiny_model_dir), revision="local",
                       unembed_hash=model.unembed_hash, num_hidden_layers=model.num_layers)
    out = tmp_path / "depth.html"
    # A lens never opens the local folder it was trained on by itself: --model names it.
    run_example("prediction_depth.py", "--model", str(tiny_model_dir), "--lens", str(folder), "--prompt", "alpha beta gamma", "--prompt", "delta",
                "--out", str(out), monkeypatch=monkeypatch)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-2:] == ["logit", "tuned"]
    rows = lines[1:3]
    assert len(rows) == 2 and lines[3].startswith("(residual index")
    for row in rows:
        logit, tuned = row.split()[-2:]
        # A zero tuned lens is the logit lens: both settle at the same layer (or only at the output).
        assert logit == tuned and (logit == "output" or int(logit) in model.layers)
    assert out.is_file() and "plotly" in out.read_text()[:5000].lower()


def test_settles_at_reads_the_last_layers_first():
    from lenscope.lenses.trajectory import Panel

    mod = runpy.run_path(str(EXAMPLES / "prediction_depth.py"))
    top = torch.tensor([7, 7, 3, 7, 7]).view(5, 1, 1)  # output, then layers 0..3: agrees at 0, not at 1, then at 2, 3
    panel = Panel("x", 0, [0, 1, 2, 3], top, torch.ones_like(top, dtype=torch.float), {})
    assert mod["settles_at"](panel) == 2
    panel.top_ids = torch.tensor([7, 7, 7, 7, 3]).view(5, 1, 1)
    assert mod["settles_at"](panel) is None


def test_steer_generation(tmp_path, model, monkeypatch, capsys):
    import json

    task = tmp_path / "next.json"
    task.write_text(json.dumps({"pairs": [[f"w{i}", f"w{i + 50}"] for i in range(10, 40)]}))
    run_example("steer_generation.py", "--model", str(model.name), "--task", str(task), "--layer", "2",
                "--query", "w11", "--query", "w12", "--prompts", "4", "--aie-prompts", "2", "--top-heads", "3",
                "--max-new-tokens", "3", monkeypatch=monkeypatch)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("function vector of ") and lines[0].endswith("added at residual 2")
    assert lines[0].count("(") == 4  # three (block, head) pairs in a list
    assert [line.split()[1] for line in lines[1:]] == ["'w11'", "'w12'"]
    assert all("plain:" in line and "steered:" in line for line in lines[1:])
