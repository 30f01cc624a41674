"""Every shipped config parses against the current command lines (a renamed option fails here, not
in a user's hour-long run)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lenscope.cli import evaluate, patchscope, steer, train

ROOT = Path(__file__).resolve().parents[1]
TRAIN = sorted(p for p in (ROOT / "configs").glob("*.yaml"))
EVAL = sorted((ROOT / "configs" / "eval").glob("*.yaml"))
EXPERIMENTS = sorted([*(ROOT / "configs" / "patchscopes").glob("*.yaml"), *(ROOT / "configs" / "steering").glob("*.yaml")])


def printed_config(main, args: list[str], capsys) -> str:
    """The config a command line would run with (``--print_config`` prints it and exits 0)."""
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    return capsys.readouterr().out


@pytest.mark.parametrize("config", TRAIN, ids=[p.name for p in TRAIN])
def test_training_config_parses(config, capsys):
    assert "lens_type:" in printed_config(train.main, ["fit", "--config", str(config)], capsys)


@pytest.mark.parametrize("config", EVAL, ids=[p.name for p in EVAL])
def test_evaluation_config_parses(config, capsys):
    assert "methods:" in printed_config(evaluate.main, ["--config", str(config)], capsys)


def test_there_are_configs_to_check():
    assert {p.name for p in TRAIN} >= {"quickstart.yaml", "future.yaml", "pile.yaml"}
    assert {p.name for p in EVAL} >= {"patchscopes.yaml"}


@pytest.mark.parametrize("config", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_experiment_config_parses_with_the_command_its_header_names(config, capsys):
    command = re.search(r"^#\s+lenscope (patchscope \w+|steer) --config", config.read_text(), re.M)
    assert command, f"{config.name} must say in its header which command runs it"
    words = command.group(1).split()
    if words[0] == "steer":
        assert "n_top_heads:" in printed_config(steer.main, ["--config", str(config)], capsys)
    else:
        assert "model:" in printed_config(patchscope.main, [words[1], "--config", str(config)], capsys)
