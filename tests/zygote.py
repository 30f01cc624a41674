"""``python train.py …`` (or ``evaluate.py``) in a process of its own, without paying the imports.

Starting a fresh interpreter costs ~9 s of imports (torch, Lightning, transformers, nnsight) on the
test machine, and the command-line tests start dozens. So a "zygote" process imports those
libraries once; for each request (one JSON line on its stdin) it forks a child that becomes
``python <script> <argv>``: its own argv, working directory, environment, stdout/stderr files and
exit status, exactly as the interpreter runs a script, minus the imports. With ``session`` the
child leads a process group of its own, so that processes it starts (the other ranks of a DDP run)
are killed with it when it runs past its time. ``run`` waits for the child; ``spawn`` returns at
once with a handle (its pid, to signal it; ``poll``, ``wait``), for the tests that stop a run
midway. ``LENSCOPE_TEST_FRESH_CLI=1`` runs every request as a fresh interpreter instead (same
results; slower).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRESH = os.environ.get("LENSCOPE_TEST_FRESH_CLI") == "1"

ZYGOTE = r"""
import atexit, json, os, runpy, signal, sys, time, traceback
import torch, lightning, transformers, nnsight, zstandard, safetensors, jsonargparse  # noqa: F401
from lightning.pytorch.cli import LightningCLI  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

def start(req):
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        if req["session"]:
            os.setsid()
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            target = os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
        sys.argv = [req["script"], *req["argv"]]
        sys.path[0] = os.path.dirname(req["script"])
        try:
            runpy.run_path(req["script"], run_name="__main__")
            code = 0
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                code = exit_.code or 0
            else:
                print(exit_.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()  # what the interpreter prints for an uncaught exception
        atexit._run_exitfuncs()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)

def wait(pid, timeout, session):
    deadline = time.monotonic() + timeout
    timed_out = False
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            timed_out = True
            if session:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
            done = os.waitpid(pid, 0)
            break
        time.sleep(0.02)
    if session and not timed_out:
        try:  # nothing the run started outlives it
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return {"rc": os.waitstatus_to_exitcode(done[1]), "timed_out": timed_out}

sessions = {}
while line := sys.stdin.readline():
    req = json.loads(line)
    op = req["op"]
    if op == "run":
        reply = wait(start(req), req["timeout"], req["session"])
    elif op == "spawn":
        pid = start(req)
        sessions[pid] = req["session"]
        reply = {"pid": pid}
    elif op == "poll":
        done = os.waitpid(req["pid"], os.WNOHANG)
        reply = {"rc": None}
        if done[0]:
            reply = {"rc": os.waitstatus_to_exitcode(done[1])}
            if sessions.pop(req["pid"]):
                try:
                    os.killpg(req["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
    else:  # wait
        reply = wait(req["pid"], req["timeout"], sessions.pop(req["pid"]))
    print(json.dumps(reply), flush=True)
"""


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False


class Zygote:
    """Runs scripts as ``python <script> <argv>`` would, forked from one process that imported the
    heavy libraries once (or, with ``LENSCOPE_TEST_FRESH_CLI=1``, in fresh interpreters)."""

    def __init__(self, env: dict[str, str]):
        self.proc = None if FRESH else subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply, "the CLI zygote died"
        return json.loads(reply)

    def spawn(self, script: Path, argv: list[str], cwd: Path, env: dict[str, str], session: bool = False) -> Spawned:
        """Start ``script`` and return at once: a handle to signal (``pid``; with ``session`` it
        leads its own process group), ``poll`` and ``wait`` for."""
        cwd.mkdir(parents=True, exist_ok=True)
        out, err = cwd / ".cli-stdout", cwd / ".cli-stderr"
        if self.proc is None:
            with open(out, "w") as stdout, open(err, "w") as stderr:
                popen = subprocess.Popen([sys.executable, str(script), *argv], stdout=stdout, stderr=stderr, cwd=cwd,
                                         env=env, start_new_session=session)
            return Spawned(self, popen.pid, out, err, session, popen)
        request = {"op": "spawn", "script": str(script), "argv": [str(a) for a in argv], "cwd": str(cwd), "env": env,
                   "stdout": str(out), "stderr": str(err), "session": session}
        return Spawned(self, self._ask(request)["pid"], out, err, session)

    def run(self, script: Path, argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 300,
            session: bool = False) -> Result:
        """Run ``script`` with ``argv`` from ``cwd`` under ``env``; a run past ``timeout`` seconds
        is killed (with everything it started, given ``session``) and says so in ``timed_out``."""
        cwd.mkdir(parents=True, exist_ok=True)
        if self.proc is None:
            try:
                done = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, cwd=cwd,
                                      env=env, timeout=timeout, start_new_session=session)
            except subprocess.TimeoutExpired as err:
                return Result(-signal.SIGKILL, err.stdout or "", err.stderr or "", timed_out=True)
            return Result(done.returncode, done.stdout, done.stderr)
        out, err = cwd / ".cli-stdout", cwd / ".cli-stderr"
        request = {"op": "run", "script": str(script), "argv": [str(a) for a in argv], "cwd": str(cwd), "env": env,
                   "stdout": str(out), "stderr": str(err), "timeout": timeout, "session": session}
        answer = self._ask(request)
        return Result(answer["rc"], out.read_text(), err.read_text(errors="replace"), answer["timed_out"])

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


class Spawned:
    """A script started by ``Zygote.spawn``: ``pid`` (signal it, or its group), ``poll()`` (the exit
    status, or None while it runs), ``wait(timeout)`` (a run past it is killed, with its group)."""

    def __init__(self, zygote: Zygote, pid: int, stdout: Path, stderr: Path, session: bool,
                 popen: subprocess.Popen | None = None):
        self.zygote, self.pid, self._stdout, self._stderr, self._popen = zygote, pid, stdout, stderr, popen
        self.session = session
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._popen.poll() if self._popen else self.zygote._ask({"op": "poll", "pid": self.pid})["rc"]
        return self.returncode

    def wait(self, timeout: float = 300) -> Result:
        if self.returncode is None:
            if self._popen is not None:
                try:
                    self.returncode = self._popen.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    if self.session:
                        os.killpg(self.pid, signal.SIGKILL)
                    else:
                        self._popen.kill()
                    self.returncode = self._popen.wait()
            else:
                self.returncode = self.zygote._ask({"op": "wait", "pid": self.pid, "timeout": timeout})["rc"]
        return Result(self.returncode, self._stdout.read_text(), self._stderr.read_text(errors="replace"))

    def stderr(self) -> str:
        """What it has written to stderr so far."""
        return self._stderr.read_text(errors="replace")
