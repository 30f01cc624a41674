"""Writing files and folders so that a crash never leaves half of one where a reader expects it.

Everything lenscope writes (checkpoints, lens artifacts, results, cache shards, the converted
embedded model) goes through here: the data is written to a temporary name next to its target,
flushed to disk, given the permissions any file the user creates gets (``0666`` / ``0777`` minus
the umask: ``mkstemp`` and ``mkdtemp`` make ``0600`` / ``0700``, which would hide a shared run's
results from its collaborators), and renamed into place. A reader sees the old version or the new
one, never a mixture; a failed write removes its temporary and leaves the old version intact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

_umask_lock = threading.Lock()


def _umask() -> int:
    # Linux reports it without changing it; elsewhere it can only be read by setting it (under a
    # lock, restored at once: another thread creating a file in between would get 022).
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a new file under the current umask (``0644`` under the usual ``022``)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """Permissions of a new folder under the current umask (``0755`` under the usual ``022``)."""
    return 0o777 & ~_umask()


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: not every filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp", durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; once the block has written it, publish it as ``path``.

    For writers that want a file name (``safetensors.save_file``, ``torch.save``). If the block
    raises, the temporary is removed and ``path`` is left as it was. ``durable=False`` skips the
    flush to disk, for files that are rebuilt if lost (cache shards): still never half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` atomically. Returns the path."""
    payload = data.encode() if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; once the block has filled it, it replaces
    ``path`` (an earlier folder there stays complete until then). If the block raises, the
    temporary folder is removed and ``path`` is left as it was.

    ``replace=False``: if ``path`` appeared meanwhile (another process made the same folder),
    keep that one and discard this.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb+") as f:
                    os.fsync(f.fileno())
                os.chmod(child, file_mode())
        os.chmod(tmp, dir_mode())
        if path.exists() and not replace:
            return
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, path)
            except OSError:
                if replace or not path.exists():
                    raise  # (another process made the same folder meanwhile: keep theirs)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
