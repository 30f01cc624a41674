"""Lenses on the Hugging Face Hub: pulled through huggingface_hub from a cache this test fills
(offline, in the cache layout huggingface_hub documents), and pushed as one commit with a model card."""

from __future__ import annotations

import json

import pytest
import torch

import lenscope
from lenscope.lenses.artifact import save_lens
from lenscope.lenses.hub import HubError, HubRef, model_card, parse_hub_ref, push_lens
from lenscope.lenses.lens import TunedLens, residual_name
from lenscope.lenses.tuned_lens_format import save_tuned_lens

COMMIT_A, COMMIT_B, COMMIT_C = "a" * 40, "b" * 40, "c" * 40


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return lenscope.load_model(str(tiny_model_dir))


def _lens(model, seed: int) -> TunedLens:
    torch.manual_seed(seed)
    lens = TunedLens(model.layers, model.d_model)
    with torch.no_grad():
        lens.weight.normal_(0, 0.05)
    return lens


def _save(lens, folder, model, **extra):
    return save_lens(lens, folder, base_model="tiny", revision="local", unembed_hash=model.unembed_hash,
                     num_hidden_layers=model.num_layers, extra=extra)


def _snapshot(cache, kind: str, repo_id: str, commit: str, refs: tuple[str, ...] = ()):
    """The folder of one commit in a Hugging Face cache: ``<kind>s--owner--name/snapshots/<commit>``,
    with ``refs/<name>`` holding the commit a branch or tag points at."""
    repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture
def hub_cache(tmp_path, model, monkeypatch):
    """A cache with a lenscope artifact at two commits of a model repo (main → B, tag v1 → A) and a
    tuned-lens folder in a Space, as ``hf_hub_download`` leaves them; the Hub itself unreachable."""
    cache = tmp_path / "hf-cache"
    lenses = {}
    for commit, refs, seed in ((COMMIT_A, ("v1",), 1), (COMMIT_B, ("main",), 2)):
        lenses[commit] = _lens(model, seed)
        _save(lenses[commit], _snapshot(cache, "model", "me/lenses", commit, refs) / "tuned", model)
    lenses["space"] = _lens(model, 3)
    save_tuned_lens(lenses["space"], _snapshot(cache, "space", "Org/tuned-lens", COMMIT_C, ("main",)) / "lens" / "tiny",
                    model)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache, lenses


def test_parse_hub_ref():
    assert parse_hub_ref("hub:AlignmentResearch/tuned-lens:lens/EleutherAI/pythia-160m") == HubRef(
        "AlignmentResearch/tuned-lens", None, None, "lens/EleutherAI/pythia-160m")
    assert parse_hub_ref("hub:spaces/Org/tl@v2:lens/gpt2/") == HubRef("Org/tl", "space", "v2", "lens/gpt2")
    assert parse_hub_ref("hub:me/lenses") == HubRef("me/lenses")
    assert str(parse_hub_ref("hub:datasets/me/x@main:a")) == "hub:datasets/me/x@main:a"
    for bad, says in (("hub:lenses", "not a repository id"), ("hub:me/lenses@:tuned", "nothing after '@'"),
                      ("hub:me/lenses:../x", "plain path"), ("me/lenses", "not a Hub lens name")):
        with pytest.raises(HubError, match=says):
            parse_hub_ref(bad)


def test_pull_from_the_cache_offline_with_revisions(hub_cache, model):
    cache, lenses = hub_cache
    from huggingface_hub import scan_cache_dir

    # huggingface_hub itself reads the cache this test wrote as three revisions of two repos.
    seen = scan_cache_dir(cache)
    assert {(r.repo_id, r.repo_type, len(r.revisions)) for r in seen.repos} == {
        ("me/lenses", "model", 2), ("Org/tuned-lens", "space", 1)}

    def same(a, b):
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)

    same(lenscope.load_lens("hub:me/lenses:tuned", model), lenses[COMMIT_B])  # main
    same(lenscope.load_lens(f"hub:me/lenses@{COMMIT_A}:tuned", model), lenses[COMMIT_A])  # a pinned commit
    same(lenscope.load_lens("hub:me/lenses@v1:tuned", model), lenses[COMMIT_A])  # a tag
    # The tuned-lens format in a Space, found without saying it is a Space, as the tuned-lens lenses are named.
    same(lenscope.load_lens("hub:Org/tuned-lens:lens/tiny", model), lenses["space"])
    same(lenscope.load_lens("hub:spaces/Org/tuned-lens:lens/tiny", model), lenses["space"])


def test_pull_failures_are_one_line(hub_cache, model):
    cache, _ = hub_cache
    for ref, says in (("hub:me/absent:tuned", "is not in the Hugging Face cache .* HF_HUB_OFFLINE is set"),
                      ("hub:me/lenses@v9:tuned", "is not in the Hugging Face cache"),
                      ("hub:me/lenses:nothing-here", "is not in the Hugging Face cache")):
        with pytest.raises(HubError, match=says) as info:
            lenscope.load_lens(ref, model)
        assert "\n" not in str(info.value)
    # A config whose weights never arrived is named as such, not read as an empty lens.
    (cache / "models--me--lenses" / "snapshots" / COMMIT_B / "tuned" / "lens.safetensors").unlink()
    with pytest.raises(HubError, match="has config.json but no lens.safetensors"):
        lenscope.load_lens("hub:me/lenses:tuned", model)


