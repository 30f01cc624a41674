"""What an adversarial review of the span and artifact changes found: each test failed before its fix."""

from __future__ import annotations

import pytest
import torch

import lenscope
from lenscope.lenses.artifact import load_lens, save_lens
from lenscope.lenses.lens import TunedLens, WrongModelError
from lenscope.lenses.patchscope import Patchscope, Source, Target
from tests.conftest import make_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return lenscope.load_model(str(tiny_model_dir))


def _saved_lens(model, folder):
    torch.manual_seed(0)
    lens = TunedLens(model.layers, model.d_model)
    with torch.no_grad():
        lens.weight.normal_(0, 0.05)
    return save_lens(lens, folder, base_model=model.name, revision=model.revision, unembed_hash=model.unembed_hash,
                     num_hidden_layers=model.num_layers)


# --- a lens as a patchscope mapping is bound to the model whose states it maps ---------------------------
def test_a_lens_mapping_refuses_states_of_another_model(tmp_path, model, other_model):
    lens = load_lens(_saved_lens(model, tmp_path / "tuned"))  # loaded without a model: bound by its artifact
    scope = Patchscope(Source(["w1 w2 w3"], [1], position=-1), Target(layers="last"), mapping=lens)
    with pytest.raises(WrongModelError, match=r"^the tuned lens was made for .*; use a lens trained on this model$"):
        scope.run(other_model)
    states, _ = scope.read(other_model)
    with pytest.raises(WrongModelError):
        scope.patch(other_model, states, [1])
    assert scope.run(model).logits.isfinite().all()  # its own model's states: mapped as before
    # States of its own model written into another (cross-model patching, as `patchscope run
    # --target_model` does): the lens maps the source's states, so that is allowed.
    assert scope.run(model, other_model).logits.isfinite().all()


