"""The Patchscopes next-token evaluation as a ``LightningModule`` (run by ``trainer.test``).

Methods, each a mapping from the source state h_ℓ(t) to a next-token distribution (REFERENCE.md §4):

* ``logit``: h_ℓ decoded by the model's own final norm and head. As a patchscope this is h_ℓ
  written into the last block's output at the same position; the patching engine's tests show the
  two agree to < 1e-4, and decoding directly costs one head product instead of a forward pass.
* ``affine`` (and ``affine+k`` for future offsets): the least-squares affine map from h_ℓ(t) to
  the last block's output at t + k, fitted on the fitting documents before evaluation.
* every lens artifact given (``tuned``, ``tuned+1``, ...: trained by ``lenscope train``), decoded the same
  way, or, for a learned-prompt lens, run through the patching engine with its learned prompt;
* ``token_identity``: the token-identity patchscope (``lenscope.lenses.token_identity``);
* ``bigram`` (future offsets only): the Future Lens bigram baseline (``lenscope.evaluation.baselines``).

Metrics per layer, averaged over evaluation documents (one position each):

* offset 0, against the model's own output at t: ``precision@1`` (argmax agrees), ``precision@5``
  (the model's argmax is among the method's top 5), ``surprisal_nats`` (−ln p_model(argmax of the
  method), the paper's surprisal), ``kl_nats`` (KL(model ‖ method));
* future offset k (``future+k/...``): ``precision@1_model``, against the model's own prediction at
  t + k (teacher-forced on the real text), and ``precision@1_real``, against the real token at
  t + k + 1. Methods whose output is a next-token guess (logit, token identity) are scored here
  too, as the baselines a future lens must beat. With ``continuation: greedy`` the tokens after t
  are the model's own greedy continuation instead of the real text, as Future Lens labels its test
  set (GPT-J's ``generate``); the two columns then agree.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from tqdm.auto import tqdm

from lenscope.datamodules.preprocessing import OffsetPairs, offset_pairs
from lenscope.errors import ConfigError, check_finite
from lenscope.evaluation.baselines import bigram_successors
from lenscope.evaluation.report import markdown_tables, summary_lines, write_report
from lenscope.lenses.artifact import load_lens
from lenscope.lenses.learned_prompt import IDENTITY_PROMPT
from lenscope.lenses.least_squares import NormalEquations, update_on_subsets
from lenscope.lenses.lens import AffineLens, Lens, lens_key
from lenscope.lenses.metrics import PerLayerMeans
from lenscope.lenses.patchscope import Patchscope, Target
from lenscope.lenses.token_identity import token_identity
from lenscope.lenses.unembed import kl_divergence
from lenscope.loggers import wandb_locations
from lenscope.model.frozen import FrozenModel
from lenscope.model.loading import BaseModelSettings

log = logging.getLogger(__name__)

BUILT_IN = ("logit", "affine", "token_identity", "bigram")

SCORED_AT_ONCE = 2**24
"""Logits (layers × positions × vocabulary) scored at a time (memory, not results)."""


def states_at(residuals: torch.Tensor, layers: list[int], pairs: OffsetPairs) -> torch.Tensor:
    """h (len(layers), M, d) at the pairs' read positions t, gathered in one indexing (picking the
    layers first would copy every residual of the batch)."""
    index = torch.tensor(layers, device=residuals.device)
    return residuals[index[:, None], pairs.rows[None, :], pairs.at[None, :]]


@dataclass
class Ahead:
    """The read positions t whose document has the real token after t + k, for offset k."""

    source: torch.Tensor
    """(n,) index of t among the read positions."""
    final: torch.Tensor
    """(n, d) the last block's output at t + k (the model's own guess there)."""
    token: torch.Tensor
    """(n,) the real token at t + k (the bigram baseline reads it)."""
    next_token: torch.Tensor
    """(n,) the real token after t + k."""


@dataclass
class ReadPositions:
    """What scoring needs of read positions: kept from each batch's model pass until enough are
    gathered to decode them together."""

    h: torch.Tensor
    """(num_layers, P, d) the source states at every lensed layer."""
    final: torch.Tensor
    """(P, d) the last block's output at t (the model's own distribution there)."""
    ahead: dict[int, Ahead]

    @property
    def count(self) -> int:
        return self.h.shape[1]

    @classmethod
    def of(cls, batch: dict, residuals: torch.Tensor, layers: list[int], offsets: list[int]) -> ReadPositions:
        """A batch's read positions (every one, in row-major order), from its residual stream."""
        here = offset_pairs(batch, 0)
        ahead = {}
        for k in offsets:
            pairs = offset_pairs(batch, k)
            scored = pairs.next_token >= 0
            rows, at = pairs.rows[scored], pairs.at[scored]
            ahead[k] = Ahead(pairs.source[scored], residuals[-1][rows, at], batch["input_ids"][rows, at],
                             pairs.next_token[scored])
        return cls(states_at(residuals, layers, here), residuals[-1][here.rows, here.at], ahead)

    @staticmethod
    def cat(parts: list[ReadPositions]) -> ReadPositions:
        """Several batches' read positions as one (each batch's ``source`` indices shifted by the
        positions before it)."""
        starts = torch.tensor([0, *(p.count for p in parts)]).cumsum(0).tolist()
        ahead = {k: Ahead(torch.cat([p.ahead[k].source + start for p, start in zip(parts, starts[:-1], strict=True)]),
                          *(torch.cat([getattr(p.ahead[k], name) for p in parts]) for name in ("final", "token", "next_token")))
                 for k in parts[0].ahead}
        return ReadPositions(torch.cat([p.h for p in parts], 1), torch.cat([p.final for p in parts]), ahead)


