"""Before a command does any work: it can write its outputs, no other run is writing them now, and
it will not silently replace an earlier run's results. ``train.py`` and ``evaluate.py`` follow the
same rule (``lenscope.training.preflight``); the patchscope, steering and ``show`` commands claim
their outputs here, so a mistake costs a second, not an experiment."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from lenscope.training.preflight import OutputError, check_writable, lock_folders


def claim_outputs(folder: str | Path, names: Iterable[str], flag: str, overwrite: bool,
                  overwrite_flag: str = "--overwrite true") -> None:
    """Claim the files a command will write into ``folder``: ``names`` are their names, or glob
    patterns for the ones named after their contents (``heatmap_*.png``).

    The folder must be writable; it is then locked for this run (``lock_folders``: released when
    the command ends, however it ends), and only then searched for earlier results, so that of two
    runs started at once the second stops at the lock instead of both finding the folder empty.
    Any of the files already there is refused unless ``overwrite``; a folder where a file will be
    written is refused always (the write would fail only after the work)."""
    folder = Path(folder)
    check_writable(folder, flag)
    lock_folders({folder: flag})
    names = list(names)
    blocking = [name for name in names if not _is_pattern(name) and (folder / name).is_dir()]
    if blocking:
        raise OutputError(f"{folder / blocking[0]} is a folder, where a result file would be written; "
                          f"remove it or pass another {flag}")
    if overwrite:
        return
    found = sorted({path.name for name in names for path in folder.glob(name) if path.is_file()})
    if found:
        shown = ", ".join(found[:4]) + (", …" if len(found) > 4 else "")
        raise OutputError(f"{folder} already holds an earlier run's results ({shown}); pass {overwrite_flag} "
                          f"to replace them, or another {flag}")


def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")
