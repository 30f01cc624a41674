"""Where documents come from: local ``.jsonl`` / ``.jsonl.zst`` files, a hub dataset, or the demo corpus.

Every source yields document texts in a fixed order, so that a seeded pipeline on top of it is
reproducible. Bad records are handled as follows (documented in the README):

* empty or whitespace-only text: skipped and counted (the Pile has such records; they carry no
  signal);
* a record that is not a JSON object, has no text field, or whose text is not a string; a line that
  is not valid UTF-8 or not valid JSON: by default the run stops with a one-line error naming the
  file and line (it usually means the wrong file or the wrong ``text_field``);
  with ``on_bad_record="skip"`` such records are skipped and counted instead;
* a ``.zst`` file that is truncated or corrupt: the run stops with an error naming the file, since
  everything after the damage is lost and the corpus is not what the user thinks it is.
"""

from __future__ import annotations

import glob
import gzip
import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from lenscope.errors import UserError

log = logging.getLogger(__name__)

DEMO_SOURCE = "demo"
HUB_PREFIX = "hub:"


class DataSourceError(UserError):
    """The data source is missing, empty or damaged; the message names the file and the fix."""


@dataclass
class SkipCounter:
    """Counts of skipped records by reason, shared by everything that reads one source."""

    counts: Counter = field(default_factory=Counter)

    def add(self, reason: str) -> None:
        self.counts[reason] += 1

    def total(self) -> int:
        return sum(self.counts.values())


def demo_documents() -> list[str]:
    """The embedded demo corpus: the Python interpreter's own help texts (``pydoc_data.topics``).

    It ships with every CPython, needs no download, and is real English technical prose with code.
    It is a *demo* corpus, not a research one. Each help topic is split at blank lines into
    paragraphs, grouped into documents of about 1,500 characters.
    """
    from pydoc_data.topics import topics

    docs: list[str] = []
    for key in sorted(topics):
        current = ""
        for para in topics[key].split("\n\n"):
            para = para.strip("\n")
            if not para.strip():
                continue
            current = f"{current}\n\n{para}" if current else para
            if len(current) >= 1500:
                docs.append(current)
                current = ""
        if current.strip():
            docs.append(current)
    return docs


JSON_SUFFIXES = (".jsonl", ".json")
COMPRESSED = (".zst", ".gz")
READABLE = tuple(base + c for base in JSON_SUFFIXES for c in ("", *COMPRESSED))
"""Files lenscope reads: JSON lines or a JSON array of records, plain, zstd- or gzip-compressed."""

_OTHER_FORMATS = {
    ".csv": "a CSV file", ".tsv": "a TSV file", ".parquet": "a Parquet file", ".arrow": "an Arrow file",
    ".txt": "a plain-text file", ".md": "a Markdown file", ".tar": "a tar archive", ".zip": "a zip archive",
}
_CONVERT = ("lenscope reads JSON lines, one {\"text\": ...} object per document per line (plain, .zst or .gz), "
            "or a JSON array of such objects")


def _readable(path: Path) -> bool:
    return path.name.endswith(READABLE)


