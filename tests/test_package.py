"""lenscope is one import package with one command: built as a wheel, installed into a fresh
environment, used from a folder outside the checkout."""

from __future__ import annotations

import importlib
import os
import pkgutil
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lenscope
from lenscope import cli
from tests.conftest import fit_args

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.subprocess
OLD_TOP_LEVEL = {"lenses", "datamodules", "basemodel", "training", "evaluation", "train", "evaluate", "cli_errors"}


def test_every_module_imports_inside_the_one_package():
    # The repository's own folders are also importable from the checkout under their bare names;
    # a module importing one that way would load a second copy of it (two classes of one name).
    for module in pkgutil.walk_packages(lenscope.__path__, "lenscope."):
        if not module.name.endswith("__main__"):  # that one runs the command
            importlib.import_module(module.name)
    for name in ("lenscope.lenses", "lenscope.datamodules"):
        package = importlib.import_module(name)
        for module in pkgutil.walk_packages(package.__path__, name + "."):
            importlib.import_module(module.name)
    assert not OLD_TOP_LEVEL & {name.split(".")[0] for name in sys.modules}


def test_the_command_dispatches_and_refuses_in_one_line(capsys):
    cli.main(["--help"])
    assert "lenscope train" in capsys.readouterr().out
    for argv, expected in ((["frobnicate"], "has no command 'frobnicate'"),
                           (["train"], "lenscope train needs a configuration")):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1


