"""The Patchscopes evaluation: protocol, metrics, baselines, token identity and evaluate.py end to end."""

from __future__ import annotations

import csv
import itertools
import json
import random
from pathlib import Path

import pytest
import torch
import transformers as T

from lenscope.cli import evaluate, train
from lenscope.datamodules.patchscope_data import (
    PatchscopeDataModule,
    collate_documents,
    length_batches,
)
from lenscope.datamodules.preprocessing import offset_pairs
from lenscope.evaluation.baselines import bigram_successors
from lenscope.lenses.artifact import save_lens
from lenscope.lenses.learned_prompt import IDENTITY_PROMPT, LearnedPromptLens
from lenscope.lenses.lens import TunedLens
from lenscope.lenses.metrics import PerLayerMeans
from lenscope.lenses.token_identity import token_identity
from lenscope.model.adapter import ArchitectureAdapter
from lenscope.model.frozen import FrozenModel
from lenscope.model.loading import LoadedModel, load_base_model, tensor_fingerprint
from tests.conftest import TINY_DECODER, fit_args, make_tokenizer, tiny_llama, write_corpus


def protocol(source, **kwargs) -> PatchscopeDataModule:
    data = PatchscopeDataModule(source=str(source), **{"n_fit": 30, "n_eval": 20, **kwargs})
    data.bind(make_tokenizer(), None)
    data.setup()
    return data


def test_protocol_is_seeded_filtered_and_disjoint(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 80, words=(5, 40))
    a, b = protocol(corpus, max_words=30), protocol(corpus, max_words=30)
    assert [(s["doc"], s["positions"]) for s in a.eval_samples] == [(s["doc"], s["positions"]) for s in b.eval_samples]
    fit_docs, eval_docs = {s["doc"] for s in a.fit_samples}, {s["doc"] for s in a.eval_samples}
    assert len(fit_docs) == 30 and len(eval_docs) == 20 and not fit_docs & eval_docs
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    assert all(len(texts[d].split(" ")) < 30 for d in fit_docs | eval_docs), "the word filter was not applied"
    # Another seed: another order and other positions.
    c = protocol(corpus, max_words=30, seed=7)
    assert [s["doc"] for s in c.eval_samples] != [s["doc"] for s in a.eval_samples]


def test_samples_keep_the_future_targets_and_mark_missing_ones(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 40)
    data = protocol(corpus, n_fit=10, n_eval=30, max_offset=3)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tokenizer = make_tokenizer()
    short = 0
    for s in data.eval_samples:
        tokens = tokenizer(texts[s["doc"]])["input_ids"]
        [t] = s["positions"]
        assert 0 <= t <= len(tokens) - 2
        assert s["input_ids"] == tokens[: t + 5] and s["labels"] == [tokens[t + 1]]
        # The real token after t + k, as the evaluation pairs it, or -100 past the document's end.
        batch = collate_documents([s], 0)
        for k in range(4):
            pairs = offset_pairs(batch, k)
            assert pairs.at.tolist() == ([t + k] if t + k < len(tokens) else [])
            want = tokens[t + k + 1] if t + k + 1 < len(tokens) else -100
            assert pairs.next_token.tolist() == ([want] if t + k < len(tokens) else [])
            short += t + k + 1 >= len(tokens)
    assert short, "no document ended within the offsets: the missing targets were not tested"


def test_fit_positions_all_fits_on_every_position_of_the_fitting_documents(tmp_path, tiny_model_dir, corpus):
    evaluate.main(eval_args(tmp_path / "one", tiny_model_dir, corpus, "--model.methods", "[affine]",
                            "--model.future_offsets", "[2]"))
    evaluate.main(eval_args(tmp_path / "all", tiny_model_dir, corpus, "--model.methods", "[affine]",
                            "--model.future_offsets", "[2]", "--data.fit_positions", "all"))
    one, every = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "all"))
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    assert one["affine_fit_positions"] == {"0": 40, "+2": one["affine_fit_positions"]["+2"]}
    # every position t of each fitting document with t + k inside it: (length - k) per document
    data = protocol(corpus, n_fit=40, n_eval=24)
    lengths = [len(make_tokenizer()(texts[s["doc"]])["input_ids"]) for s in data.fit_samples]
    assert every["affine_fit_positions"] == {"0": sum(lengths), "+2": sum(n - 2 for n in lengths)}
    assert every["metrics"]["kl_nats"]["affine"] != one["metrics"]["kl_nats"]["affine"]


