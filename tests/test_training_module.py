"""The LightningModule and the hidden-state cache on a tiny model, without the CLI."""

from __future__ import annotations

import pytest
import torch

from lenscope.model.hidden_cache import CacheMismatchError, HiddenStateCache, batch_key
from lenscope.training.lens_module import HiddenStateError, LensTrainingModule
from tests.conftest import training_step


@pytest.fixture
def module(tiny_model_dir):
    m = LensTrainingModule(base=str(tiny_model_dir), lens_dtype="float32")
    m.cache = HiddenStateCache("device")
    return m


def make_batch(seed: int = 0, batch: int = 2, seq: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 204, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "positions": torch.arange(seq).repeat(batch, 1),
            "labels": torch.cat([ids[:, 1:], torch.full((batch, 1), -100)], 1)}


def test_lensed_layers_and_lens_only_state(module):
    assert module.layers == [0, 1, 2] and module.lenses["tuned"].layers == [0, 1, 2]  # embeddings + blocks 0..L-2 for a 3-block model
    assert set(module.state_dict()) == {"lenses.tuned.weight", "lenses.tuned.bias"}


def test_base_model_stays_in_eval_mode(module):
    module.train()
    assert module.lenses["tuned"].training and not module.base.training
    assert not any(m.training for m in module.base.modules())


def test_cache_hits_return_the_same_states(module):
    batch = make_batch()
    states = module.hidden_states(batch)
    assert states.shape == (4, 24, 32)
    again = module.hidden_states(batch)
    assert module.cache.hits == 1 and module.cache.misses == 1
    torch.testing.assert_close(states, again, rtol=0, atol=0)
    assert module.cache.bytes_per_token == 4 * 32 * 4  # (L+1) × d × fp32


