"""``python evaluate.py --config configs/eval/patchscopes.yaml``: the same as ``lenscope evaluate --config …``.

The command line lives in ``lenscope/cli/evaluate.py``; this file keeps the checkout's usual entry point.
"""

try:
    from lenscope.cli.evaluate import main
except ModuleNotFoundError as err:  # a checkout used without installing it
    if not (err.name or "").startswith("lenscope"):
        raise
    raise SystemExit(f"error: {err.name} cannot be imported: install this checkout first, "
                     "`pip install -e .` (or `make install`)") from None

if __name__ == "__main__":
    from lenscope.cli import run_as_command

    run_as_command(main)