def test_a_lens_for_another_model_is_refused_from_the_hub_too(hub_cache, model, tmp_path):
    cache, lenses = hub_cache
    folder = _snapshot(cache, "model", "me/other", COMMIT_A, ("main",)) / "tuned"
    _save(lenses[COMMIT_A], folder, model)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "unembed_hash": "0" * 16}))
    with pytest.raises(lenscope.lenses.artifact.LensArtifactError, match="use a lens trained on this model"):
        lenscope.load_lens("hub:me/other:tuned", model)


def test_model_card_says_what_the_lens_is(tmp_path, model):
    from huggingface_hub import ModelCard

    kl = [3.0 - 0.5 * i for i in range(len(model.layers))]
    folder = _save(_lens(model, 0), tmp_path / "tuned", model, trained_steps=60, tokens_seen=30720, warm_start_batches=24,
                   training_data={"source": "pile.jsonl.zst", "mode": "pack", "seq_len": 128},
                   held_out={"step": 60, "kl_bits": kl, "ce_bits": [k + 1 for k in kl]})
    card = model_card(folder, "me/lenses", "tuned")
    parsed = ModelCard(card)
    assert parsed.data.library_name == "lenscope" and "tuned-lens" in parsed.data.tags
    assert 'lenscope.load_lens("hub:me/lenses:tuned", model)' in card
    assert "| tokens seen | 30,720 |" in card and "source pile.jsonl.zst" in card
    assert "| least-squares warm start | on the first 24 batches, before the optimizer steps |" in card
    assert "## Held-out KL per layer (step 60)" in card
    rows = [f"| {layer} | {residual_name(layer)} | {value:.3f} | {value + 1:.3f} |" for layer, value in zip(model.layers, kl, strict=True)]
    assert all(row in card.splitlines() for row in rows)


def test_push_is_one_commit_with_the_card(tmp_path, model, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("repo", repo_id, kw)))

    class Commit:
        commit_url = "https://huggingface.co/me/lenses/commit/1"

    def create_commit(self, repo_id, operations, **kw):
        files = {}
        for op in operations:
            with op.as_file() as f:
                files[op.path_in_repo] = f.read()
        calls.append(("commit", repo_id, files, kw))
        return Commit()

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    folder = _save(_lens(model, 0), tmp_path / "tuned", model)
    assert push_lens(folder, "me/lenses", path_in_repo="tuned/", private=True) == Commit.commit_url
    (_, repo, kw), (_, repo2, files, commit_kw) = calls
    assert repo == repo2 == "me/lenses" and kw["private"] is True and kw["exist_ok"] is True
    assert set(files) == {"tuned/config.json", "tuned/lens.safetensors", "tuned/README.md"}
    assert b"# Tuned lens for tiny" in files["tuned/README.md"]
    assert files["tuned/lens.safetensors"] == (folder / "lens.safetensors").read_bytes()
    # A damaged artifact is not published.
    (folder / "lens.safetensors").write_bytes(b"0")
    with pytest.raises(lenscope.lenses.artifact.LensArtifactError, match="does not match its manifest"):
        push_lens(folder, "me/lenses")
    assert len(calls) == 2


def test_push_failure_is_one_line(tmp_path, model, monkeypatch):
    from huggingface_hub import HfApi

    def refuse(self, repo_id, **kw):
        raise OSError("401 Client Error: Unauthorized\nmore detail")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    folder = _save(_lens(model, 0), tmp_path / "tuned", model)
    with pytest.raises(HubError, match=r"^could not push .* 401 Client Error: Unauthorized; log in") as info:
        push_lens(folder, "me/lenses")
    assert "\n" not in str(info.value)


def test_lenscope_push_card_writes_the_card_and_uploads_nothing(tmp_path, model, monkeypatch, capsys):
    from huggingface_hub import HfApi

    from lenscope import cli

    def no_network(*args, **kwargs):
        raise AssertionError("--card must not upload")

    monkeypatch.setattr(HfApi, "create_commit", no_network)
    monkeypatch.setattr(HfApi, "create_repo", no_network)
    folder = _save(_lens(model, 0), tmp_path / "tuned", model, tokens_seen=512)
    cli.main(["push", str(folder), "me/lenses", "--path-in-repo", "tuned", "--card", str(tmp_path / "card.md")])
    card = (tmp_path / "card.md").read_text()
    assert card.startswith("---\n") and "| tokens seen | 512 |" in card and "hub:me/lenses:tuned" in card
    with pytest.raises(SystemExit) as stop:
        cli.main(["push", str(folder), "not-a-repo-id"])
    assert stop.value.code == 2 and "is not a repository id" in capsys.readouterr().err
