"""Writing files and folders so that a crash never leaves half of one where a reader expects it.

Everything lenscope writes (checkpoints, lens artifacts, results, cache shards, the converted
embedded model) goes through here: the data is written to a temporary name next to its target,
flushed to disk, given the permissions any file the user creates gets (``0666`` / ``0777`` minus
the umask: ``mkstemp`` and ``mkdtemp`` make ``0600`` / ``0700``, which would hide a shared run's
results from its collaborators), and renamed into place. A reader sees the old version or the new
one, never a mixture; a failed write removes its temporary and leaves the old version intact.

A folder is replaced in two renames (the old one aside as ``.NAME.old-WRITER``, the new one
``.NAME.tmp-WRITER-…`` into place, WRITER being ``PID@HOST+START``): a process killed between them
leaves no folder at the path, and the next write or load of it (``recover_dir``), once its writer
is dead, puts the new one in place (the old one is moved aside only once the new one is complete)
and removes what dead writers left; one line says what it recovered. A pid alone does not name a
process (a container's restarted writer gets the same pid, and pids are reused): START, when the
process started (Linux's ``/proc``), tells the writer from a later process under its pid. Only
this host's writers can be known dead: another host's leftovers (a shared filesystem) are left
alone.

A full disk, a full quota or a file-size limit (``ulimit -f``) is one line (``WriteError``) naming
the file, the limit and the fix, whichever library was writing (torch says only "enforce fail at
inline_container.cc").
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import resource
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from lenscope.errors import UserError

log = logging.getLogger(__name__)

_umask_lock = threading.Lock()

HOLD_ENV = "LENSCOPE_TEST_HOLD_FOLDER_REPLACE_AT"
"""Test hook: a point of ``atomic_dir``'s replace (``filled``: the new folder complete beside the old;
``moved-aside``: the old folder renamed aside, the new one not yet in place; ``replaced``: the new
one in place, the old one not yet removed). There, create ``.NAME.held-POINT`` beside the folder and
wait forever, so that a test can kill the process at exactly that moment (no timing involved)."""


class WriteError(UserError, OSError):
    """A file could not be written for lack of room (disk, quota, file-size limit); the message names
    the file, the limit and the fix. An ``OSError`` too, with the original ``errno``."""

    def __init__(self, code: int, message: str):
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


_NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# torch's zip writer reports a failed write without its cause: "[enforce fail at
# inline_container.cc:…] . PytorchStreamWriter failed writing file …" (safetensors quotes the
# system's message, "No space left on device").
_TORCH_WRITE_FAILED = ("enforce fail at inline_container", "PytorchStreamWriter failed")


def _no_room(err: BaseException) -> int | None:
    """The errno of a write that failed for lack of room (ENOSPC, EFBIG, EDQUOT), else None; 0 when
    the library did not say which (torch)."""
    if isinstance(err, WriteError) or not isinstance(err, Exception):
        return None  # already said (a nested write), or not a failed write (an interrupt)
    if getattr(err, "errno", None) in _NO_ROOM_ERRNOS:
        return err.errno
    text = str(err)
    code = next((code for code in _NO_ROOM_ERRNOS if os.strerror(code) in text), None)
    if code is None and any(marker in text for marker in _TORCH_WRITE_FAILED):
        return 0
    return code


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _file_size_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _write_error(path: Path, code: int) -> WriteError:
    """One line: which file, which limit, the fix; the earlier version is intact (atomic writes)."""
    limit = _file_size_limit()
    try:
        free = f"{_size(shutil.disk_usage(path.parent).free)} free there"
    except OSError:
        free = "its free space unknown"
    if code == errno.EFBIG or (code == 0 and limit is not None):
        what = (f"the file-size limit (ulimit -f: {_size(limit)}) was reached" if limit is not None
                else "the file is larger than this filesystem allows")
        fix = "raise the limit (ulimit -f unlimited) or write to another filesystem"
    elif code == errno.EDQUOT:
        what, fix = f"the disk quota is exceeded ({free})", "free space within your quota or write elsewhere"
    else:
        what, fix = f"the disk is full ({free})", "free space or write to another disk"
    return WriteError(code or errno.ENOSPC, f"could not write {path}: {what}; {fix} (the earlier version, if any, "
                                            "is intact)")


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
def _said_when_no_room(path: Path) -> Iterator[None]:
    """Around a whole write to ``path`` (the temporary's creation included: a full disk can refuse
    even an empty file): a lack of room, whichever library met it, becomes ``WriteError``."""
    try:
        yield
    except Exception as err:
        if (code := _no_room(err)) is not None:
            raise _write_error(path, code) from None
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp", durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; once the block has written it, publish it as ``path``.

    For writers that want a file name (``safetensors.save_file``, ``torch.save``). If the block
    raises, the temporary is removed and ``path`` is left as it was. ``durable=False`` skips the
    flush to disk, for files that are rebuilt if lost (cache shards): still never half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _said_when_no_room(path):
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


def _hold_for_test(path: Path, point: str) -> None:
    if os.environ.get(HOLD_ENV) == point:
        path.with_name(f".{path.name}.held-{point}").touch()
        while True:
            time.sleep(1)


def _process(pid: int) -> tuple[str, int] | None:
    """(state, start) of process ``pid``: its state letter (``Z`` a zombie: dead, not yet reaped by
    its parent) and when it started, in clock ticks since boot (fields 3 and 22 of Linux's
    ``/proc/PID/stat``, counted after the command name, which may hold spaces); None where that
    cannot be read (no such process, another system)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _writer() -> str:
    """``PID@HOST+START`` of this process (``PID@HOST`` where its start time cannot be read), in the
    names of the folders it leaves beside the one it replaces."""
    # Read as recover_dir reads it (/proc/PID, not /proc/self), so that the two always agree.
    process = _process(os.getpid())
    return f"{os.getpid()}@{socket.gethostname()}" + ("" if process is None else f"+{process[1]}")