class PatchscopeEvaluation(L.LightningModule):
    def __init__(
        self,
        base: BaseModelSettings = BaseModelSettings(),  # noqa: B008 (frozen, never mutated)
        lenses: list[str] = [],  # noqa: B006 (jsonargparse needs a plain default; never mutated)
        methods: list[str] = ["logit", "affine", "token_identity", "bigram"],  # noqa: B006
        future_offsets: list[int] = [1, 2, 3],  # noqa: B006
        identity_prompt: str = IDENTITY_PROMPT,
        patchscopes: dict[str, Target] = {},  # noqa: B006 (never mutated)
        ridge: float = 1e-3,
        rows_per_pass: int = 256,
        positions_per_decode: int = 256,
        continuation: str = "text",
        output_dir: str = "results/patchscopes",
    ):
        """
        Args:
            base: the frozen base model (``--model.base.name``, ``.revision``, ``.dtype``).
            lenses: lens artifact folders written by ``lenscope train`` (tuned lenses, future lenses,
                affine and learned-prompt lenses); each is scored at its own offset.
            methods: built-in methods to score: ``logit``, ``affine`` (least squares, fitted here
                on the fitting documents), ``token_identity``, ``bigram`` (future offsets only).
            future_offsets: offsets k ≥ 1 scored against the model's prediction k tokens ahead
                (and the real token); the lenses' own offsets are added.
            identity_prompt: target prompt of the token-identity patchscope; h_ℓ goes at its last token.
            patchscopes: more patchscopes to score, by name: a target each (``prompt``, None for
                the source prompt itself; ``layers``, ``same``, ``last`` or one residual index;
                ``placeholder``), read as the next-token distribution at the written position.
            ridge: relative ridge term of the least-squares fit.
            rows_per_pass: (layer, example) pairs per batched token-identity forward pass.
            positions_per_decode: the methods decode the read positions of several batches of
                documents at once, as soon as at least this many are gathered (and the rest at the
                end). Memory, not results: each method's logits (num_layers × positions × vocabulary,
                float32) for up to this many positions plus one batch's are held together.
            continuation: what follows each evaluated read position t, for the future offsets:
                ``text`` (the real text) or ``greedy`` (the model's own greedy continuation of the
                document up to t, as Future Lens labels its test set).
            output_dir: folder for results.json, results.csv, results.md and one PNG per metric.
        """
        super().__init__()
        base = BaseModelSettings.of(base)
        self.save_hyperparameters()
        self.hparams.base = asdict(base)
        unknown = sorted(set(methods) - set(BUILT_IN))
        if unknown:
            raise ConfigError(f"--model.methods has unknown {unknown}; use some of {list(BUILT_IN)} "
                              "(trained lenses are given with --lenses)")
        if any(k < 1 for k in future_offsets):
            raise ConfigError(f"--model.future_offsets must all be >= 1, got {future_offsets}")
        if rows_per_pass < 1:
            raise ConfigError(f"--model.rows_per_pass must be at least 1, got {rows_per_pass}")
        if positions_per_decode < 1:
            raise ConfigError(f"--model.positions_per_decode must be at least 1, got {positions_per_decode}")
        if continuation not in ("text", "greedy"):
            raise ConfigError(f"--model.continuation must be 'text' or 'greedy', got {continuation!r}")
        check_finite("--model.ridge", ridge)
        self.frozen = FrozenModel.load(base)
        self.base = self.frozen.hf  # registered as a submodule: Lightning places it on the device
        self.layers = self.frozen.layers  # residual indices 0..L-1, as the lenses

        # Lens artifacts, named by type and offset ("tuned", "tuned+2"); a name taken by a built-in
        # method or another artifact gets the artifact's folder name appended.
        self.lenses = torch.nn.ModuleDict()
        self.artifacts: dict[str, str] = {}
        loaded_lenses = [(path, load_lens(path, unembed_hash=self.frozen.unembed_hash, num_hidden_layers=self.frozen.adapter.num_layers))
                         for path in lenses]
        lens_offsets = {lens.offset for _, lens in loaded_lenses}
        self.future_offsets = sorted(set(future_offsets) | (lens_offsets - {0}))
        self.fit_offsets = [0, *self.future_offsets] if "affine" in methods else []
        reserved = set(BUILT_IN) | {lens_key("affine", k) for k in self.fit_offsets}
        for path, lens in loaded_lenses:
            if lens.layers != self.layers:
                raise ConfigError(f"lens {path} covers residual indices {lens.layers}; the evaluation needs all of "
                                  f"{self.layers[0]}..{self.layers[-1]}")
            key = lens.key
            if key in self.lenses or key in reserved:
                key = f"{key}:{Path(path).name}"
            if hasattr(lens, "rows_per_pass"):  # a patchscope lens: as many rows per pass as the others
                lens.rows_per_pass = rows_per_pass
            self.lenses[key] = lens
            self.artifacts[key] = str(path)
        self.fitted = torch.nn.ModuleDict()  # the least-squares affine lenses, fitted in on_test_start
        # Each method is a patchscope (REFERENCE.md §4): the logit lens and every affine lens write
        # h_ℓ (mapped) into the last block's output of the source prompt itself; token identity
        # writes it at the identity prompt's last token, same layer. A learned-prompt lens is a
        # patchscope with a learned target prompt and decodes itself (lens.logits).
        self.scopes: dict[str, Patchscope] = {"logit": Patchscope(target=Target(layers="last"))}
        if "token_identity" in methods:
            self.scopes["token_identity"] = token_identity(identity_prompt, rows_per_pass)
        self.scopes.update({key: self._lens_scope(lens) for key, lens in self.lenses.items() if lens.translates})
        for name, target in patchscopes.items():
            if name in self.scopes or name in reserved or name in self.lenses:
                raise ConfigError(f"--model.patchscopes names {name!r}, which a method or lens already has; rename it")
            if not (target.layers in ("same", "last") or (not isinstance(target.layers, str) and len(target.layers) == 1)):
                raise ConfigError(f"--model.patchscopes {name!r}: layers must be 'same', 'last' or one residual index "
                                  f"(one next-token distribution per source layer), got {target.layers!r}")
            self.scopes[name] = Patchscope(target=target, rows_per_pass=rows_per_pass)
        self.bigram: torch.Tensor | None = None
        self.fit_positions: dict[int, int] = {}
        self.underdetermined: dict[str, dict[str, int]] = {}  # fits with fewer positions than unknowns
        self.metrics = PerLayerMeans(self._series(), len(self.layers))
        self.results: dict | None = None
        self._pending: list[ReadPositions] = []  # read positions not yet decoded

    def _next_token_methods(self) -> list[str]:
        methods = [m for m in ("logit", "affine", "token_identity") if m in self.hparams.methods]
        return methods + [key for key, lens in self.lenses.items() if lens.offset == 0] + list(self.hparams.patchscopes)

    def _future_methods(self, k: int) -> list[str]:
        methods = [m for m in ("logit", "token_identity") if m in self.hparams.methods] + list(self.hparams.patchscopes)
        if "affine" in self.hparams.methods:
            methods.append(lens_key("affine", k))
        methods += [key for key, lens in self.lenses.items() if lens.offset == k]
        if "bigram" in self.hparams.methods:
            methods.append("bigram")
        return methods

    def _series(self) -> list[tuple[str, str]]:
        series = [(m, method) for m in ("precision@1", "precision@5", "surprisal_nats", "kl_nats")
                  for method in self._next_token_methods()]
        for k in self.future_offsets:
            series += [(f"future+{k}/precision@1_{against}", method)
                       for against in ("model", "real") for method in self._future_methods(k)]
        return series

    # --- fitting: the least-squares affine lenses and the bigram table --------------------------------
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        max_offset = datamodule.hparams.max_offset
        if self.future_offsets and max(self.future_offsets) > max_offset:
            raise ConfigError(f"offsets up to {max(self.future_offsets)} are scored but --data.max_offset is {max_offset}; "
                              f"raise --data.max_offset to {max(self.future_offsets)}")

    def on_test_start(self) -> None:
        datamodule = self.trainer.datamodule
        self._pending = []
        if self.hparams.continuation == "greedy" and self.future_offsets:
            self._continue_greedily(datamodule.test_samples(), datamodule.hparams.max_offset + 1)
        if "bigram" in self.hparams.methods and self.future_offsets:
            self.bigram = bigram_successors(datamodule.fit_tokens, self.frozen.adapter.vocab_size).to(self.device)
        if not self.fit_offsets:
            return
        d = self.frozen.adapter.d_model
        equations = {k: NormalEquations(len(self.layers), d, self.device) for k in self.fit_offsets}
        loader = datamodule.fit_dataloader()
        for batch in tqdm(loader, desc="Fitting the affine lens", disable=self.global_rank != 0, leave=False):
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            residuals = self.frozen.reader.read(batch["input_ids"], batch["attention_mask"])
            # Offset k fits on the read positions whose t + k is in the document: subsets of the
            # read positions (offset 0's pairs, always fitted), so their equations share one
            # product (update_on_subsets).
            pairs = {k: offset_pairs(batch, k) for k in equations}
            update_on_subsets(list(equations.values()), states_at(residuals, self.layers, pairs[0]),
                              [(pairs[k].source, residuals[-1][pairs[k].rows, pairs[k].at]) for k in equations])
        for k in equations:
            # Each rank fitted on its share of the documents: sum the normal equations once.
            eq = equations[k] = equations[k].summed(lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
            if eq.count == 0:
                raise ConfigError("no fitting positions for the affine lens; raise --data.n_fit or drop 'affine' from --model.methods")
            key = lens_key("affine", k)
            if eq.underdetermined:  # warned by the fit; marked in the report, never listed first
                self.underdetermined[key] = {"positions": eq.count, "unknowns": eq.unknowns}
            self.fitted[key] = eq.fit(AffineLens(self.layers, d, bias=True, offset=k).to(self.device), self.hparams.ridge)
            self.scopes[key] = self._lens_scope(self.fitted[key])
        self.fit_positions = {k: eq.count for k, eq in equations.items()}
        log.info("affine lenses fitted on %s positions (by offset)", self.fit_positions)

    @torch.no_grad()
    def _continue_greedily(self, samples: list[dict], length: int) -> None:
        """Replace the tokens after each sample's last read position by the model's greedy
        continuation of ``length`` tokens (in place: the samples the test loader batches)."""
        for sample in tqdm(samples, desc="Greedy continuations", disable=self.global_rank != 0, leave=False):
            end = sample["positions"][-1] + 1
            prefix = torch.tensor([sample["input_ids"][:end]], device=self.device)
            sample["input_ids"] = [*sample["input_ids"][:end], *self.frozen.engine.generate(prefix, max_new_tokens=length)[0].tolist()]
            sample["labels"] = [sample["input_ids"][t + 1] for t in sample["positions"]]

    # --- scoring --------------------------------------------------------------------------------------
    @staticmethod
    def _lens_scope(lens: Lens) -> Patchscope:
        """An affine lens as a patchscope: mapping = its translator, written into the last block."""
        return Patchscope(target=Target(layers="last"), mapping=lens)

    def _decode(self, method: str, h: torch.Tensor) -> torch.Tensor:
        """(num_layers, B, d) → (num_layers, B, V) fp32 logits of a method."""
        if method in self.scopes:
            return self.scopes[method].patch(self.frozen, h, self.layers).logits
        return self.lenses[method].logits(self.frozen, h)  # a learned target prompt

    def test_step(self, batch: dict, batch_idx: int) -> None:
        # One model pass per batch of documents; the methods decode many batches' read positions
        # at once (positions_per_decode): a patched method's passes then hold rows of few layers
        # each, and every pass and product is larger.
        residuals = self.frozen.reader.read(batch["input_ids"], batch["attention_mask"])
        self._pending.append(ReadPositions.of(batch, residuals, self.layers, self.future_offsets))
        if sum(p.count for p in self._pending) >= self.hparams.positions_per_decode:
            self._score_pending()

    def _score_pending(self) -> None:
        if self._pending:
            read, self._pending = ReadPositions.cat(self._pending), []
            self._score(read)

    def _score(self, read: ReadPositions) -> None:
        """Update every metric with every method's decoding of the read positions."""
        model_logp = self.frozen.log_probs(read.final)  # (P, V) fp32
        model_top1 = model_logp.argmax(-1)
        top1: dict[str, torch.Tensor] = {}  # method → (num_layers, P) argmax, reused for future offsets
        ahead = {k: a for k, a in read.ahead.items() if len(a.source)}  # offsets some document has the real token after
        guessed = [m for k in ahead for m in self._future_methods(k) if m != "bigram"]  # from top1 or decoded
        progress = tqdm(total=len(self._next_token_methods()) + len(guessed), desc=f"Decoding {read.count} positions",
                        disable=self.global_rank != 0, leave=False)
        for method in self._next_token_methods():
            logits = self._decode(method, read.h)
            top1[method] = self._score_next_token(method, logits, model_logp, model_top1)
            progress.update()
        for k, at_k in ahead.items():
            model_k = self.frozen.adapter.decode(at_k.final).argmax(-1)  # the model's own guess at t + k
            for method in self._future_methods(k):
                if method == "bigram":  # the most frequent successor of the real token at t + k
                    guess = self.bigram[at_k.token].expand(len(self.layers), -1)
                else:
                    guess = top1[method][:, at_k.source] if method in top1 else self._decode(method, read.h[:, at_k.source]).argmax(-1)
                    progress.update()
                self.metrics.update(f"future+{k}/precision@1_model", method, guess == model_k)
                self.metrics.update(f"future+{k}/precision@1_real", method, guess == at_k.next_token)
        progress.close()

    def _score_next_token(self, method: str, logits: torch.Tensor, model_logp: torch.Tensor,
                          model_top1: torch.Tensor) -> torch.Tensor:
        """Update the offset-0 metrics of ``method``; logits (num_layers, B, V). Returns its argmax."""
        # A few layers at a time: the log-softmax and KL of all of them at once would be several
        # copies of the logits, each fresh memory.
        top5, kl = [], []
        for chunk in logits.split(max(1, SCORED_AT_ONCE // max(logits[0].numel(), 1))):
            logq = torch.log_softmax(chunk, -1)
            top5.append(logq.topk(5, dim=-1).indices)  # (layers, B, 5)
            kl.append(kl_divergence(model_logp, logq))
        top5 = torch.cat(top5)
        top1 = top5[..., 0]
        self.metrics.update("precision@1", method, top1 == model_top1)
        self.metrics.update("precision@5", method, (top5 == model_top1.unsqueeze(-1)).any(-1))
        self.metrics.update("surprisal_nats", method, -model_logp.gather(-1, top1.T).T)
        self.metrics.update("kl_nats", method, torch.cat(kl))
        return top1

    def on_test_epoch_end(self) -> None:
        self._score_pending()
        computed = self.metrics.compute()  # one synchronisation for every layer, method and metric
        values, counts = computed["means"], computed["counts"]
        self.metrics.reset()
        datamodule = self.trainer.datamodule
        self.results = {
            "model": self.hparams.base["name"], "revision": self.frozen.revision, "layers": self.layers,
            "protocol": {k: datamodule.hparams[k] for k in ("source", "seed", "n_fit", "n_eval", "max_words", "max_chars",
                                                             "holdout_every", "fit_positions", "seq_len")}
            | {"continuation": self.hparams.continuation},
            "documents": {"fit": len(datamodule.fit_samples), "eval": len(datamodule.eval_samples)},
            "affine_fit_positions": {f"+{k}" if k else "0": n for k, n in self.fit_positions.items()},
            "underdetermined_fits": self.underdetermined,
            "lenses": self.artifacts,
            "metrics": values, "counts": counts,
            "units": "precision: fraction of positions; surprisal and KL: nats per position",
        }
        self._report()

    @rank_zero_only
    def _report(self) -> None:
        wandb_runs = [lg.experiment for lg in self.trainer.loggers if isinstance(lg, WandbLogger)]
        out = Path(self.hparams.output_dir)
        written = write_report(self.results, out, wandb_runs)
        pngs = [p for p in written if p.suffix == ".png"]
        print(f"\n{markdown_tables(self.results)}")
        print("\n".join(summary_lines(self.results)))
        print("\n".join([f"Results:         {out / 'results.md'}, {out / 'results.json'}, {out / 'results.csv'}",
                         f"Plots:           {len(pngs)} PNGs in {out}", *wandb_locations(self.trainer)]))
