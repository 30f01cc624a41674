"""The learned-prompt future lens (Future Lens method (c)): a patchscope with a trained target prompt."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from lenscope.cli import evaluate, train
from lenscope.datamodules.preprocessing import collate
from lenscope.lenses.artifact import load_lens
from lenscope.lenses.learned_prompt import IDENTITY_PROMPT, LearnedPromptLens
from lenscope.model.patching import PatchingEngine
from lenscope.training.lens_module import LensTrainingModule
from tests.conftest import fit_args, training_step
from tests.test_evaluation import eval_args


@pytest.fixture
def module(tiny_model_dir) -> LensTrainingModule:
    module = LensTrainingModule(base=str(tiny_model_dir), lens_type="learned_prompt", offsets=[1], prompt_length=4,
                                prompt_positions=6, cache="none")
    module.cache = None
    return module


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    samples = [{"input_ids": ids, "positions": list(range(12)), "labels": ids[1:] + [-100]}
               for ids in torch.randint(4, 200, (2, 12), generator=g).tolist()]
    return collate(samples, pad_id=3)


def test_a_prompt_of_token_embeddings_gives_the_patchscope_of_those_tokens(module):
    lens = module.lenses["learned_prompt+1"]
    ids = module.frozen.tokenizer("w5 w9 w11 w7")["input_ids"]
    lens.init_from_tokens(module.base.get_input_embeddings(), ids)
    h = torch.randn(3, 5, module.frozen.adapter.d_model)
    got = lens.logits(module.frozen, h)
    n = len(ids)
    for i, layer in enumerate(lens.layers):
        rows = torch.full((5,), n - 1)
        expected = module.frozen.engine.run(torch.tensor(ids).expand(5, -1), None, torch.full((5,), layer), rows, h[i], rows)
        torch.testing.assert_close(got[i], expected, atol=1e-4, rtol=0)


def test_the_shared_prompt_prefix_gives_the_same_logits_and_gradients_as_whole_prompts(module):
    lens = module.lenses["learned_prompt+1"]
    with torch.no_grad():
        lens.prompt.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    h = torch.randn(3, 5, module.frozen.adapter.d_model, generator=torch.Generator().manual_seed(2))
    target = torch.log_softmax(torch.randn(3, 5, module.frozen.adapter.vocab_size), -1)
    lens.rows_per_pass = 4  # chunks that cut across layers
    got = {}
    for share in (True, False):
        lens.share_prefix = share
        lens.prompt.grad = None
        with torch.no_grad():
            logits = lens.logits(module.frozen, h)
        lens.kl(module.frozen, h, target, torch.float32).sum().backward()
        got[share] = logits, lens.prompt.grad.clone()
    assert lens._prefix_works[module.frozen], "the tiny LLaMA's cache must stand in for the prefix"
    copy = pickle.loads(pickle.dumps(lens))  # the verdicts (weak references to models) are not pickled
    assert torch.equal(copy.prompt, lens.prompt) and not copy._prefix_works and not copy._prefixes
    torch.testing.assert_close(got[True][0], got[False][0], atol=1e-4, rtol=1e-4)
    scale = float(got[False][1].abs().max())
    assert scale > 0, "the prefix vectors must get gradients"
    torch.testing.assert_close(got[True][1], got[False][1], atol=1e-4 * scale, rtol=1e-4)


def test_the_kept_prefix_follows_the_prompt(module):
    """Outside training the prefix cache is kept between calls, and made again once the prompt
    changes (an optimizer step writes it in place): the logits are always the current prompt's."""
    lens = module.lenses["learned_prompt+1"]
    h = torch.randn(3, 2, module.frozen.adapter.d_model, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.SGD(lens.parameters(), lr=10.0)
    before = None
    with torch.no_grad():
        lens.logits(module.frozen, h)
        kept = lens._prefixes[module.frozen][2]
        lens.logits(module.frozen, h)
        assert lens._prefixes[module.frozen][2] is kept, "an unchanged prompt keeps its cache"
        lens.prompt.data.mul_(1.5)  # a write that bumps no version
        lens.logits(module.frozen, h)
        assert lens._prefixes[module.frozen][2] is not kept, "a changed prompt makes its cache again"
    for step in range(2):
        with torch.no_grad():
            lens.share_prefix = True
            shared = lens.logits(module.frozen, h)
            lens.share_prefix = False
            full = lens.logits(module.frozen, h)
        torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-4)
        if step == 0:
            before = shared
            assert len(lens._prefixes) == 1
            optimizer.zero_grad()
            lens.share_prefix = True
            lens.logits(module.frozen, h).logsumexp(-1).sum().neg().backward()
            optimizer.step()
    assert (shared - before).abs().max() > 1e-3, "the step must have changed the prompt's logits"