def _refuse_other_format(path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix in _OTHER_FORMATS:
        hint = ""
        if suffix in (".csv", ".tsv", ".parquet"):
            reader = "read_parquet" if suffix == ".parquet" else "read_csv"
            sep = ", sep='\\t'" if suffix == ".tsv" else ""
            hint = (f"; convert it, e.g. pandas.{reader}('{path.name}'{sep}).to_json('{path.stem}.jsonl', "
                    "orient='records', lines=True), and set --data.text_field to its text column")
        raise DataSourceError(f"{path} is {_OTHER_FORMATS[suffix]}; {_CONVERT}{hint}")


def resolve_files(pattern: str) -> list[Path]:
    """Files named by a path, a folder (its JSON files, see ``READABLE``) or a glob, sorted."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        every = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
        files = sorted(p for p in every if _readable(p))
        if not files:
            kinds = Counter("".join(p.suffixes[-2:]) or "(no extension)" for p in every)
            held = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common(5)) or "nothing"
            raise DataSourceError(f"folder {pattern!r} holds no JSON files (it has {held}); {_CONVERT}")
        return files
    if any(ch in pattern for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(p).is_file())
    else:
        files = [path] if path.exists() else []
    if not files:
        raise DataSourceError(f"no data found at {pattern!r}; pass an existing JSON-lines file (.jsonl, .json; plain, .zst or .gz), folder or glob as --data.source")
    for file in files:
        _refuse_other_format(file)
    return files


def _open_lines(path: Path) -> Iterator[bytes]:
    if path.name.endswith(".zst"):
        yield from _zst_lines(path)
    elif path.name.endswith(".gz"):
        yield from _gzip_lines(path)
    else:
        with open(path, "rb") as f:
            yield from f


def _gzip_lines(path: Path) -> Iterator[bytes]:
    """Lines of a gzip file, refusing one that is cut short or not gzip."""
    try:
        with gzip.open(path, "rb") as f:
            yield from f
    except gzip.BadGzipFile:
        raise DataSourceError(f"{path} is not a valid gzip file; re-download or re-compress it") from None
    except EOFError:
        raise DataSourceError(f"{path} is truncated (its gzip stream ends early); re-download or re-compress it") from None


def _zst_lines(path: Path) -> Iterator[bytes]:
    """Lines of a (multi-frame) zstd file, refusing a file cut short.

    zstandard's ``stream_reader`` ends quietly at a truncated frame, which would silently shorten
    the corpus, so frames are decoded one by one and the last one must be complete.
    """
    dctx = zstandard.ZstdDecompressor()
    frame = dctx.decompressobj()
    in_frame = False
    pending = b""
    try:
        with open(path, "rb") as raw:
            for chunk in iter(lambda: raw.read(1 << 20), b""):
                while chunk:
                    in_frame = True
                    pending += frame.decompress(chunk)
                    chunk = b""
                    if frame.eof:
                        chunk, frame, in_frame = frame.unused_data, dctx.decompressobj(), False
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line + b"\n"
    except zstandard.ZstdError as err:
        raise DataSourceError(f"{path} is not a valid zstd file ({err}); re-download or re-compress it") from None
    if in_frame:
        raise DataSourceError(f"{path} is truncated (its last zstd frame is incomplete); re-download or re-compress it")
    if pending:
        yield pending


def iter_jsonl(path: Path, text_field: str, skipped: SkipCounter, on_bad_record: str = "error") -> Iterator[str]:
    """Texts of one JSON file: JSON lines, or a JSON array of records (plain or compressed)."""

    def bad(where: str, what: str) -> None:
        if on_bad_record == "skip":
            skipped.add(what)
            return
        raise DataSourceError(
            f"{path}:{where}: {what}; fix the file, set --data.text_field, or pass --data.on_bad_record skip"
        )

    lines = _open_lines(path)
    first, blank = b"", 0
    for first in lines:
        if first.strip():
            break
        blank += 1
    if first.lstrip().startswith((b"[", b"\xef\xbb\xbf[")):
        records = _array(path, b"".join([first, *lines]))
        located = ((f"record {i}", record) for i, record in enumerate(records))
    else:
        located = _json_lines(itertools.chain([first], lines), bad, first_lineno=blank + 1)
    for where, record in located:
        text = _text_of(record, text_field, skipped, lambda what, where=where: bad(where, what))
        if text is not None:
            yield text


def _json_lines(lines: Iterator[bytes], bad, first_lineno: int = 1) -> Iterator[tuple[str, object]]:
    """(line number, parsed record) of each non-blank line; undecodable lines reported through ``bad``."""
    for lineno, raw in enumerate(lines, start=first_lineno):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8-sig" if lineno == first_lineno else "utf-8")  # tolerate a byte-order mark
        except UnicodeDecodeError:
            bad(str(lineno), "line is not valid UTF-8")
            continue
        try:
            yield str(lineno), json.loads(line)
        except json.JSONDecodeError:
            bad(str(lineno), "line is not valid JSON")


def _array(path: Path, data: bytes) -> list:
    """The records of a file holding one JSON array (read whole: such a file cannot be streamed)."""
    try:
        records = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = "not valid UTF-8" if isinstance(err, UnicodeDecodeError) else f"not valid JSON ({err.msg}, line {err.lineno})"
        raise DataSourceError(f"{path} starts like a JSON array but is {reason}; fix the file") from None
    if not isinstance(records, list):
        raise DataSourceError(f"{path} holds a JSON {type(records).__name__}, not an array of records; {_CONVERT}")
    return records


def _text_of(record, text_field: str, skipped: SkipCounter, bad) -> str | None:
    """The text of one record, or None: bad records are reported through ``bad``, empty texts counted."""
    if not isinstance(record, dict):
        bad("record is not a JSON object")
    elif text_field not in record:
        bad(f"record has no {text_field!r} field")
    elif not isinstance(record[text_field], str):
        bad(f"{text_field!r} is a {type(record[text_field]).__name__}, not a string")
    elif not record[text_field].strip():
        skipped.add("empty text")
    else:
        return record[text_field]
    return None


def iter_hub(name: str, split: str, text_field: str, skipped: SkipCounter) -> Iterator[str]:
    """Stream a hub dataset with 🤗 datasets (never downloaded whole)."""
    import datasets

    repo, _, config = name.partition(":")
    try:
        stream = datasets.load_dataset(repo, config or None, split=split, streaming=True)
    except Exception as err:  # datasets raises many types; all mean "cannot open this dataset"
        raise DataSourceError(f"could not open hub dataset {repo!r} split {split!r}: {str(err).splitlines()[0]}") from None
    for record in stream:
        text = record.get(text_field)
        if not isinstance(text, str) or not text.strip():
            skipped.add("empty or missing text")
            continue
        yield text


@dataclass
class DocumentSource:
    """A reproducible stream of document texts.

    ``source``: a path, folder or glob of ``.jsonl``/``.jsonl.zst`` files; ``demo`` for the embedded
    demo corpus; or ``hub:<dataset id>[:<config>]`` for a hub dataset streamed with 🤗 datasets.
    """

    source: str
    text_field: str = "text"
    split: str = "train"
    on_bad_record: str = "error"

    def __post_init__(self) -> None:
        if self.on_bad_record not in ("error", "skip"):
            raise DataSourceError(f"--data.on_bad_record must be 'error' or 'skip', got {self.on_bad_record!r}")
        self.skipped = SkipCounter()

    def check(self) -> None:
        """Fail early, in the main process, if a local source does not exist."""
        if self.source != DEMO_SOURCE and not self.source.startswith(HUB_PREFIX):
            resolve_files(self.source)

    def describe(self) -> dict:
        """Identity of the data for cache keys: the source and, for files, their sizes and mtimes."""
        info: dict = {"source": self.source, "text_field": self.text_field, "split": self.split}
        if self.source != DEMO_SOURCE and not self.source.startswith(HUB_PREFIX):
            info["files"] = [[str(p.resolve()), p.stat().st_size, int(p.stat().st_mtime)] for p in resolve_files(self.source)]
        return info

    def __iter__(self) -> Iterator[str]:
        if self.source == DEMO_SOURCE:
            yield from demo_documents()
        elif self.source.startswith(HUB_PREFIX):
            yield from iter_hub(self.source[len(HUB_PREFIX):], self.split, self.text_field, self.skipped)
        else:
            for path in resolve_files(self.source):
                yield from iter_jsonl(path, self.text_field, self.skipped, self.on_bad_record)