def _writer_is_dead(pid: int, host: str | None, started: int | None) -> bool:
    """Whether the writer of a leftover is known dead: a process of this host (``host`` None: a
    leftover of an older lenscope, which named no host) that no longer runs (or is a zombie), or
    whose pid another process now holds (one that started at another time than ``started``, the
    writer's start)."""
    if host not in (None, socket.gethostname()):
        return False  # another machine's process: it may be running
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # a process runs under that pid, another user's
    now = _process(pid)  # (unknown for a leftover that names no start: then the writer may be alive)
    return now is not None and (now[0] in ("Z", "X") or (started is not None and now[1] != started))


def recover_dir(path: str | Path) -> str | None:
    """Finish or undo what a killed ``atomic_dir`` left beside ``path``. With no folder at ``path``,
    a dead writer's old folder moved aside (``.NAME.old-WRITER``) means that its new one
    (``.NAME.tmp-WRITER-…``) was complete, as the old one is moved aside only then: the new one goes
    in place, as the writer meant (the old one goes back when the new one is not there). The other
    folders of dead writers are removed; those of live writers are left alone. Says (logs) in one
    line what it recovered, and returns that line (None: nothing to recover)."""
    path = Path(path)
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return None
    old: dict[str, Path] = {}  # by writer: the dead writers' folders
    new: dict[str, list[Path]] = {}
    for entry in entries:
        # .NAME.old-WRITER or .NAME.tmp-WRITER-RANDOM (mkdtemp's suffix has no '-'), WRITER being
        # PID[@HOST[+START]] (a host name holds no '+')
        writer = r"((\d+)(?:@([^+]+?)(?:\+(\d+))?)?)"
        is_tmp = entry.name.startswith(f".{path.name}.tmp-")
        match = re.fullmatch(rf"\.{re.escape(path.name)}\." + (rf"tmp-{writer}-\w+" if is_tmp else rf"old-{writer}"),
                             entry.name)
        if match and entry.is_dir() and _writer_is_dead(int(match[2]), match[3], match[4] and int(match[4])):
            if is_tmp:
                new.setdefault(match[1], []).append(entry)
            else:
                old[match[1]] = entry
    done = []
    for writer, aside in sorted(old.items()):
        pid = writer.partition("@")[0]
        complete = new.pop(writer, [])
        if not path.exists() and len(complete) == 1:
            with contextlib.suppress(OSError):  # (another process restored or wrote it meanwhile)
                os.rename(complete[0], path)
                done.append(f"put in place the complete new folder that the killed process {pid} was replacing it with")
                complete = []
        if not path.exists():
            with contextlib.suppress(OSError):
                os.rename(aside, path)
                done.append(f"put back the folder that the killed process {pid} had moved aside to replace it")
        new.setdefault(writer, []).extend(complete)
        if aside.exists():
            shutil.rmtree(aside, ignore_errors=True)
            if not aside.exists():
                done.append(f"removed the replaced old folder {aside.name} of the killed process {pid}")
    for writer, unfinished in sorted(new.items()):
        for entry in sorted(unfinished):
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                done.append(f"removed the unfinished new folder {entry.name} of the killed process "
                            f"{writer.partition('@')[0]}")
    if not done:
        return None
    _fsync_dir(path.parent)
    line = f"recovered {path}: " + "; ".join(done)
    log.warning(line)
    return line


@contextlib.contextmanager
def atomic_dir(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; once the block has filled it, it replaces
    ``path`` (an earlier folder there stays complete until then). If the block raises, the
    temporary folder is removed and ``path`` is left as it was. What a killed earlier replace left
    is recovered first (``recover_dir``).

    ``replace=False``: if ``path`` appeared meanwhile (another process made the same folder),
    keep that one and discard this.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    with _said_when_no_room(path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{_writer()}-", dir=path.parent))
        try:
            yield tmp
            for child in tmp.iterdir():
                if child.is_file():
                    with open(child, "rb+") as f:
                        os.fsync(f.fileno())
                    os.chmod(child, file_mode())
            os.chmod(tmp, dir_mode())
            _fsync_dir(tmp)  # complete on disk before the old folder is moved aside (recover_dir relies on it)
            _hold_for_test(path, "filled")
            if path.exists() and not replace:
                return
            if path.exists():
                # Two renames (POSIX has no portable exchange): killed between them, the path is
                # empty until the next write or load of it puts the new folder in place (recover_dir).
                old = path.with_name(f".{path.name}.old-{_writer()}")
                os.rename(path, old)
                _hold_for_test(path, "moved-aside")
                try:
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(old, path)
                    raise
                _hold_for_test(path, "replaced")
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
