"""``python train.py fit --config configs/quickstart.yaml``: the same as ``lenscope train --config …``.

The command line lives in ``lenscope/cli/train.py``; this file keeps the checkout's usual entry point.
"""

from lenscope.cli.train import main

if __name__ == "__main__":
    main()
