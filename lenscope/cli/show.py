"""``lenscope show "The capital of France is" --lens artifacts/quickstart/tuned``: what every layer
predicts at every token, beside the logit lens, as a terminal table, an interactive HTML page and a
PNG (see ``lenscope.lenses.trajectory``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lenscope.cli.errors import run_with_clean_errors
from lenscope.cli.outputs import claim_outputs
from lenscope.errors import ConfigError
from lenscope.lenses.trajectory import STATISTICS

TOKEN_IDENTITY = "token_identity"


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].replace("``", "`"))
    p.add_argument("text", help="the prompt")
    p.add_argument("--lens", action="append", default=[], metavar="LENS",
                   help="a lens folder (lenscope or tuned-lens format), a Hub lens, hub:owner/repo[@rev][:folder], or "
                        "token_identity (the token-identity patchscope); repeat for several, side by side; "
                        "without one, the logit lens alone")
    p.add_argument("--model", default=None,
                   help="hub id, folder or embedded:smollm2-135m (default: the model the first lens was trained on, "
                        "when that is a hub id or the embedded model; a lens trained on a local folder needs --model)")
    p.add_argument("--stat", default="entropy", choices=list(STATISTICS), help="what the colour shows")
    p.add_argument("--k", type=int, default=5, help="top tokens kept per cell (shown on hover)")
    p.add_argument("--out", default="trajectory", help="writes OUT.html and OUT.png")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT.html and OUT.png if they exist (without it, the command refuses before any work)")
    p.add_argument("--no-logit", action="store_true", help="leave out the logit lens baseline")
    return p


def main(argv: list[str] | None = None, prog: str = "lenscope show") -> None:
    p = parser(prog)
    try:
        args = p.parse_args(argv)
    except SystemExit as stop:  # argparse has printed its usage and one line
        raise SystemExit(2 if stop.code else 0) from None
    run_with_clean_errors(lambda: show(args), where="while showing; each file it writes is whole or absent")


def show(args: argparse.Namespace) -> None:
    from lenscope.lenses.artifact import load_lens, model_named_by
    from lenscope.lenses.lens import LogitLens
    from lenscope.lenses.token_identity import TokenIdentityLens
    from lenscope.lenses.trajectory import Trajectory
    from lenscope.model.frozen import FrozenModel

    out = Path(args.out)
    # A folder (`--out results/`) would get results.html beside it, not in it.
    if out.name in ("", ".", "..") or args.out.endswith(("/", os.sep)) or out.is_dir():
        raise ConfigError(f"--out {args.out!r} names a folder; give a file name without extension, e.g. --out traj")
    page_path, picture_path = out.with_name(out.name + ".html"), out.with_name(out.name + ".png")
    claim_outputs(out.parent, [page_path.name, picture_path.name], "--out", args.overwrite, overwrite_flag="--overwrite")
    name = args.model
    folders = [path for path in args.lens if path != TOKEN_IDENTITY]
    if name is None and folders:
        name = model_named_by(folders[0])  # a Hub id or embedded model; a lens's local path is refused
    if not name:
        raise ConfigError("no model to run: pass --model (a hub id, a folder or embedded:smollm2-135m) or a --lens")
    model = FrozenModel.load(name)
    lenses = [TokenIdentityLens.for_model(model) if path == TOKEN_IDENTITY else load_lens(path, model)
              for path in args.lens]
    if not args.no_logit or not lenses:
        lenses.insert(0, LogitLens(model.layers, model.d_model))
    trajectory = Trajectory.of(model, args.text, lenses, args.k)
    page = trajectory.to_html(page_path, args.stat)
    picture = trajectory.to_png(picture_path, args.stat)
    print(trajectory)
    print(f"Interactive: {page}\nPicture:     {picture}  (colour: {STATISTICS[args.stat]})")
