"""Evaluate lenses as patchscope mappings (logit lens, tuned lens, future lens, token identity).

Not implemented yet: the Patchscopes evaluation is the next issue. Until then, training reports the
held-out per-layer KL and cross-entropy of the logit and tuned lenses (``results.json`` next to the
lens artifact, and W&B).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("error: evaluate.py is not implemented yet; train.py writes held-out per-layer results "
          "next to the lens artifact (results.json)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