def test_a_one_vector_prompt_trains_with_a_zero_gradient(module):
    """A prompt of one vector is overwritten by the state written there: nothing depends on it, its
    gradient is zero, and a training step still runs (above layer 0 the engine skips the blocks
    below the write, so the logits have no path to the prompt at all)."""
    lens = LearnedPromptLens(module.frozen.layers[1:], module.frozen.adapter.d_model, offset=1, prompt_length=1)
    h = torch.randn(len(lens.layers), 2, lens.d_model)
    lens.logits(module.frozen, h).logsumexp(-1).sum().backward()
    assert lens.prompt.grad is not None and not lens.prompt.grad.any()


def test_training_moves_only_the_prompt_through_the_patching_engine_and_lowers_the_kl(module, monkeypatch):
    calls = []
    run = PatchingEngine.run
    monkeypatch.setattr(PatchingEngine, "run", lambda self, *a, **k: calls.append(1) or run(self, *a, **k))
    lens = module.lenses["learned_prompt+1"]
    start = lens.prompt.detach().clone()
    optimizer = torch.optim.Adam(lens.parameters(), lr=0.05)
    b = batch()
    losses = []
    for _ in range(8):
        loss = training_step(module, b)  # the module's own step, as the Trainer calls it
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert calls, "the learned prompt must run through the patching engine"
    assert losses[-1] < losses[0] * 0.9
    assert (lens.prompt - start).abs().max() > 1e-3
    assert all(p.grad is None for p in module.base.parameters()), "the frozen model must get no gradient"


def test_train_py_trains_saves_and_evaluate_py_scores_a_learned_prompt_lens(tmp_path, tiny_model_dir, corpus):
    train.main(fit_args(tmp_path / "train", tiny_model_dir, corpus, "--model.lens_type", "learned_prompt",
                        "--model.offsets", "[1]", "--model.prompt_length", "4", "--model.prompt_positions", "4",
                        "--model.prompt_lr", "0.01"))
    lens = load_lens(tmp_path / "train" / "out" / "learned_prompt+1")
    assert isinstance(lens, LearnedPromptLens) and lens.offset == 1 and lens.prompt.shape == (3, 4, 32)
    ckpt = torch.load(tmp_path / "train" / "ckpt" / "last.ckpt", weights_only=False)
    assert set(ckpt["state_dict"]) == {"lenses.learned_prompt+1.prompt"}
    results = json.loads((tmp_path / "train" / "out" / "results.json").read_text())
    assert results["lenses"] == ["logit+1", "learned_prompt+1"]
    assert all(v == v and v >= 0 for v in results["learned_prompt+1"]["kl_nats"])
    evaluate.main(eval_args(tmp_path / "eval", tiny_model_dir, corpus, "--model.methods", "[logit]",
                            "--model.future_offsets", "[1]", "--lenses", str(tmp_path / "train" / "out" / "learned_prompt+1")))
    scored = json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]
    assert set(scored["future+1/precision@1_model"]) == {"logit", "learned_prompt+1"}


def test_learned_prompt_starts_from_the_token_identity_prompt(module):
    ids = module.frozen.tokenizer(IDENTITY_PROMPT)["input_ids"]
    expected = module.base.get_input_embeddings()(torch.tensor([ids[i % len(ids)] for i in range(4)]))
    torch.testing.assert_close(module.lenses["learned_prompt+1"].prompt[1], expected)