def test_holdout_split_evaluates_on_the_documents_train_py_held_out(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 60)
    data = protocol(corpus, holdout_every=3, n_fit=100, n_eval=100)
    assert {s["doc"] % 3 for s in data.eval_samples} == {0}
    assert 0 not in {s["doc"] % 3 for s in data.fit_samples}
    assert len(data.eval_samples) == 20 and len(data.fit_samples) == 40


def test_bigram_successors_take_the_most_frequent_follower():
    table = bigram_successors([[1, 2, 1, 3, 1, 2], [4, 0, 4, 5, 4, 5]], vocab_size=6)
    # 1 → 2 twice, → 3 once; 4 → 5 twice, → 0 once; 2 → 1; 3 → 1; 0 → 4; 5 → 4; ties to the smaller id.
    assert table.tolist() == [4, 2, 1, 1, 5, 4]
    assert bigram_successors([[7]], vocab_size=8).tolist() == [-1] * 8


def test_metrics_average_per_layer_and_respect_masks():
    metric = PerLayerMeans([("p", "a"), ("p", "b")], num_layers=2)
    metric.update("p", "a", torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))
    metric.update("p", "b", torch.tensor([2.0, 4.0, 100.0]), mask=torch.tensor([True, True, False]))
    computed = metric.compute()
    values = computed["means"]
    assert values["p"]["a"] == pytest.approx([2 / 3, 1 / 3]) and values["p"]["b"] == [3.0, 3.0]
    assert computed["counts"]["p"] == {"a": 3, "b": 2}
    # Two state tensors hold everything: one synchronisation for all layers and series.
    assert sorted(metric._defaults) == ["count", "total"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_batched_token_identity_with_a_shared_prefix_equals_one_full_pass_per_pair(arch):
    model = {"llama": lambda: tiny_llama(), "gpt2": lambda: T.AutoModelForCausalLM.from_config(
        T.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, vocab_size=204)),
        "gemma2": lambda: T.AutoModelForCausalLM.from_config(T.Gemma2Config(
            **{**TINY_DECODER, "vocab_size": 204, "head_dim": 8}, final_logit_softcapping=5.0))}[arch]().eval()
    tokenizer = make_tokenizer()
    frozen = FrozenModel(LoadedModel(model, tokenizer, arch, "local"))
    states = torch.randn(4, 5, frozen.d_model, generator=torch.Generator().manual_seed(0))
    layers = [0, 1, 2, 3]  # 3 = the last block's output: only the final norm and head act on it
    prompt = "w1 w2 w3 w1 w2 w3 w4"  # in the tiny vocabulary
    batched = token_identity(prompt, rows_per_pass=7).patch(frozen, states, layers).logits
    assert batched.shape == (4, 5, 204)
    one_by_one = token_identity(prompt, rows_per_pass=1, share_prefix=False).patch(frozen, states, layers).logits
    torch.testing.assert_close(batched, one_by_one, atol=1e-4, rtol=0)
    # ... and the state written matters: another state, another output.
    assert (batched[:, 0] - batched[:, 1]).abs().max() > 1e-3


def eval_args(out: Path, model_dir: Path, source: Path, *extra: str) -> list[str]:
    return ["--config", str(Path(__file__).resolve().parents[1] / "configs/eval/patchscopes.yaml"),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--model.base.name", str(model_dir), "--model.output_dir", str(out),
            "--data.source", str(source), "--data.n_fit", "40", "--data.n_eval", "24", "--data.batch_size", "8", *extra]


