"""``python -m lenscope …`` is the ``lenscope`` command (and what launchers such as torchrun run:
``torchrun --nproc_per_node 8 -m lenscope train …``)."""

from lenscope.cli import main

if __name__ == "__main__":
    main()
