"""``lenscope tutorial``: the Patchscopes tutorial as a web app in the browser (Streamlit).

    lenscope tutorial                                   # the embedded model, http://localhost:8501
    lenscope tutorial --model EleutherAI/pythia-160m --lens artifacts/pythia/tuned --port 8600
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "tutorial" / "app.py"


def command(args: argparse.Namespace) -> list[str]:
    """The ``streamlit run`` command line that serves the app with these settings."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(args.port),
           "--server.address", args.address, "--server.headless", "true" if args.headless else "false",
           "--browser.gatherUsageStats", "false", "--"]
    if args.model:
        cmd += ["--model", args.model]
    if args.lens:
        cmd += ["--lens", args.lens]
    return cmd


def main(argv: list[str] | None = None, prog: str = "lenscope tutorial") -> None:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].replace("``", "`"))
    p.add_argument("--model", default=None, help="hub id, folder or embedded:smollm2-135m (the sidebar's default)")
    p.add_argument("--lens", default=None, help="a lens folder or Hub lens shown beside the logit lens")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--address", default="localhost", help="where to listen (0.0.0.0: every interface)")
    p.add_argument("--headless", action="store_true", help="do not open a browser")
    try:
        args = p.parse_args(argv)
    except SystemExit as stop:
        raise SystemExit(2 if stop.code else 0) from None
    try:
        import streamlit  # noqa: F401
    except ImportError:
        print("error: the tutorial needs streamlit: pip install streamlit", file=sys.stderr)
        raise SystemExit(2) from None
    cmd = command(args)
    # Become the server (no child process): stopping `lenscope tutorial` stops Streamlit with it.
    os.execv(cmd[0], cmd)