def test_evaluate_scores_every_method_and_writes_json_csv_and_plots(tmp_path, tiny_model_dir, corpus, capsys):
    train.main(fit_args(tmp_path / "train", tiny_model_dir, corpus, "--model.offsets", "[0, 1]"))
    lenses = [str(tmp_path / "train" / "out" / name) for name in ("tuned", "tuned+1")]
    # An untrained (zero) tuned lens is the logit lens: it must score exactly like it.
    adapter = ArchitectureAdapter.discover(load_base_model(str(tiny_model_dir), None, "float32").model)
    zero = save_lens(TunedLens([0, 1, 2], adapter.d_model), tmp_path / "zero", base_model="tiny", revision="",
                     unembed_hash=tensor_fingerprint(adapter.unembedding_weight), num_hidden_layers=3)
    evaluate.main(eval_args(tmp_path / "eval", tiny_model_dir, corpus, "--lenses", *lenses, str(zero)))
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    metrics = results["metrics"]
    assert set(metrics["precision@1"]) == {"logit", "affine", "token_identity", "tuned", "tuned:zero"}
    assert set(metrics["future+1/precision@1_model"]) == {"logit", "token_identity", "affine+1", "tuned+1", "bigram"}
    assert set(metrics) >= {"precision@5", "surprisal_nats", "kl_nats", "future+3/precision@1_real"}
    for metric in ("precision@1", "surprisal_nats", "kl_nats"):
        assert metrics[metric]["tuned:zero"] == pytest.approx(metrics[metric]["logit"], abs=1e-6)
    assert metrics["kl_nats"]["tuned"] != pytest.approx(metrics["kl_nats"]["logit"], abs=1e-6)
    for by_method in metrics.values():
        for values in by_method.values():
            assert len(values) == 3 and all(v == v for v in values)
    for method, values in metrics["precision@1"].items():
        assert all(0 <= v <= 1 for v in values), method
        assert all(a >= b for a, b in zip(metrics["precision@5"][method], values, strict=True))
    assert results["counts"]["precision@1"]["logit"] == results["documents"]["eval"] == 24
    rows = list(csv.DictReader((tmp_path / "eval" / "results.csv").open()))
    assert len(rows) == sum(len(m) for m in metrics.values()) * 3
    tables = (tmp_path / "eval" / "results.md").read_text()
    assert "| layer | P@1 logit | P@1 affine |" in tables and "Offset 3 (Future Lens N = 3)" in tables
    assert tables.count("\n| 2 |") == 4  # the last layer's row in the next-token table and 3 offset tables
    pngs = sorted(p.name for p in (tmp_path / "eval").glob("*.png"))
    assert len(pngs) == len(metrics) and "precision_at_1.png" in pngs
    assert all((tmp_path / "eval" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    # One line per method on the terminal: its mean KL and precision@1 at a few layers, from the results.
    printed = capsys.readouterr().out
    assert f"Summary on 24 positions of {corpus}:" in printed
    for method in ("logit", "affine", "token_identity", "tuned", "tuned:zero"):
        line = next(line for line in printed.splitlines() if line.strip().startswith(method + " "))
        kl = metrics["kl_nats"][method]
        assert f"mean KL {sum(kl) / len(kl):6.3f} nats" in line
        assert line.endswith("precision@1 at layers 0/1/2: " + "/".join(f"{v:.2f}" for v in metrics["precision@1"][method]))
    # A rerun gives identical numbers (seeded shuffle and positions).
    evaluate.main(eval_args(tmp_path / "again", tiny_model_dir, corpus, "--lenses", *lenses, str(zero)))
    assert json.loads((tmp_path / "again" / "results.json").read_text())["metrics"] == metrics


def test_evaluate_logs_to_wandb(tmp_path, tiny_model_dir, corpus, wandb_spy):
    evaluate.main(eval_args(tmp_path / "eval", tiny_model_dir, corpus, "--trainer.logger",
                            "lightning.pytorch.loggers.WandbLogger", "--trainer.logger.offline", "true",
                            "--trainer.logger.save_dir", str(tmp_path / "wb"), "--trainer.logger.project", "lenscope-test",
                            "--model.methods", "[logit, token_identity]", "--model.future_offsets", "[1]"))
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert len(wandb_spy.runs) == 1
    summary = dict(wandb_spy.runs[0].summary)
    for metric, method in (("precision@1", "logit"), ("future+1/precision@1_model", "token_identity")):
        values = results["metrics"][metric][method]
        assert summary[f"patchscopes/{metric}/{method}/mean"] == pytest.approx(sum(values) / len(values))
    table = wandb_spy.last("patchscopes/table")
    assert table.columns == ["metric", "method", "layer", "value"]
    assert len(table.data) == sum(len(v) for by_method in results["metrics"].values() for v in by_method.values())
    assert {"patchscopes/precision@1", "patchscopes_png/precision@1"} <= wandb_spy.keys()


def test_batching_documents_by_length_changes_no_result(tmp_path, tiny_model_dir, corpus):
    """Less padding, the same numbers: the fit's sums and the metrics' means do not depend on which
    documents share a batch (float rounding aside)."""
    results = {}
    for by_length in ("true", "false"):
        evaluate.main(eval_args(tmp_path / by_length, tiny_model_dir, corpus, "--model.methods", "[logit, affine]",
                                "--data.by_length", by_length, "--data.fit_positions", "all"))
        results[by_length] = json.loads((tmp_path / by_length / "results.json").read_text())
    assert results["true"]["counts"] == results["false"]["counts"]
    assert results["true"]["affine_fit_positions"] == results["false"]["affine_fit_positions"]
    for metric, by_method in results["false"]["metrics"].items():
        for method, values in by_method.items():
            assert results["true"]["metrics"][metric][method] == pytest.approx(values, abs=1e-5), (metric, method)
    # ... while the batches did change: by length, they pad less
    widths = [batch["input_ids"].shape[1] for batch in protocol(corpus, n_fit=40, n_eval=24).test_dataloader()]
    slots = sum(batch["input_ids"].numel() for batch in protocol(corpus, n_fit=40, n_eval=24).test_dataloader())
    unsorted = sum(batch["input_ids"].numel() for batch in protocol(corpus, n_fit=40, n_eval=24, by_length=False).test_dataloader())
    assert widths == sorted(widths) and slots < unsorted


def cut_cost(lengths: list[int], cuts: list[int], max_batch: int, pass_cost: int) -> int | None:
    """Padded slots plus passes of sorted ``lengths`` cut before each index in ``cuts`` (None: a run
    longer than max_batch)."""
    bounds = [0, *cuts, len(lengths)]
    if any(b - a > max_batch for a, b in itertools.pairwise(bounds)):
        return None
    return sum((b - a) * lengths[b - 1] + pass_cost for a, b in itertools.pairwise(bounds))


def test_length_batches_pad_least():
    """The cut of sorted lengths into runs: every document once, in order, at most max_batch per run,
    and no other cut (all of them, by brute force) costs fewer slots plus passes."""
    rng = random.Random(0)
    for _ in range(40):
        lengths = sorted(rng.randint(1, 60) for _ in range(rng.randint(1, 9)))
        max_batch, pass_cost = rng.randint(1, 4), rng.choice([0, 5, 50])
        runs = length_batches(lengths, max_batch, pass_cost)
        assert [i for run in runs for i in run] == list(range(len(lengths)))
        assert all(1 <= len(run) <= max_batch for run in runs)
        costs = [cut_cost(lengths, list(cuts), max_batch, pass_cost) for k in range(len(lengths))
                 for cuts in itertools.combinations(range(1, len(lengths)), k)]
        best = min(c for c in costs if c is not None)
        assert cut_cost(lengths, [run[0] for run in runs[1:]], max_batch, pass_cost) == best, (lengths, max_batch)
    # a long document goes alone rather than pad fifteen short ones
    assert length_batches([10] * 15 + [900], 16) == [list(range(15)), [15]]
    # documents in protocol order are batched as sorted by length, stably
    assert length_batches([30, 10, 20, 10], 2, pass_cost=0) == [[1, 3], [2], [0]]
    with pytest.raises(ValueError, match="max_run >= 1"):
        length_batches([1, 2], 0)


def test_the_shared_products_change_no_result(tmp_path, tiny_model_dir, corpus, monkeypatch):
    """What makes the evaluation fast gives its numbers: the future offsets' affine fits sharing one
    product, a learned prompt's prefix run once per layer, and every batch's read positions decoded
    and scored together, against separate fits, whole-prompt passes, decoding batch by batch and
    scoring layer by layer (float rounding aside; every precision exactly)."""
    from lenscope.evaluation import patchscope_module

    adapter = ArchitectureAdapter.discover(load_base_model(str(tiny_model_dir), None, "float32").model)
    lens = LearnedPromptLens([0, 1, 2], adapter.d_model, offset=2, prompt_length=5)
    with torch.no_grad():
        lens.prompt.normal_(0, float(adapter.model.get_input_embeddings().weight.std()),
                            generator=torch.Generator().manual_seed(0))
    prompt = save_lens(lens, tmp_path / "prompt", base_model="tiny", revision="",
                       unembed_hash=tensor_fingerprint(adapter.unembedding_weight), num_hidden_layers=3)
    args = ("--lenses", str(prompt), "--model.methods", "[logit, affine, token_identity, bigram]",
            "--data.fit_positions", "all")
    evaluate.main(eval_args(tmp_path / "shared", tiny_model_dir, corpus, *args))

    def separately(equations, h, subsets):
        for eq, (index, target) in zip(equations, subsets, strict=True):
            eq.update(h[:, index], target)

    monkeypatch.setattr(patchscope_module, "update_on_subsets", separately)
    monkeypatch.setattr(LearnedPromptLens, "_shares_prefix", lambda self, model: False)
    monkeypatch.setattr(patchscope_module, "SCORED_AT_ONCE", 1)  # one layer's logits scored at a time
    evaluate.main(eval_args(tmp_path / "separate", tiny_model_dir, corpus, *args, "--model.positions_per_decode", "1"))
    shared, separate = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("shared", "separate"))
    assert shared["counts"] == separate["counts"] and shared["affine_fit_positions"] == separate["affine_fit_positions"]
    assert set(shared["metrics"]["future+2/precision@1_model"]) >= {"affine+2", "learned_prompt+2"}
    for metric, by_method in separate["metrics"].items():
        for method, values in by_method.items():
            exact = "precision" in metric
            assert shared["metrics"][metric][method] == (values if exact else pytest.approx(values, abs=1e-5)), (metric, method)


def test_a_greedy_continuation_makes_the_model_and_the_text_the_same_target(tmp_path, tiny_model_dir, corpus):
    """``--model.continuation greedy`` (Future Lens's labels): after the read position the document
    is the model's own greedy continuation, so the token after t + k is the model's argmax at t + k
    and the "model" and "real" columns agree; on the real text they do not."""
    results = {}
    for continuation in ("text", "greedy"):
        evaluate.main(eval_args(tmp_path / continuation, tiny_model_dir, corpus, "--model.methods", "[logit, bigram]",
                                "--model.continuation", continuation))
        results[continuation] = json.loads((tmp_path / continuation / "results.json").read_text())
    assert results["greedy"]["protocol"]["continuation"] == "greedy"
    for k in (1, 2, 3):
        greedy = results["greedy"]["metrics"]
        for method in ("logit", "bigram"):
            assert greedy[f"future+{k}/precision@1_model"][method] == greedy[f"future+{k}/precision@1_real"][method]
    text = results["text"]["metrics"]
    assert any(text[f"future+{k}/precision@1_model"]["logit"] != text[f"future+{k}/precision@1_real"]["logit"]
               for k in (1, 2, 3))


def test_evaluate_scores_patchscopes_given_in_the_config(tmp_path, tiny_model_dir, corpus):
    """A patchscope spec from the command line (or YAML) is one more method; written as the
    built-in ones are, it scores exactly as they do, and a shorter identity prompt differently."""
    specs = {"identity_again": {"prompt": IDENTITY_PROMPT, "layers": "same"}, "logit_again": {"layers": "last"},
             "short_identity": {"prompt": "w5 w5 w6 w6 w9", "layers": "same"}}
    evaluate.main(eval_args(tmp_path / "eval", tiny_model_dir, corpus, "--model.methods", "[logit, token_identity]",
                            "--model.patchscopes", json.dumps(specs)))
    metrics = json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]
    for metric in ("precision@1", "surprisal_nats", "kl_nats", "future+1/precision@1_model"):
        assert metrics[metric]["identity_again"] == metrics[metric]["token_identity"]
        assert metrics[metric]["logit_again"] == metrics[metric]["logit"]
    assert metrics["kl_nats"]["short_identity"] != metrics["kl_nats"]["token_identity"]


