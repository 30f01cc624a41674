"""A lens artifact is what was written and is bound to its model: the manifest covers config.json
too, a loaded lens refuses a model it was not made for, a lens never makes lenscope open a local
path it names, and nothing uploaded names the user's folders."""

from __future__ import annotations

import json
import re

import pytest
import torch

import lenscope
from lenscope.lenses.artifact import LensArtifactError, load_lens, model_named_by, reseal, save_lens
from lenscope.lenses.lens import TunedLens, WrongModelError
from lenscope.lenses.trajectory import Trajectory


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return lenscope.load_model(str(tiny_model_dir))


def _lens(model, seed: int = 0) -> TunedLens:
    torch.manual_seed(seed)
    lens = TunedLens(model.layers, model.d_model)
    with torch.no_grad():
        lens.weight.normal_(0, 0.05)
        lens.bias.normal_(0, 0.05)
    return lens


def _save(lens, folder, model, **extra):
    return save_lens(lens, folder, base_model=model.name, revision=model.revision, unembed_hash=model.unembed_hash,
                     num_hidden_layers=model.num_layers, extra=extra)


def _edit(folder, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(config), indent=2))


# --- the manifest covers config.json -----------------------------------------------------------------
def test_reordered_layers_are_refused(tmp_path, model):
    folder = _save(_lens(model), tmp_path / "tuned", model)
    _edit(folder, lambda c: {**c, "layers": list(reversed(c["layers"]))})
    with pytest.raises(LensArtifactError, match=r"config.json does not match its manifest .*'layers' reordered") as info:
        load_lens(folder, model)
    assert "\n" not in str(info.value)


def test_reindenting_the_config_is_no_edit(tmp_path, model):
    lens = _lens(model)
    folder = _save(lens, tmp_path / "tuned", model)
    _edit(folder, lambda c: c)  # another indentation, the same content
    torch.testing.assert_close(load_lens(folder, model).weight, lens.weight, rtol=0, atol=0)


def test_format_1_loads_with_a_warning_until_resealed(tmp_path, model):
    lens = _lens(model)
    folder = _save(lens, tmp_path / "tuned", model)
    # What lenscope wrote before the config was covered: format 1, no seal.
    _edit(folder, lambda c: {**{k: v for k, v in c.items() if k != "config_sha256"}, "format_version": 1})
    with pytest.warns(UserWarning, match=r"format 1, whose manifest does not cover config.json.*reseal\("):
        loaded = load_lens(folder, model)
    torch.testing.assert_close(loaded.weight, lens.weight, rtol=0, atol=0)
    reseal(folder)
    assert json.loads((folder / "config.json").read_text())["format_version"] == 2
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_lens(folder, model)
    _edit(folder, lambda c: {**c, "layers": list(reversed(c["layers"]))})
    with pytest.raises(LensArtifactError, match="does not match its manifest"):
        load_lens(folder, model)


def test_a_newer_format_is_refused_with_the_fix(tmp_path, model):
    folder = _save(_lens(model), tmp_path / "tuned", model)
    _edit(folder, lambda c: {**c, "format_version": 99})
    with pytest.raises(LensArtifactError, match="format_version 99, which this lenscope does not read.*upgrade lenscope"):
        load_lens(folder, model)


# --- a lens is bound to its model --------------------------------------------------------------------
def test_a_lens_loaded_without_a_model_refuses_another_model(tmp_path, model, other_model):
    assert other_model.d_model == model.d_model and other_model.num_layers == model.num_layers
    folder = _save(_lens(model), tmp_path / "tuned", model)
    lens = load_lens(folder)  # no model: nothing to check yet
    assert lens.unembed_hash == model.unembed_hash
    h = other_model.residuals(other_model.tokenize("w3 w4 w5"))[lens.layers]
    with pytest.raises(WrongModelError, match=rf"made for 'tiny-llama\d*' \(unembedding {model.unembed_hash}\), not for") as info:
        lens.logits(other_model, h)
    assert "\n" not in str(info.value)
    with pytest.raises(WrongModelError, match="use a lens trained on this model"):
        Trajectory.of(other_model, "w3 w4 w5", [lens])
    with pytest.raises(WrongModelError):
        lens.trajectory(other_model, "w3 w4 w5")


