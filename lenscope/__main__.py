"""``python -m lenscope …`` is the ``lenscope`` command (and what launchers such as torchrun run:
``torchrun --nproc_per_node 8 -m lenscope train …``)."""

from lenscope.cli import run_as_command

if __name__ == "__main__":
    run_as_command()