@pytest.mark.parametrize(("extra", "message"), [
    pytest.param(["--model.methods", "[logit, psychic]"], "--model.methods has unknown ['psychic']", id="unknown-method"),
    pytest.param(["--data.max_offset", "1"], "raise --data.max_offset to 3", id="offset-beyond-max-offset"),
    pytest.param(["--data.source", "/nonexistent/corpus.jsonl"], "no data found at '/nonexistent/corpus.jsonl'",
                 id="missing-data-path"),
    pytest.param(["--model.rows_per_pass", "0"], "--model.rows_per_pass must be at least 1, got 0", id="zero-rows-per-pass"),
    pytest.param(["--model.positions_per_decode", "0"], "--model.positions_per_decode must be at least 1, got 0",
                 id="zero-positions-per-decode"),
    pytest.param(["--model.identity_prompt", ""], "has no token to write the state at; pass a prompt ending in a "
                 "placeholder token as --model.identity_prompt", id="empty-identity-prompt"),
    pytest.param(["--model.patchscopes", '{"grid": {"layers": [1, 2]}}'], "--model.patchscopes 'grid': layers must be "
                 "'same', 'last' or one residual index", id="patchscope-with-two-target-layers"),
    pytest.param(["--model.ridge", "-1"], "--model.ridge must be a finite number >= 0, got -1.0", id="negative-ridge"),
    pytest.param(["--model.continuation", "sampled"], "--model.continuation must be 'text' or 'greedy', got 'sampled'",
                 id="unknown-continuation"),
    pytest.param(["--lenses", "/nonexistent/last.ckpt"], "is not a lens artifact", id="missing-lens"),
    pytest.param(["--model.methods", "[logit]", "--model.rows_per_pass", "many"],
                 "--model.rows_per_pass: Expected a int. Got value: many (see `python evaluate.py --help`)",
                 id="value-of-the-wrong-type"),
])
def test_bad_evaluation_settings_give_one_line_errors(tmp_path, tiny_model_dir, corpus, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(eval_args(tmp_path / "eval", tiny_model_dir, corpus, *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "eval" / "results.json").exists()


@pytest.mark.slow
def test_embedded_model_patchscopes_have_the_published_shape(tmp_path):
    """The real 135M model on the demo corpus: token identity at the last lensed layer agrees with
    the model's next token most of the time, and the least-squares affine lens is far closer to
    the model than the logit lens (lower KL on average over layers)."""
    root = Path(__file__).resolve().parents[1]
    evaluate.main(["--config", str(root / "configs/eval/patchscopes.yaml"), "--trainer.logger", "false",
                   "--trainer.enable_progress_bar", "false", "--model.output_dir", str(tmp_path / "eval"),
                   "--model.methods", "[logit, affine, token_identity]", "--model.future_offsets", "[]",
                   "--data.n_fit", "8", "--data.n_eval", "8", "--data.fit_positions", "all"])
    metrics = json.loads((tmp_path / "eval" / "results.json").read_text())["metrics"]
    assert metrics["precision@1"]["token_identity"][-1] >= 0.5
    mean = {m: sum(v) / len(v) for m, v in metrics["kl_nats"].items()}
    assert mean["affine"] < 0.5 * mean["logit"], mean


def test_a_training_checkpoint_given_as_a_lens(tmp_path, tiny_model_dir, corpus, capsys):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(eval_args(tmp_path / "eval", tiny_model_dir, corpus, "--lenses", str(ckpt)))
    assert exit_info.value.code == 2
    assert f"{ckpt} is a training checkpoint, not a lens artifact" in capsys.readouterr().err


def test_an_earlier_evaluation_is_not_replaced_silently(tmp_path, tiny_model_dir, corpus, capsys):
    fast = ["--model.methods", "[logit]", "--model.future_offsets", "[]", "--data.n_fit", "4", "--data.n_eval", "4"]
    evaluate.main(eval_args(tmp_path / "eval", tiny_model_dir, corpus, *fast))
    before = (tmp_path / "eval" / "results.json").read_text()
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(eval_args(tmp_path / "eval", tiny_model_dir, corpus, *fast, "--data.seed", "1"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "already holds an earlier run's results" in err and "--overwrite true" in err and "--model.output_dir" in err
    assert (tmp_path / "eval" / "results.json").read_text() == before
    evaluate.main(eval_args(tmp_path / "eval", tiny_model_dir, corpus, *fast, "--data.seed", "1", "--overwrite", "true"))
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["protocol"]["seed"] == 1