def test_a_lens_loaded_without_a_model_works_on_its_model(tmp_path, model):
    lens = _lens(model)
    loaded = load_lens(_save(lens, tmp_path / "tuned", model))
    h = model.residuals(model.tokenize("w3 w4 w5"))[lens.layers]
    torch.testing.assert_close(loaded.logits(model, h), lens.logits(model, h))
    assert len(Trajectory.of(model, "w3 w4 w5", [loaded]).panels) == 1


def test_a_new_lens_is_bound_to_the_first_model_it_is_used_with(model, other_model):
    lens = _lens(model)
    h = model.residuals(model.tokenize("w3 w4"))[lens.layers]
    lens.logits(model, h)
    assert lens.unembed_hash == model.unembed_hash
    with pytest.raises(WrongModelError):
        lens.logits(other_model, h)
    # The logit lens has nothing learned: it decodes any model.
    logit = lenscope.lenses.lens.LogitLens(model.layers, model.d_model)
    logit.logits(model, h)
    logit.logits(other_model, h)
    assert logit.unembed_hash is None


# --- a lens never opens a local path on its own word -------------------------------------------------
def test_a_lens_names_a_local_model_by_its_folder_name_not_its_path(tmp_path, model, tiny_model_dir):
    folder = _save(_lens(model), tmp_path / "tuned", model)
    config = json.loads((folder / "config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_model_dir.name and config["base_model_local"] is True
    assert str(tiny_model_dir) not in (folder / "config.json").read_text()
    with pytest.raises(LensArtifactError, match=r"trained on a local model .* pass the model explicitly \(--model"):
        model_named_by(folder)


def test_show_refuses_the_local_path_a_lens_names(tmp_path, model, tiny_model_dir, capsys, monkeypatch):
    from lenscope import cli

    folder = _save(_lens(model), tmp_path / "tuned", model)
    # A lens of format 1, as lenscope wrote them before, or one edited by someone else: it names a path.
    _edit(folder, lambda c: {**{k: v for k, v in c.items() if k not in ("config_sha256", "base_model_local")},
                             "format_version": 1, "base_model_name_or_path": str(tiny_model_dir)})
    import lenscope.model.frozen as frozen

    opened = []
    monkeypatch.setattr(frozen.FrozenModel, "load", classmethod(lambda cls, name, *a, **k: opened.append(name)))
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="format 1"), pytest.raises(SystemExit) as stop:
        cli.main(["show", "w3 w4", "--lens", str(folder)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and opened == []
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip().splitlines()[-1]]
    assert f"({str(tiny_model_dir)!r})" in err and "pass the model explicitly (--model" in err and "Traceback" not in err


def test_a_lens_may_name_a_hub_id_or_the_embedded_model(tmp_path, model):
    for name in ("HuggingFaceTB/SmolLM2-135M", "embedded:smollm2-135m"):
        folder = save_lens(_lens(model), tmp_path / name.replace("/", "_").replace(":", "_"), base_model=name,
                           revision="main", unembed_hash=model.unembed_hash, num_hidden_layers=model.num_layers)
        assert model_named_by(folder) == name
        assert json.loads((folder / "config.json").read_text())["base_model_local"] is False


# --- nothing uploaded names the user's folders -------------------------------------------------------
def _fake_hub(monkeypatch) -> dict:
    """HfApi answering offline: every file of the one commit, by its path in the repository."""
    from huggingface_hub import HfApi

    uploaded = {}

    class Commit:
        commit_url = "https://huggingface.co/me/lenses/commit/1"

    def create_commit(self, repo_id, operations, **kw):
        for op in operations:
            with op.as_file() as f:
                uploaded[op.path_in_repo] = f.read()
        return Commit()

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return uploaded


@pytest.mark.parametrize("format_version", [2, 1])
def test_push_uploads_no_local_path(tmp_path, tmp_path_factory, model, tiny_model_dir, monkeypatch, format_version):
    from lenscope.lenses.hub import push_lens

    corpus = tmp_path / "data" / "pile.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("")
    folder = _save(_lens(model), tmp_path / "runs" / "tuned", model, trained_steps=4,
                   training_data={"source": str(corpus), "mode": "pack", "seq_len": 16},
                   held_out={"step": 4, "kl_bits": [1.0] * model.num_layers}, lenscope_lens_dtype="float32")
    if format_version == 1:  # as lenscope wrote them before: the model's absolute path, no seal
        _edit(folder, lambda c: {**{k: v for k, v in c.items() if k not in ("config_sha256", "base_model_local")},
                                 "format_version": 1, "base_model_name_or_path": str(tiny_model_dir)})
    (folder / "notes.txt").write_text(f"my folder is {tmp_path}")  # not part of the lens: not uploaded
    uploaded = _fake_hub(monkeypatch)
    with pytest.MonkeyPatch.context() as m:
        m.chdir(tmp_path)  # relative names that exist here are local paths too
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # format 1's warning
            push_lens(folder, "me/lenses", path_in_repo="tuned")
    assert set(uploaded) == {"tuned/config.json", "tuned/lens.safetensors", "tuned/README.md"}
    roots = {str(tmp_path_factory.getbasetemp()), str(tmp_path), str(tiny_model_dir), str(corpus)}
    for name, data in uploaded.items():
        for root in roots:
            assert root.encode() not in data, (name, root)
    config = json.loads(uploaded["tuned/config.json"])
    assert config["base_model_name_or_path"] == tiny_model_dir.name and config["base_model_local"] is True
    assert config["training_data"]["source"] == "pile.jsonl" and config["unembed_hash"] == model.unembed_hash
    card = uploaded["tuned/README.md"].decode()
    assert f"`{tiny_model_dir.name}` (a local copy)" in card and "source pile.jsonl" in card
    # What was uploaded is a whole, sealed lens for the same model.
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    for name, data in uploaded.items():
        (pulled / name.removeprefix("tuned/")).write_bytes(data)
    load_lens(pulled, model)
    with pytest.raises(LensArtifactError, match="trained on a local model"):
        model_named_by(pulled)


# --- a replace killed at any point loses nothing -----------------------------------------------------
REPLACE_FOLDER = """
import sys
from pathlib import Path
from lenscope.files import atomic_dir

with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "data.txt").write_text(sys.argv[2])
"""

REPLACE_LENS = """
import sys
import torch
from lenscope.lenses.artifact import save_lens
from lenscope.lenses.lens import TunedLens

lens = TunedLens([0, 1, 2], 8)
torch.nn.init.constant_(lens.weight, 1.0)
save_lens(lens, sys.argv[1], base_model="m", revision="r", unembed_hash="h", num_hidden_layers=3)
"""


def _kill_held_writer(script: str, folder, point: str, *args: str) -> int:
    """Run ``script`` writing ``folder`` with the writer held at ``point`` (files.HOLD_ENV); kill it
    there with SIGKILL once it has said so (its marker file). Returns its pid."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from lenscope.files import HOLD_ENV

    process = subprocess.Popen([sys.executable, "-c", script, str(folder), *args], env={**os.environ, HOLD_ENV: point},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = folder.with_name(f".{folder.name}.held-{point}")
    deadline = time.monotonic() + 300  # a guard against a hang, not a timing assumption
    try:
        while not marker.exists():
            assert process.poll() is None, f"the writer ended before its hold point: {process.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "timed out waiting for the hold point"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
        process.stderr.close()
    marker.unlink()
    return process.pid


@pytest.mark.parametrize(("point", "survivor", "said"), [
    ("filled", "old", r"recovered .*tuned: removed the unfinished new folder \.tuned\.tmp-\d+@\S+-\w+ of the killed process \d+$"),
    # The old folder is moved aside only once the new one is complete: the new one goes in place.
    ("moved-aside", "new", r"recovered .*tuned: put in place the complete new folder that the killed process \d+ was "
                           r"replacing it with; removed the replaced old folder \.tuned\.old-\d+@\S+ of the killed process \d+$"),
    ("replaced", "new", r"recovered .*tuned: removed the replaced old folder \.tuned\.old-\d+@\S+ of the killed process \d+$"),
])
def test_a_folder_replace_killed_at_any_point_is_recovered(tmp_path, caplog, point, survivor, said):
    from lenscope.files import atomic_dir, recover_dir

    folder = tmp_path / "tuned"
    with atomic_dir(folder) as tmp:
        (tmp / "data.txt").write_text("old")
    pid = _kill_held_writer(REPLACE_FOLDER, folder, point, "new")
    assert any(str(pid) in p.name for p in tmp_path.iterdir() if p.name != "tuned"), "the kill left its folder"
    assert folder.exists() is (point != "moved-aside")  # the one window that two renames leave
    with caplog.at_level("WARNING", logger="lenscope.files"):
        line = recover_dir(folder)
    assert re.search(said, line) and [r.getMessage() for r in caplog.records] == [line]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuned"]
    assert (folder / "data.txt").read_text() == survivor
    assert recover_dir(folder) is None  # nothing left to recover


def test_loading_an_artifact_whose_replace_was_killed_restores_it(tmp_path, caplog):
    from lenscope.lenses.lens import TunedLens as Tuned

    folder = save_lens(Tuned([0, 1, 2], 8), tmp_path / "tuned", base_model="m", revision="r", unembed_hash="h",
                       num_hidden_layers=3)
    dead = _kill_held_writer(REPLACE_LENS, folder, "moved-aside")
    assert not folder.exists()
    with caplog.at_level("WARNING", logger="lenscope.files"):
        lens = load_lens(folder)
    assert (lens.weight == 1).all(), "the new lens, complete (the old one is moved aside only then)"
    assert ["put in place" in r.getMessage() for r in caplog.records] == [True]
    # A writer still alive is left alone, and so is one on another machine (a shared filesystem),
    # which this one cannot know dead; a leftover of an older lenscope names no machine: this one's.
    import os

    from lenscope.files import recover_dir

    alive, elsewhere = tmp_path / f".tuned.old-{os.getppid()}", tmp_path / f".tuned.tmp-{dead}@elsewhere-1-2-abc"
    alive.mkdir()
    elsewhere.mkdir()
    assert recover_dir(folder) is None and alive.is_dir() and elsewhere.is_dir()
    older = tmp_path / f".tuned.old-{dead}"
    older.mkdir()
    assert "removed the replaced old folder" in recover_dir(folder) and not older.exists()


# --- a full disk or a file-size limit is one line naming the file --------------------------------------
def test_a_full_disk_is_one_line_naming_the_file_and_the_earlier_file_is_intact(tmp_path, monkeypatch):
    import errno
    import pathlib

    from lenscope.files import WriteError, atomic_dir, atomic_write

    target = atomic_write(tmp_path / "results.json", "earlier")

    def no_space(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", no_space)
    with pytest.raises(WriteError, match=rf"^could not write {re.escape(str(target))}: the disk is full \(.* free "
                                         r"there\); free space or write to another disk") as info:
        atomic_write(target, "later")
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError) and "\n" not in str(info.value)
    monkeypatch.undo()
    assert target.read_text() == "earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    # A quota, through a folder (safetensors quotes the system's message, with no errno).
    with pytest.raises(WriteError, match=r"could not write .*tuned: the disk quota is exceeded .*within your quota"):
        with atomic_dir(tmp_path / "tuned"):
            raise RuntimeError("Error while serializing: IoError(Os { code: 122, kind: QuotaExceeded, "
                               f"message: \"{__import__('os').strerror(errno.EDQUOT)}\" }})")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    # Even the empty temporary folder can be refused.
    import tempfile

    def no_room_for_a_folder(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".tuned.tmp-1"))

    monkeypatch.setattr(tempfile, "mkdtemp", no_room_for_a_folder)
    with pytest.raises(WriteError, match=rf"^could not write {re.escape(str(tmp_path / 'tuned'))}: the disk is full"):
        with atomic_dir(tmp_path / "tuned"):
            pass


FILL_UNDER_A_SIZE_LIMIT = """
import resource, signal, sys
import torch
from lenscope.files import WriteError, atomic_path
from lenscope.lenses.artifact import save_lens
from lenscope.lenses.lens import TunedLens

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
lens = TunedLens([0, 1, 2], 128)  # 196 KiB of weights
try:
    save_lens(lens, sys.argv[1], base_model="m", revision="r", unembed_hash="h", num_hidden_layers=3)
except WriteError as err:
    print(err)
try:
    with atomic_path(sys.argv[2]) as tmp:
        torch.save(lens.state_dict(), tmp)
except WriteError as err:
    print(err)
"""


def test_a_file_size_limit_is_one_line_naming_the_file_for_safetensors_and_torch(tmp_path):
    import subprocess
    import sys

    earlier = save_lens(TunedLens([0, 1, 2], 8), tmp_path / "tuned", base_model="m", revision="r", unembed_hash="h",
                        num_hidden_layers=3)
    (tmp_path / "state.pt").write_bytes(b"earlier")
    result = subprocess.run([sys.executable, "-c", FILL_UNDER_A_SIZE_LIMIT, str(earlier), str(tmp_path / "state.pt")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    limit = r"the file-size limit \(ulimit -f: 64\.0 KiB\) was reached; raise the limit \(ulimit -f unlimited\)"
    assert len(lines) == 2 and "enforce fail" not in result.stdout
    assert re.fullmatch(rf"could not write {re.escape(str(earlier))}: {limit}.*", lines[0])
    assert re.fullmatch(rf"could not write {re.escape(str(tmp_path / 'state.pt'))}: {limit}.*", lines[1])
    assert load_lens(earlier).d_model == 8 and (tmp_path / "state.pt").read_bytes() == b"earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt", "tuned"]


def test_a_learned_prompt_lens_loaded_without_a_model_refuses_another_model(tmp_path, model, other_model):
    from lenscope.lenses.learned_prompt import LearnedPromptLens

    lens = LearnedPromptLens(model.layers, model.d_model, offset=0, prompt_length=2)
    torch.nn.init.normal_(lens.prompt, std=0.02)
    loaded = load_lens(_save(lens, tmp_path / "learned", model))
    h = other_model.residuals(other_model.tokenize("w3 w4"))[loaded.layers][:, 0, -1]
    with pytest.raises(WrongModelError, match="the learned_prompt lens was made for"):
        loaded.logits(other_model, h)
    loaded.logits(model, model.residuals(model.tokenize("w3 w4"))[loaded.layers][:, 0, -1])


def test_a_tuned_lens_export_names_no_local_path_and_a_nan_score_still_seals(tmp_path, model, tiny_model_dir):
    from lenscope.lenses.tuned_lens_format import save_tuned_lens

    exported = save_tuned_lens(_lens(model), tmp_path / "exported", model)
    assert json.loads((exported / "config.json").read_text())["base_model_name_or_path"] == tiny_model_dir.name
    # A held-out score of NaN (a layer with no tokens) is written as before and the seal holds.
    folder = _save(_lens(model), tmp_path / "tuned", model, held_out={"step": 1, "kl_bits": [float("nan")] * 3})
    assert load_lens(folder, model).unembed_hash == model.unembed_hash


def test_a_loaded_lens_asked_as_a_patchscope_refuses_another_model(tmp_path, model, other_model):
    from lenscope.lenses.patchscope import LensPatchscope

    wrapped = LensPatchscope(load_lens(_save(_lens(model), tmp_path / "tuned", model)))
    with pytest.raises(WrongModelError, match="the tuned lens was made for"):
        Trajectory.of(other_model, "w3 w4", [wrapped])
    assert len(Trajectory.of(model, "w3 w4", [wrapped]).panels) == 1