def test_a_parse_error_names_the_command_as_typed(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--model.lr", "fast"])
    assert "(see `lenscope train fit --help`)" in capsys.readouterr().err


def _fresh_venv(where: Path) -> Path:
    """A new virtual environment that sees this one's dependencies (torch, Lightning, ...) but not
    its lenscope: a ``.pth`` line adds the dependencies' folder to ``sys.path`` without running the
    ``.pth`` files in it (where the editable install hooks itself in)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    site = _site_packages(python)
    ours = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (site / "_lenscope_test_deps.pth").write_text("\n".join(ours) + "\n")
    return python


def _site_packages(python: Path) -> Path:
    return Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())


def test_the_wheel_installs_one_package_and_trains_from_outside_the_checkout(tmp_path, tiny_model_dir, corpus):
    # Build from a copy of the tracked files, so that the build leaves nothing in the checkout.
    source = tmp_path / "source"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), str(source)], check=True)
    wheel, = (tmp_path / "dist").glob("lenscope-*.whl")

    python = _fresh_venv(tmp_path / "venv")
    site = _site_packages(python)
    before = set(p.name for p in site.iterdir())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True)
    added = set(p.name for p in site.iterdir()) - before
    assert {name.split("-")[0] for name in added} == {"lenscope"} and len(added) == 2, added  # package + dist-info

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    lenscope_command = python.parent / "lenscope"
    where = subprocess.run([str(python), "-c", "import lenscope.lenses.lens as m; print(m.__file__)"], cwd=outside,
                           check=True, capture_output=True, text=True).stdout
    assert Path(where).is_relative_to(site), where  # the installed copy, not the checkout
    # the data the project ships travels in the wheel
    counted = subprocess.run([str(python), "-c", "from lenscope.patchscopes.facts import load_facts; "
                              "print(len(load_facts().facts))"], cwd=outside, capture_output=True, text=True)
    assert counted.returncode == 0 and int(counted.stdout) >= 300, counted.stderr[-2000:]
    # every subpackage of the checkout is in the wheel (a new folder missing from pyproject.toml's list)
    ours = {p.parent.name for p in (ROOT / "lenscope").glob("*/__init__.py")} | {"lenses", "datamodules"}
    installed = {p.parent.name for p in (site / "lenscope").glob("*/__init__.py")}
    assert installed == ours, f"missing from the wheel: {sorted(ours - installed)}"
    tasks = subprocess.run([str(python), "-c", "from lenscope.steering.tasks import shipped_tasks; print(shipped_tasks())"],
                           cwd=outside, capture_output=True, text=True)
    assert tasks.returncode == 0 and "antonyms" in tasks.stdout, tasks.stderr[-2000:]

    shown = subprocess.run([str(lenscope_command), "train", "--help"], cwd=outside, capture_output=True, text=True)
    assert shown.returncode == 0 and "--model.lens_type" in shown.stdout, shown.stderr[-2000:]
    assert shown.stdout.startswith("usage: lenscope train") and not shown.stderr, shown.stderr[-2000:]

    config = outside / "fast.yaml"
    shutil.copy(ROOT / "configs" / "debug" / "fast.yaml", config)
    args = fit_args(outside / "run", tiny_model_dir, corpus, steps=2)
    args[args.index("--config") + 1] = str(config)
    trained = subprocess.run([str(lenscope_command), "train", *args[1:]], cwd=outside, capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (outside / "run" / "out" / "tuned" / "lens.safetensors").is_file()
    assert (outside / "run" / "ckpt" / "last.ckpt").is_file()


# Each part may import only from the parts below it (and from itself): data flows one way. The
# user-error classes are the floor: the file writers raise them.
LAYERS = [{"errors"}, {"files", "loggers", "batching", "allocator", "strict_json"}, {"model"}, {"lenses", "datamodules"}, {"training", "evaluation", "patchscopes"},
          {"steering"}, {"tutorial"}, {"cli"}]


def test_imports_only_run_downwards():
    import ast

    level = {part: i for i, parts in enumerate(LAYERS) for part in parts}
    sources = {"lenses": ROOT / "lenses", "datamodules": ROOT / "datamodules"}
    sources.update({part: ROOT / "lenscope" / part for part in ("model", "training", "evaluation", "patchscopes", "steering", "tutorial", "cli")})
    sources.update({part: ROOT / "lenscope" / f"{part}.py" for part in ("errors", "files", "loggers", "batching", "allocator", "strict_json")})
    upward = []
    for part, where in sources.items():
        for path in ([where] if where.is_file() else sorted(where.glob("*.py"))):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module == "lenscope":  # from lenscope import x
                    imported = [f"lenscope.{alias.name}" for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    imported = [node.module]
                elif isinstance(node, ast.Import):
                    imported = [alias.name for alias in node.names]
                else:
                    continue
                for module in imported:
                    other = module.split(".")[1] if module.startswith("lenscope.") else None
                    if other in level and other != part and level[other] >= level[part]:
                        upward.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not upward, upward


KEEPING = """
import ctypes, sys
import torch
from lenscope.allocator import keep_freed_memory
from lenscope.cli import run_as_command

class MallInfo2(ctypes.Structure):  # glibc's mallinfo2(): what its allocator holds
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
where, device = sys.argv[1:]
if where == "command":
    run_as_command(lambda: None)  # what the entry points do first
kept = keep_freed_memory(device)
before = mallinfo2()
block = torch.ones(25_000_000)  # 100 MB
mapped = mallinfo2().hblkhd - before.hblkhd  # bytes in blocks mapped on their own
del block
print(kept, mapped >> 20, (mallinfo2().arena - before.arena) >> 20)  # MiB: mapped for it; heap kept once freed
"""


def _glibc_with_mallinfo2() -> bool:
    import ctypes

    return sys.platform == "linux" and platform.libc_ver()[0] == "glibc" and hasattr(ctypes.CDLL(None), "mallinfo2")


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc's allocator (mallinfo2: glibc >= 2.33)")
def test_a_cpu_command_keeps_the_memory_it_frees_for_its_next_allocation():
    """In a command's process on the CPU a 100 MB block comes from the heap and stays there once
    freed, for the next one (no fresh pages from the kernel). Elsewhere glibc maps it on its own and
    unmaps it when freed: a process that only imports lenscope, a command on a GPU, one told not
    to, and one whose environment sets glibc's malloc itself."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "LENSCOPE_KEEP_FREED_MEMORY")}

    def run(where: str, device: str = "cpu", **env: str) -> tuple[str, int, int]:
        done = subprocess.run([sys.executable, "-c", KEEPING, where, device], capture_output=True, text=True, check=True,
                              env={**clean, **env})
        kept, mapped, heap = done.stdout.split()
        return kept, int(mapped), int(heap)

    kept, mapped, heap = run("command")
    assert kept == "True" and mapped <= 0 and heap >= 95, (kept, mapped, heap)
    for case in (run("library"), run("command", "cuda"), run("command", LENSCOPE_KEEP_FREED_MEMORY="0"),
                 run("command", GLIBC_TUNABLES="glibc.malloc.trim_threshold=134217728")):
        kept, mapped, heap = case
        assert kept == "False" and mapped >= 95 and heap < 5, case
