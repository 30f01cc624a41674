"""What a researcher imports: ``lenscope.load_model`` and ``lenscope.load_lens``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lenscope
from lenscope.errors import ConfigError
from lenscope.lenses.artifact import LensArtifactError, save_lens
from lenscope.lenses.lens import TunedLens


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return lenscope.load_model(str(tiny_model_dir))


def test_import_is_light():
    # A notebook's `import lenscope` (or a command's --help) does not pay for torch and transformers.
    code = "import sys, lenscope; print(sorted({'torch', 'transformers', 'nnsight'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_the_frozen_model_reads_and_decodes_as_the_model_does(model):
    ids = model.tokenizer("w1 w2 w3 w4 w5", return_tensors="pt").input_ids
    h = model.residuals(ids)
    assert h.shape == (model.num_layers + 1, 1, ids.shape[1], model.d_model)
    assert model.layers == list(range(model.num_layers)) and model.num_layers == 3
    with torch.no_grad():
        own = model.hf(ids).logits
    torch.testing.assert_close(model.decode(h[-1]), own, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.log_probs(h[-1]), torch.log_softmax(own.float(), -1), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in model.hf.parameters()) and not model.hf.training
    assert "layers=3" in repr(model)


def test_load_lens_takes_the_model_and_refuses_another(model, tmp_path):
    lens = TunedLens(model.layers, model.d_model)
    torch.nn.init.normal_(lens.weight, std=0.01)
    kwargs = dict(base_model=model.name, revision=model.revision, num_hidden_layers=model.num_layers)
    save_lens(lens, tmp_path / "ours", unembed_hash=model.unembed_hash, **kwargs)
    loaded = lenscope.load_lens(tmp_path / "ours", model)
    torch.testing.assert_close(loaded.weight, lens.weight)
    save_lens(lens, tmp_path / "theirs", unembed_hash="0" * 16, **kwargs)
    with pytest.raises(LensArtifactError, match="use a lens trained on this model"):
        lenscope.load_lens(tmp_path / "theirs", model)


def test_every_kind_of_lens_decodes_itself(model):
    from lenscope.lenses.learned_prompt import LearnedPromptLens
    from lenscope.lenses.lens import AffineLens, LogitLens

    ids = model.tokenizer("w1 w2 w3 w4 w5", return_tensors="pt").input_ids
    h = model.residuals(ids)[model.layers]  # (L, 1, T, d), as a notebook has it
    torch.manual_seed(0)
    tuned = TunedLens(model.layers, model.d_model, offset=2)
    torch.nn.init.normal_(tuned.weight, std=0.05)
    prompt = LearnedPromptLens(model.layers, model.d_model, offset=1, prompt_length=3)
    torch.nn.init.normal_(prompt.prompt, std=0.05)
    with torch.no_grad():
        torch.testing.assert_close(LogitLens(model.layers, model.d_model).logits(model, h), model.decode(h).float())
        torch.testing.assert_close(tuned.logits(model, h), model.decode(tuned(h)))
        got = prompt.logits(model, h)
        assert got.shape == (*h.shape[:-1], model.vocab_size) and torch.isfinite(got).all()
        # Each state decodes on its own: the same state gives the same logits in any batch.
        torch.testing.assert_close(prompt.logits(model, h[:, :, 2:3]), got[:, :, 2:3], rtol=1e-4, atol=1e-5)
    assert [lens.key for lens in (tuned, prompt, AffineLens(model.layers, model.d_model))] == ["tuned+2", "learned_prompt+1", "affine"]


def test_a_trajectory_holds_each_layers_prediction(model):

    text = "w1 w2 w3 w4 w5 w6"
    torch.manual_seed(1)
    future = TunedLens(model.layers, model.d_model, offset=1)
    torch.nn.init.normal_(future.weight, std=0.05)
    traj = future.trajectory(model, text, k=3)
    logit, tuned = traj.panels
    assert [p.name for p in traj.panels] == ["logit", "tuned+1"] and len(traj.tokens) == 6
    ids = model.tokenize(text)[0]
    h = model.residuals(ids[None])[:, 0]  # (L+1, T, d)
    own = model.log_probs(h[-1])  # (T, V)
    # Drawing order: the model's output, then the last lensed layer down to the embeddings.
    assert traj.row_names[:2] == ["output", f"block {model.num_layers - 2}"] and traj.row_names[-1] == "embeddings"
    kl = traj.grid(logit, "kl")
    assert torch.all(kl[0] == 0)
    for row, layer in ((1, model.num_layers - 1), (len(traj.row_names) - 1, 0)):
        lens_lp = model.log_probs(h[layer])
        expected = (own.exp() * (own - lens_lp)).sum(-1) / torch.log(torch.tensor(2.0))
        torch.testing.assert_close(kl[row], expected, rtol=1e-4, atol=1e-4)
        prob = traj.grid(logit, "target_prob")[row]
        torch.testing.assert_close(prob[:-1], lens_lp[torch.arange(5), ids[1:]].exp(), rtol=1e-4, atol=1e-6)
        assert torch.isnan(prob[-1])
    # A lens of offset 1 predicts two tokens ahead: nothing to compare with at the last two positions.
    rank = traj.grid(tuned, "target_rank")
    assert torch.isnan(rank[1:, -2:]).all() and (rank[1:, :-2] >= 1).all()
    assert torch.isnan(traj.grid(tuned, "kl")[1:, -1]).all() and not torch.isnan(traj.grid(tuned, "kl")[1:, :-1]).any()
    top = traj.top_tokens(tuned)
    assert len(top) == model.num_layers + 1 and len(top[0][0]) == 3
    assert [p for _, p in top[0][0]] == sorted((p for _, p in top[0][0]), reverse=True)


def test_trajectory_statistics_handle_impossible_tokens_and_diverged_lenses():
    """Entropy and KL are contractions over the vocabulary, with exact fallbacks: a token of
    probability 0 (log p = −inf) adds 0, and a NaN row (a diverged lens) stays NaN, not 0."""
    from lenscope.lenses.trajectory import _panel

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    logits[0, 1, :3] = -float("inf")  # three impossible tokens for the lens
    logits[1, 2] = float("nan")
    model_logits = torch.randn(3, 7)
    model_logits[0, 4:] = -float("inf")  # and for the model
    logp, model_logp = logits.log_softmax(-1), model_logits.log_softmax(-1)
    panel = _panel("lens", 0, [0, 1], logp, model_logp, [1, 2, 3], k=2)
    bits = torch.log(torch.tensor(2.0))
    p, m = logp[0, 1].exp(), model_logp[1].exp()
    expected_entropy = -(p[3:] * logp[0, 1, 3:]).sum() / bits
    torch.testing.assert_close(panel.stats["entropy"][1, 1], expected_entropy)
    expected_kl = (m * (model_logp[1] - logp[0, 1])).sum() / bits  # the lens gives 0 where the model does not
    assert torch.isinf(expected_kl) and torch.isinf(panel.stats["kl"][1, 1])
    q = model_logp[0].exp()
    expected_kl = (q[:4] * (model_logp[0, :4] - logp[0, 0, :4])).sum() / bits  # the model's zeros add 0
    torch.testing.assert_close(panel.stats["kl"][1, 0], expected_kl)
    assert torch.isfinite(panel.stats["entropy"][0]).all()
    assert torch.isnan(panel.stats["entropy"][2, 2]) and torch.isnan(panel.stats["kl"][2, 2])


def test_a_trajectory_renders_as_table_page_and_picture(model, tmp_path):
    traj = TunedLens(model.layers, model.d_model).trajectory(model, "w1 w2 w3")
    table = str(traj)
    assert "logit: top token" in table and "embeddings" in table and "w2" in table
    page = traj.to_html(tmp_path / "t.html", stat="kl").read_text()
    assert "plotly" in page and "tuned lens" in page and "KL(model" in page
    assert traj.to_png(tmp_path / "t.png", stat="target_rank").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="unknown statistic"):
        traj.to_png(tmp_path / "u.png", stat="mood")
    assert not (tmp_path / "u.png").exists()


def test_lenscope_show_writes_the_page_and_picture(model, tmp_path, capsys, monkeypatch):
    from lenscope import cli

    lens = TunedLens(model.layers, model.d_model)
    save_lens(lens, tmp_path / "lens", base_model=model.name, revision=model.revision,
              unembed_hash=model.unembed_hash, num_hidden_layers=model.num_layers)
    monkeypatch.chdir(tmp_path)
    # A lens trained on a local folder does not open that folder on its own word: --model names it.
    cli.main(["show", "w3 w4 w5", "--model", str(model.name), "--lens", str(tmp_path / "lens"), "--out", "view"])
    out = capsys.readouterr().out
    assert "tuned: top token" in out and (tmp_path / "view.html").is_file() and (tmp_path / "view.png").is_file()
    with pytest.raises(SystemExit) as stop:
        cli.main(["show", "w3", "--lens", str(tmp_path / "nowhere")])
    assert stop.value.code == 2 and "is not a lens artifact" in capsys.readouterr().err


def test_the_token_identity_patchscope_is_a_lens_too(model, tmp_path, capsys, monkeypatch):
    from lenscope import cli
    from lenscope.lenses.token_identity import TokenIdentityLens, token_identity
    from lenscope.lenses.trajectory import Trajectory

    lens = TokenIdentityLens.for_model(model)
    assert lens.key == "token_identity" and lens.layers == model.layers
    ids = model.tokenize("w3 w4 w5 w6")
    h = model.residuals(ids)[lens.layers]  # (L, 1, T, d)
    got = lens.logits(model, h)
    assert got.shape == (len(lens.layers), 1, ids.shape[1], model.vocab_size)
    # The same numbers as the patchscope the evaluation runs, row by row without the shared prefix.
    alone = token_identity(rows_per_pass=1, share_prefix=False)
    torch.testing.assert_close(got[:, 0], alone.patch(model, h[:, 0], lens.layers).logits, atol=1e-4, rtol=1e-4)
    trajectory = Trajectory.of(model, "w3 w4 w5 w6", [lens])
    top = trajectory.panels[0].top_ids[1:, :, 0]  # (L, T): row 0 is the model's own output
    assert torch.equal(top, got[:, 0].argmax(-1))
    # From the shell: beside a saved lens, or alone with --model.
    monkeypatch.chdir(tmp_path)
    cli.main(["show", "w3 w4", "--model", str(model.name), "--lens", "token_identity", "--out", "ti"])
    assert "token_identity: top token" in capsys.readouterr().out and (tmp_path / "ti.png").is_file()
    with pytest.raises(TypeError, match="call lens.logits"):
        lens(h)