def test_trimmed_positions_are_gathered(module):
    batch = make_batch()
    batch["positions"] = torch.tensor([[3, 7], [5, -1]])
    states = module.hidden_states(batch)
    full = module.frozen.reader.read(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(states[:, 2], full[:, 1, 5])
    _, _, labels = module.lens_examples(batch, states, 0)
    ids = batch["input_ids"]
    assert labels.tolist() == [ids[0, 4], ids[0, 8], ids[1, 6]]


def test_nan_hidden_states_are_refused_with_the_layer(module):
    def poison(block, args, output):  # block 1 overflows at one real token
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[0, 1, 5] = float("inf")

    handle = module.frozen.adapter.blocks[1].register_forward_hook(poison)
    try:
        with pytest.raises(HiddenStateError, match="block 1"):
            module.hidden_states(make_batch())
    finally:
        handle.remove()


def test_disk_cache_roundtrip_and_mismatch(tmp_path):
    cache = HiddenStateCache("disk", tmp_path / "c", manifest={"model": "a", "seq_len": 16})
    states = torch.randn(3, 5, 8)
    key = batch_key(torch.arange(5))
    cache.put(key, states)
    assert not list((tmp_path / "c").glob(".*tmp*")), "no temporary files left behind"
    reopened = HiddenStateCache("disk", tmp_path / "c", manifest={"model": "a", "seq_len": 16})
    torch.testing.assert_close(reopened.get(key, torch.device("cpu")), states)
    with pytest.raises(CacheMismatchError, match="seq_len differ"):
        HiddenStateCache("disk", tmp_path / "c", manifest={"model": "a", "seq_len": 32})


def test_disk_cache_rebuilds_a_damaged_shard(tmp_path):
    cache = HiddenStateCache("disk", tmp_path / "c", manifest={})
    key = batch_key(torch.arange(3))
    cache.put(key, torch.randn(2, 3, 4))
    shard = tmp_path / "c" / f"{key}.safetensors"
    shard.write_bytes(shard.read_bytes()[:20])  # cut short, as by a crash without atomic writes
    with pytest.warns(UserWarning, match="damaged"):
        assert cache.get(key, torch.device("cpu")) is None
    assert not shard.exists()


def test_device_cache_respects_its_budget():
    cache = HiddenStateCache("device", max_bytes=1000)
    cache.put("a", torch.zeros(2, 10, 10))  # 800 bytes
    cache.put("b", torch.zeros(2, 10, 10))  # would exceed the budget: not stored
    assert cache.get("a", torch.device("cpu")) is not None and cache.get("b", torch.device("cpu")) is None
    assert cache.stored_bytes == 800


def test_one_training_step_lowers_the_loss(module):
    batch = make_batch(seq=16)
    optimizer = torch.optim.SGD(module.lenses.parameters(), lr=0.5)
    losses = []
    for _ in range(3):
        loss = training_step(module, batch)  # the module's own step, as the Trainer calls it
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert (module.cache.misses, module.cache.hits) == (1, 2), "the second and third steps read the cached states"


def test_offset_pairs_each_position_with_the_target_k_ahead(tiny_model_dir):
    module = LensTrainingModule(base=str(tiny_model_dir), lens_dtype="float32", offsets=[0, 2])
    module.cache = HiddenStateCache("none")
    batch = make_batch(seq=8)
    states = module.hidden_states(batch)
    h, final, labels = module.lens_examples(batch, states, 2)
    all_labels = module.lens_examples(batch, states, 0)[2]
    # 2 rows × (8 - 2) positions have a target two tokens ahead.
    assert h.shape == (3, 12, 32) and final.shape == (12, 32)
    per_row = states.view(4, 2, 8, 32)
    torch.testing.assert_close(h.view(3, 2, 6, 32), per_row[:3, :, :6])
    torch.testing.assert_close(final.view(2, 6, 32), per_row[3, :, 2:])
    assert labels.view(2, 6).tolist() == all_labels.view(2, 8)[:, 2:].tolist()
    assert module.lenses["tuned+2"].offset == 2 and module.lenses["tuned"].offset == 0


def test_a_later_run_reuses_the_disk_cache_without_the_model(tiny_model_dir, tmp_path, monkeypatch):
    manifest = {"model": "tiny", "data": "same"}
    first = LensTrainingModule(base=str(tiny_model_dir), lens_dtype="float32")
    first.cache = HiddenStateCache("disk", tmp_path / "cache", manifest=manifest)
    states = first.hidden_states(make_batch())

    later = LensTrainingModule(base=str(tiny_model_dir), lens_dtype="float32")
    later.cache = HiddenStateCache("disk", tmp_path / "cache", manifest=manifest)

    def model_must_not_run(*args):
        raise AssertionError("the model ran although the batch is cached")

    monkeypatch.setattr(later.frozen.reader, "read", model_must_not_run)
    again = later.hidden_states(make_batch())
    torch.testing.assert_close(states, again, rtol=0, atol=0)
    assert later.cache.hit_rate == 1.0


def test_affine_lens_is_the_least_squares_fit_of_the_last_block(tiny_model_dir):
    module = LensTrainingModule(base=str(tiny_model_dir), lens_type="affine", ridge=1e-9)
    module.cache = HiddenStateCache("none")
    hs, finals = [], []
    assert not module.automatic_optimization  # fitted, not descended: no loss, no gradient
    for seed in range(6):
        batch = make_batch(seed=seed, batch=4, seq=16)
        h, final, _ = module.lens_examples(batch, module.hidden_states(batch), 0)
        assert training_step(module, batch) is None
        hs.append(h)
        finals.append(final)
    assert module.normal_equations["affine"].count == sum(h.shape[1] for h in hs)
    module.on_validation_epoch_start()  # solves
    h, final = torch.cat(hs, 1).double(), torch.cat(finals).double()
    x = torch.cat([h, torch.ones(*h.shape[:2], 1, dtype=torch.float64)], -1)
    predicted = module.lenses["affine"](h.float()).double()
    for layer in range(3):
        solution = torch.linalg.lstsq(x[layer], final).solution  # (d+1, d)
        torch.testing.assert_close(predicted[layer], x[layer] @ solution, atol=2e-3, rtol=1e-3)


def test_a_tuned_lens_starts_from_the_least_squares_fit_of_the_batches_before_its_first_step(tiny_model_dir, corpus):
    """The default recipe: the stream's first ``warm_start_batches`` batches fit the lens in closed
    form, the KL steps train on the batches after them. With lr 0 the one KL step leaves the fit
    as it is: it must equal the affine lens fitted on the same first batches."""
    import lightning as L

    from lenscope.datamodules.lens_data import LensDataModule

    def run(steps: int, **kwargs) -> LensTrainingModule:
        module = LensTrainingModule(base=str(tiny_model_dir), lens_dtype="float32", cache="none", ridge=1e-3, **kwargs)
        data = LensDataModule(source=str(corpus), seq_len=16, batch_size=2, num_workers=0)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, datamodule=data)
        return module

    warm = run(1, warm_start_batches=3, lr=0.0)
    affine = run(3, lens_type="affine")
    affine.on_validation_epoch_start()  # solves the fit
    torch.testing.assert_close(warm.lenses["tuned"].weight, affine.lenses["affine"].weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(warm.lenses["tuned"].bias, affine.lenses["affine"].bias, atol=1e-5, rtol=1e-4)
    assert warm.lenses["tuned"].weight.abs().max() > 0.01, "the fit moved the lens away from the logit lens"
    # The KL step read one more batch, after the three of the fit.
    assert warm.tokens_seen == affine.tokens_seen + 2 * 16
    # The paper's recipe starts from zero: with lr 0 its lens stays the logit lens.
    cold = run(1, warm_start_batches=0, lr=0.0)
    assert cold.lenses["tuned"].weight.abs().max() == 0 and cold.tokens_seen == 2 * 16


def test_an_init_lens_is_checked_against_this_model(tiny_model_dir, tmp_path):
    """--model.init_lens goes through load_lens with the model: a tuned-lens folder whose fingerprint
    names another unembedding gets tuned-lens's warning (it was copied in without a word)."""
    import json

    import lenscope
    from lenscope.lenses.lens import TunedLens
    from lenscope.lenses.tuned_lens_format import save_tuned_lens

    model = lenscope.load_model(str(tiny_model_dir))
    save_tuned_lens(TunedLens(model.layers, model.d_model), tmp_path / "lens", model)
    config = json.loads((tmp_path / "lens" / "config.json").read_text())
    (tmp_path / "lens" / "config.json").write_text(json.dumps({**config, "unembed_hash": "0" * 64}))
    with pytest.warns(UserWarning, match="unembedding differs from this model's"):
        LensTrainingModule(base=str(tiny_model_dir), lens_dtype="float32", init_lens=str(tmp_path / "lens"))
