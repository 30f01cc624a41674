"""Read the summary of an offline W&B run from its ``run-<id>.wandb`` log.

Since wandb's Go core (0.19+), an offline run keeps its summary only inside the binary log; the
``files/wandb-summary.json`` of earlier versions is written only once a run is synced. Researchers
(and our tests) want to read a finished offline run without syncing it, so after each run we write
that file ourselves from the log.

The log is LevelDB's log format (32 KiB blocks of checksummed records, each FULL or split into
FIRST/MIDDLE/LAST pieces) behind a 7-byte ``:W&B`` header; each record is a ``wandb_internal``
protobuf ``Record``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

_HEADER = 7
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run log")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk


def offline_run_summary(run_dir: str | Path) -> dict:
    """The summary (last value of every logged key) of the offline run in ``run_dir``."""
    from wandb.proto import wandb_internal_pb2 as pb

    run_dir = Path(run_dir)
    logs = sorted(run_dir.glob("run-*.wandb"))
    if not logs:
        raise FileNotFoundError(f"no run-*.wandb log in {run_dir}")
    summary: dict = {}
    for raw in _records(logs[0]):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary


def write_summary_file(run_dir: str | Path) -> Path:
    """Write ``files/wandb-summary.json`` of an offline run (if wandb did not) and return its path."""
    path = Path(run_dir) / "files" / "wandb-summary.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(offline_run_summary(run_dir), indent=2, default=str) + "\n")
    return path
