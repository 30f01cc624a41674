"""``python -m lenscope …`` is the ``lenscope`` command."""

from lenscope.cli import main

main()
