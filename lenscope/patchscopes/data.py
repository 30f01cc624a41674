"""Reading the JSON data files of the experiments: the ones lenscope ships (``lenscope/data/``)
or a user's file of the same shape, with one-line errors for a missing or unreadable file."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from lenscope.errors import ConfigError


def shipped(name: str) -> Path:
    """A data file lenscope ships: ``lenscope/data/<name>``."""
    return Path(str(resources.files("lenscope") / "data" / name))


def read_json(path: str | Path | None, default: str, what: str) -> tuple[Path, object]:
    """(the path read, its parsed JSON): ``path``, or the shipped file ``default`` when None.
    ``what`` names the file in errors ("fact set")."""
    path = Path(path) if path is not None else shipped(default)
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist; pass an existing JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {path} is not valid JSON ({err}); fix the file") from None