# --- a leftover's writer is one process, not a pid ------------------------------------------------------
def _held_writer(folder, point: str):
    """A process replacing ``folder`` (its data.txt: "new"), held at ``point`` of the replace (the
    marker it creates says it is there): returns it running."""
    import os
    import subprocess
    import sys
    import time

    from lenscope.files import HOLD_ENV
    from tests.test_safety_artifact import REPLACE_FOLDER

    process = subprocess.Popen([sys.executable, "-c", REPLACE_FOLDER, str(folder), "new"],
                               env={**os.environ, HOLD_ENV: point}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = folder.with_name(f".{folder.name}.held-{point}")
    deadline = time.monotonic() + 300  # a guard against a hang, not a timing assumption
    while not marker.exists():
        assert process.poll() is None, f"the writer ended before its hold point: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the hold point"
        time.sleep(0.02)
    marker.unlink()
    return process


def _stop(process) -> None:
    import signal

    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_a_replace_killed_under_a_pid_a_live_process_now_holds_is_recovered(tmp_path):
    """A restarted container's writer gets its killed predecessor's pid (and the host name stays):
    the leftovers of the killed one were taken for a live writer's, so the moved-aside artifact was
    never put back and every load of it failed."""
    import os

    from lenscope.files import atomic_dir, recover_dir

    folder = tmp_path / "tuned"
    with atomic_dir(folder) as tmp:
        (tmp / "data.txt").write_text("old")
    writer = _held_writer(folder, "moved-aside")
    dead = writer.pid
    _stop(writer)
    for leftover in tmp_path.iterdir():  # as if this process were the restarted writer: the same pid
        leftover.rename(leftover.with_name(leftover.name.replace(f"-{dead}@", f"-{os.getpid()}@")))
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [".tuned.old", ".tuned.tmp"]
    line = recover_dir(folder)
    assert line is not None and "put in place the complete new folder" in line and "removed the replaced old" in line
    assert (folder / "data.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["tuned"]


def test_a_live_writers_folders_are_left_alone(tmp_path):
    from lenscope.files import atomic_dir, recover_dir

    folder = tmp_path / "tuned"
    with atomic_dir(folder) as tmp:
        (tmp / "data.txt").write_text("old")
    writer = _held_writer(folder, "moved-aside")
    try:
        assert recover_dir(folder) is None
        assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [".tuned.old", ".tuned.tmp"]
    finally:
        _stop(writer)
    assert "put in place" in recover_dir(folder) and (folder / "data.txt").read_text() == "new"


# --- a lens's manifest names no file for lenscope to upload or download ---------------------------------
def test_push_uploads_only_the_lens_files_whatever_its_manifest_names(tmp_path, model, monkeypatch):
    """The manifest's keys are names the lens's author chose: a sealed config listing the user's
    key beside the weights made `lenscope push` publish that key (the seal is a checksum anyone can
    recompute, not a signature)."""
    import json

    from lenscope.lenses.artifact import CONFIG, sealed
    from lenscope.lenses.hub import push_lens
    from tests.test_safety_artifact import _fake_hub

    secret = tmp_path / "home" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY")
    folder = _saved_lens(model, tmp_path / "shared" / "tuned")
    config = json.loads((folder / CONFIG).read_text())
    entry = {"bytes": 11, "sha256": "0" * 64}
    config["files"] = {**config["files"], str(secret): entry, "../../home/id_rsa": entry}
    (folder / CONFIG).write_text(json.dumps(sealed(config), indent=2))
    load_lens(folder, model)  # a lens that loads: nothing refuses it before the upload
    uploaded = _fake_hub(monkeypatch)
    push_lens(folder, "me/lenses", path_in_repo="tuned")
    assert set(uploaded) == {"tuned/config.json", "tuned/lens.safetensors", "tuned/README.md"}
    assert not any(b"PRIVATE KEY" in data for data in uploaded.values())


# --- a lens in the tuned-lens format is checked on its first model, however it was loaded ----------------
def test_a_tuned_lens_folder_loaded_without_a_model_is_checked_on_its_first_model(tmp_path, model, other_model):
    """Loaded with a model, a tuned-lens folder for another one warns (tuned-lens's fingerprint);
    loaded without, it was bound to whatever model it was first used with, without a word."""
    import warnings

    from lenscope.lenses.trajectory import Trajectory
    from lenscope.lenses.tuned_lens_format import save_tuned_lens, tuned_lens_hash

    assert tuned_lens_hash(model.adapter.unembedding_weight) != tuned_lens_hash(other_model.adapter.unembedding_weight)
    lens = TunedLens(model.layers, model.d_model)
    folder = save_tuned_lens(lens, tmp_path / "exported", model)
    with pytest.warns(UserWarning, match="whose unembedding differs from this model's"):
        load_lens(folder, other_model)
    loaded = load_lens(folder)
    with pytest.warns(UserWarning, match="whose unembedding differs from this model's"):
        Trajectory.of(other_model, "w1 w2", [loaded])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trajectory.of(model, "w1 w2", [load_lens(folder)])  # its own model: not a word


def test_a_moved_aside_folder_without_its_new_one_goes_back(tmp_path):
    """The new folder goes in place where the killed writer left it complete; without it (removed
    by hand), the old one goes back: never no folder at all."""
    import shutil

    from lenscope.files import atomic_dir, recover_dir

    folder = tmp_path / "tuned"
    with atomic_dir(folder) as tmp:
        (tmp / "data.txt").write_text("old")
    writer = _held_writer(folder, "moved-aside")
    _stop(writer)
    for leftover in tmp_path.glob(".tuned.tmp-*"):
        shutil.rmtree(leftover)
    assert "put back the folder that the killed process" in recover_dir(folder)
    assert (folder / "data.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["tuned"]


# --- a refused trajectory binds no lens -----------------------------------------------------------------
def test_a_trajectory_refused_for_a_lens_that_does_not_fit_binds_no_lens(tmp_path, model, tiny_model_dir):
    """Trajectory.of bound each lens before checking that the next fits: a lens not bound yet (a
    tuned-lens folder loaded without a model, a new lens) was bound to a model it never decoded,
    and its own model was then refused as "another model"."""
    from lenscope.lenses.trajectory import Trajectory

    wider_path = tmp_path / "wider"
    tiny_llama(d_model=48).save_pretrained(wider_path)
    make_tokenizer().save_pretrained(wider_path)
    wider = lenscope.load_model(str(wider_path))
    fresh, fits_wider = TunedLens(model.layers, model.d_model), TunedLens(wider.layers, wider.d_model)
    with pytest.raises(lenscope.errors.ConfigError, match="does not fit this model"):
        Trajectory.of(wider, "w1 w2", [fits_wider, fresh])
    assert fits_wider.unembed_hash is None and fresh.unembed_hash is None
    Trajectory.of(model, "w1 w2", [fresh])  # its model: decoded
    assert fresh.unembed_hash == model.unembed_hash


# --- what push publishes keeps the Hub's names whole -----------------------------------------------------
def test_push_publishes_a_hub_dataset_by_its_whole_name(tmp_path):
    """A corpus streamed from the Hub (configs/pile.yaml: hub:monology/pile-uncopyrighted) was cut
    like a local path to 'pile-uncopyrighted' in the published config and card."""
    from lenscope.lenses.hub import public_config

    local = tmp_path / "data" / "pile.jsonl"
    config = {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M",
              "training_data": {"source": "hub:monology/pile-uncopyrighted", "validation": str(local)}}
    published = public_config(config)["training_data"]
    assert published == {"source": "hub:monology/pile-uncopyrighted", "validation": "pile.jsonl"}


# --- a span never ends before a combining accent -------------------------------------------------------
def test_a_span_is_not_found_before_the_combining_accent_of_its_last_letter():
    """Text in decomposed form (NFD: 'e' then U+0301) keeps the accent as a token of its own: the
    subject 'cafe' was found in 'café' and its state read at the token without the accent."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lenscope.errors import ConfigError
    from lenscope.lenses.patchscope import find_span

    # One token per character (as byte-level tokenizers often keep the accent): the tokens alone
    # allow the cut.
    chars = Tokenizer(models.WordLevel({c: i for i, c in enumerate(" abcdefhirs\u0301")}, unk_token=" "))
    chars.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    split = PreTrainedTokenizerFast(tokenizer_object=chars)
    text = "cafe\u0301 is here"
    assert find_span(split, text, "is") == (6, 8)
    with pytest.raises(ConfigError, match="only inside a word or token"):
        find_span(split, text, "cafe")


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_a_killed_writer_not_yet_reaped_is_dead(tmp_path):
    """A writer killed under a parent that has not waited for it (a notebook's Popen) is a zombie:
    its pid still answers, and its leftovers were taken for a live writer's."""
    import os

    from lenscope.files import atomic_dir, recover_dir

    folder = tmp_path / "tuned"
    with atomic_dir(folder) as tmp:
        (tmp / "data.txt").write_text("old")
    writer = _held_writer(folder, "moved-aside")
    writer.kill()
    try:
        os.waitid(os.P_PID, writer.pid, os.WEXITED | os.WNOWAIT)  # it has ended; it is not reaped
        assert "put in place" in recover_dir(folder) and (folder / "data.txt").read_text() == "new"
    finally:
        writer.wait()
        writer.stderr.close()
