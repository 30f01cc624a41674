"""``python evaluate.py --config configs/eval/patchscopes.yaml``: the same as ``lenscope evaluate --config …``.

The command line lives in ``lenscope/cli/evaluate.py``; this file keeps the checkout's usual entry point.
"""

from lenscope.cli.evaluate import main

if __name__ == "__main__":
    main()
