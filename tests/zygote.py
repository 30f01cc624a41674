"""``python train.py …`` (or ``evaluate.py``) in a process of its own, without paying the imports.

Starting a fresh interpreter costs ~9 s of imports (torch, Lightning, transformers, nnsight) on the
test machine, and the command-line tests start dozens. So a "zygote" process imports those
libraries once; for each request (one JSON line on its stdin) it forks a child that becomes
``python <script> <argv>``: its own argv, working directory, environment, stdout/stderr files and
exit status, exactly as the interpreter runs a script, minus the imports. With ``session`` the
child leads a process group of its own, so that processes it starts (the other ranks of a DDP run)
are killed with it when it runs past its time. ``LENSCOPE_TEST_FRESH_CLI=1`` runs every request as
a fresh interpreter instead (same results; slower).
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

while line := sys.stdin.readline():
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
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
    deadline = time.monotonic() + req["timeout"]
    timed_out = False
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            timed_out = True
            if req["session"]:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
            done = os.waitpid(pid, 0)
            break
        time.sleep(0.02)
    if req["session"] and not timed_out:
        try:  # nothing the run started outlives it
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print(json.dumps({"rc": os.waitstatus_to_exitcode(done[1]), "timed_out": timed_out}), flush=True)
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
        request = {"script": str(script), "argv": [str(a) for a in argv], "cwd": str(cwd), "env": env,
                   "stdout": str(out), "stderr": str(err), "timeout": timeout, "session": session}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply, "the CLI zygote died"
        answer = json.loads(reply)
        return Result(answer["rc"], out.read_text(), err.read_text(errors="replace"), answer["timed_out"])

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
