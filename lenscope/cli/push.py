"""``lenscope push artifacts/quickstart/tuned me/smollm2-lenses --path-in-repo tuned``: upload a lens
artifact to the Hugging Face Hub with a generated model card (see ``lenscope.lenses.hub``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lenscope.cli.errors import run_with_clean_errors


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].replace("``", "`"))
    p.add_argument("folder", help="the lens artifact folder (what `lenscope train` writes)")
    p.add_argument("repo_id", help="the Hub repository, owner/name (a model repo; created if missing)")
    p.add_argument("--path-in-repo", default="", help="the folder inside the repository (default: its root)")
    p.add_argument("--revision", default=None, help="the branch to commit to (default: main)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--card", metavar="FILE", default=None,
                   help="write the model card to FILE and upload nothing (to read it first)")
    return p


def main(argv: list[str] | None = None, prog: str = "lenscope push") -> None:
    p = parser(prog)
    try:
        args = p.parse_args(argv)
    except SystemExit as stop:
        raise SystemExit(2 if stop.code else 0) from None
    run_with_clean_errors(lambda: push(args), where="while pushing; nothing local is changed")


def push(args: argparse.Namespace) -> None:
    from lenscope.files import atomic_write
    from lenscope.lenses.hub import model_card, push_lens

    if args.card:
        atomic_write(Path(args.card), model_card(args.folder, args.repo_id, args.path_in_repo.strip("/")))
        print(f"model card: {args.card}")
        return
    url = push_lens(args.folder, args.repo_id, path_in_repo=args.path_in_repo, revision=args.revision,
                    private=args.private or None)
    print(f"pushed {args.folder} to {url}")
