"""``python train.py fit --config configs/quickstart.yaml``: the same as ``lenscope train --config …``.

The command line lives in ``lenscope/cli/train.py``; this file keeps the checkout's usual entry point.
"""

try:
    from lenscope.cli.train import main
except ModuleNotFoundError as err:  # a checkout used without installing it
    if not (err.name or "").startswith("lenscope"):
        raise
    raise SystemExit(f"error: {err.name} cannot be imported: install this checkout first, "
                     "`pip install -e .` (or `make install`)") from None

if __name__ == "__main__":
    from lenscope.cli import run_as_command

    run_as_command(main)
