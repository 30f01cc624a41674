"""Prediction trajectories: what every layer predicts at every token of one prompt, under one or
several lenses side by side.

    traj = lens.trajectory(model, "The capital of France is")       # this lens (and the logit lens)
    traj = Trajectory.of(model, "The capital of France is", [logit, tuned, tuned_plus_1])
    traj.to_html("traj.html"); traj.to_png("traj.png"); print(traj)

For each lens, layer and position: the top-k tokens with their probabilities, the entropy of the
lens's distribution, its KL divergence from the model's own output distribution (for a future lens
of offset k: from the model's distribution at position t + k, the one it predicts), and the rank
and probability of the real token it should predict (at t + 1 + k). The model's own output is the
top row of every panel.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lenscope.errors import ConfigError
from lenscope.files import atomic_path
from lenscope.lenses.lens import bind_lenses, residual_name
from lenscope.lenses.unembed import NATS_PER_BIT, kl_divergence

if TYPE_CHECKING:
    from lenscope.lenses.lens import Lens
    from lenscope.model.frozen import FrozenModel

STATISTICS = {
    "entropy": "entropy of the prediction (bits)",
    "kl": "KL(model ‖ lens) (bits)",
    "target_prob": "probability of the real token",
    "target_rank": "rank of the real token (1 = top)",
    "top_prob": "probability of the top token",
}
"""What a heatmap's colour can show (``stat``), with its legend."""



@dataclass
class Panel:
    """One lens's view of the prompt. Arrays are (rows, positions); row 0 is the model's own
    output, row i + 1 the lens at ``layers[i]``; NaN where a statistic does not exist (no real
    token that far ahead)."""

    name: str
    offset: int
    layers: list[int]
    top_ids: torch.Tensor
    """(rows, positions, k) token ids, most probable first."""
    top_probs: torch.Tensor
    """(rows, positions, k)."""
    stats: dict[str, torch.Tensor]
    """``STATISTICS`` key → (rows, positions)."""


class Trajectory:
    """Per-layer, per-position predictions of one prompt under one or several lenses."""

    def __init__(self, tokens: list[str], panels: list[Panel], decode, row_names: list[str]):
        self.tokens = tokens
        """The prompt's tokens as text."""
        self.panels = panels
        self._decode = decode
        self.row_names = row_names
        """``output`` then the lensed residuals, top to bottom as drawn (last layer first)."""

    # --- computing -----------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def of(cls, model: FrozenModel, text: str, lenses: list[Lens], k: int = 5) -> Trajectory:
        """Run ``model`` once on ``text`` and decode every layer with each lens."""
        if not text:
            raise ConfigError("the prompt is empty; give the text whose predictions to show")
        if not 1 <= k <= min(100, model.vocab_size):
            raise ConfigError(f"k (top tokens kept per cell) must be between 1 and {min(100, model.vocab_size)}, got {k}")
        if not lenses:
            raise ConfigError("no lens to show; give at least one (the logit lens needs nothing trained)")
        for lens in lenses:
            if lens.d_model != model.d_model or max(lens.layers) >= model.num_layers:
                raise ConfigError(f"the {lens.key} lens (width {lens.d_model}, layers {lens.layers[0]}..{lens.layers[-1]}) "
                                  f"does not fit this model (width {model.d_model}, {model.num_layers} layers)")
        # A lens made for another model decodes nothing meaningful here; bound only once all fit, so
        # that a refused call binds no lens to a model it never decoded.
        bind_lenses(lenses, model)
        ids = model.tokenize(text)
        h = model.residuals(ids)
        model_logp = model.log_probs(h[-1])[0].cpu()  # (T, V); the statistics are small, kept on the CPU
        token_ids = ids[0].tolist()
        panels = []
        layers = None
        names = [lens.key for lens in lenses]
        for lens in lenses:
            if layers is not None and lens.layers != layers:
                raise ConfigError(f"the lenses cover different layers ({layers} and {lens.layers}); show lenses of one model")
            layers = lens.layers
            logp = torch.log_softmax(lens.prompt_logits(model, h[lens.layers], ids)[:, 0], dim=-1).cpu()  # (L, T, V)
            name = lens.key if names.count(lens.key) == 1 else f"{lens.key} #{len(panels) + 1}"
            panels.append(_panel(name, lens.offset, lens.layers, logp, model_logp, token_ids, k))
        # Drawn top to bottom: the model's output, then the last lensed layer down to the embeddings.
        rows = ["output"] + [residual_name(i) for i in reversed(layers or [])]
        return cls([model.tokenizer.decode([t]) for t in token_ids], panels, model.tokenizer.decode, rows)

    # --- what it shows --------------------------------------------------------------------------
    def select(self, names: list[str]) -> Trajectory:
        """The same trajectory with only the panels named (in that order), e.g. to draw the
        originals and their patchscope versions as two figures."""
        by_name = {panel.name: panel for panel in self.panels}
        missing = [name for name in names if name not in by_name]
        if missing:
            raise ConfigError(f"no panel named {missing}; this trajectory has {list(by_name)}")
        return Trajectory(self.tokens, [by_name[name] for name in names], self._decode, self.row_names)

    def grid(self, panel: Panel, stat: str) -> torch.Tensor:
        """(rows, positions) of ``stat``, in drawing order (output first, then last layer first)."""
        if stat not in STATISTICS:
            raise ConfigError(f"unknown statistic {stat!r}; use one of {', '.join(STATISTICS)}")
        return _drawing_order(panel.stats[stat])

    def top_tokens(self, panel: Panel) -> list[list[list[tuple[str, float]]]]:
        """[row][position] → [(token, probability), ...] in drawing order."""
        ids, probs = _drawing_order(panel.top_ids), _drawing_order(panel.top_probs)
        return [[[(self._decode([int(i)]), float(p)) for i, p in zip(ids[r, t], probs[r, t], strict=True)]
                 for t in range(ids.shape[1])] for r in range(ids.shape[0])]

    def __str__(self) -> str:
        """A terminal table per lens: the top token at every layer (rows) and position (columns)."""
        width = 10
        out = []
        for panel in self.panels:
            tops = self.top_tokens(panel)
            out.append(f"{panel.name}: top token per layer (rows) and position (columns)")
            header = " " * 12 + "".join(_cell(tok, width) for tok in self.tokens)
            out.append(header)
            for name, row in zip(self.row_names, tops, strict=True):
                out.append(f"{name:>11} " + "".join(_cell(cells[0][0], width) for cells in row))
            out.append("")
        return "\n".join(out).rstrip() + "\n"

    def to_html(self, path: str | Path, stat: str = "entropy") -> Path:
        """An interactive heatmap per lens, side by side on one colour scale: the top token written
        in every cell, the top-k with probabilities on hover."""
        figure = self.figure(stat)
        path = Path(path)
        with atomic_path(path, suffix=".html") as tmp:
            # The plotting library is embedded in the page, so it opens offline.
            figure.write_html(tmp, include_plotlyjs=True, full_html=True)
        return path

    def to_png(self, path: str | Path, stat: str = "entropy") -> Path:
        """The same heatmaps as a picture (matplotlib: no browser needed)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        values = [self.grid(panel, stat).numpy() for panel in self.panels]
        vmin, vmax = _colour_range(values, stat)
        rows, cols = values[0].shape
        fig, axes = plt.subplots(1, len(self.panels), squeeze=False, sharey=True,
                                 figsize=(1.0 + 0.95 * cols * len(self.panels) + 1.2, 1.2 + 0.28 * rows),
                                 constrained_layout=True)
        cmap = plt.get_cmap(_colour_map(stat)).with_extremes(bad="#eeeeee")  # grey: nothing to show
        for ax, panel, grid in zip(axes[0], self.panels, values, strict=True):
            image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            for r, row in enumerate(self.top_tokens(panel)):
                for c, cells in enumerate(row):
                    value = grid[r, c]
                    high = (value - vmin) / max(vmax - vmin, 1e-9) > 0.55
                    # Blues are dark at the top of the scale, viridis at the bottom.
                    white = not math.isnan(value) and (high if stat in ("target_prob", "top_prob") else not high)
                    ax.text(c, r, _short(cells[0][0], 8), ha="center", va="center", fontsize=7,
                            color="white" if white else "black")
            ax.set_xticks(range(cols), [_short(t, 10) for t in self.tokens], rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(rows), self.row_names, fontsize=7)
            ax.set_title(_title(panel), fontsize=10)
            ax.axhline(0.5, color="black", linewidth=1.0)  # the model's own output above the line
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label=STATISTICS[stat])
        path = Path(path)
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=130, format="png")
        plt.close(fig)
        return path

    def figure(self, stat: str = "entropy"):
        """The interactive heatmaps as a plotly figure (what ``to_html`` writes; a web app shows it)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        values = [self.grid(panel, stat) for panel in self.panels]
        vmin, vmax = _colour_range([v.numpy() for v in values], stat)
        fig = make_subplots(rows=1, cols=len(self.panels), shared_yaxes=True, horizontal_spacing=0.02,
                            subplot_titles=[_title(p) for p in self.panels])
        columns = [f"{i}: {t}" for i, t in enumerate(self.tokens)]  # unique labels for repeated tokens
        for i, (panel, grid) in enumerate(zip(self.panels, values, strict=True)):
            tops = self.top_tokens(panel)
            text = [[html.escape(_short(cells[0][0], 8)) for cells in row] for row in tops]
            hover = [[f"<b>{html.escape(self.row_names[r])}</b>, after {html.escape(repr(self.tokens[c]))}<br>"
                      f"{STATISTICS[stat]}: {_fmt(grid[r, c])}<br>"
                      + "<br>".join(f"{html.escape(repr(tok))}: {p:.3f}" for tok, p in cells)
                      for c, cells in enumerate(row)] for r, row in enumerate(tops)]
            fig.add_trace(go.Heatmap(
                z=grid.tolist(), x=columns, y=self.row_names, text=text, texttemplate="%{text}",
                textfont={"size": 10}, hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
                coloraxis="coloraxis"), row=1, col=i + 1)
        fig.update_yaxes(autorange="reversed")
        fig.update_layout(
            coloraxis={"colorscale": _colour_map(stat), "cmin": vmin, "cmax": vmax,
                       "colorbar": {"title": {"text": STATISTICS[stat]}}},
            height=160 + 22 * len(self.row_names), width=220 + 70 * len(self.tokens) * len(self.panels),
            title={"text": "Prediction trajectory: the top token of every layer at every position"},
            margin={"l": 90, "r": 30, "t": 80, "b": 90})
        return fig


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last dimension. As a contraction (one pass, no (…, V) temporary);
    where that is not finite (a token of probability 0 has log p = −inf, and 0 · −inf is NaN) the
    row is recomputed exactly: 0 · log 0 = 0, while a NaN (a diverged lens) stays NaN."""
    entropy = -torch.einsum("...v,...v->...", logp.exp(), logp)
    bad = ~entropy.isfinite()
    if bad.any():
        p = logp[bad].exp()
        entropy[bad] = -torch.special.xlogy(p, p).sum(-1)
    return entropy


def _kl_from(model_logp: torch.Tensor, model_entropy: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(model ‖ q) in nats: −H(model) − Σ p log q, the cross term as a contraction over the
    vocabulary; rows where that is not finite are recomputed by ``kl_divergence`` (a token the
    model gives 0 adds 0, a NaN stays NaN). model_logp (T, V), logq (L, T, V) → (L, T)."""
    kl = -model_entropy - torch.einsum("tv,ltv->lt", model_logp.exp(), logq)
    bad = ~kl.isfinite()
    if bad.any():
        rows = bad.nonzero(as_tuple=True)
        kl[bad] = kl_divergence(model_logp[rows[1]], logq[bad])
    return kl


def _panel(name: str, offset: int, layers: list[int], logp: torch.Tensor, model_logp: torch.Tensor,
           token_ids: list[int], k: int) -> Panel:
    """Statistics of one lens (``logp``: (L, T, V)) with the model's output as row 0. Each statistic
    is one pass over the (L, T, V) log-probabilities: a trajectory's panels are memory-bound."""
    n = len(token_ids)
    model_entropy = _entropy(model_logp)
    entropy = torch.cat([model_entropy[None], _entropy(logp)]) / NATS_PER_BIT
    # What the lens predicts at t is the model's distribution at t + offset (row 0: the model at t).
    kl = torch.full(entropy.shape, float("nan"))
    kl[0] = 0.0
    if n > offset:
        kl[1:, : n - offset] = _kl_from(model_logp[offset:], model_entropy[offset:], logp[:, : n - offset]) / NATS_PER_BIT
    # The real token: at t + 1 for the model's own row, at t + 1 + offset for the lens.
    target_prob = torch.full(entropy.shape, float("nan"))
    target_rank = torch.full(entropy.shape, float("nan"))
    for row, lp_all, ahead in ((slice(0, 1), model_logp[None], 1), (slice(1, None), logp, 1 + offset)):
        if n > ahead:
            real = torch.tensor(token_ids[ahead:])  # (n - ahead,)
            lp = lp_all[:, : n - ahead]  # (rows, n - ahead, V)
            real_lp = lp.gather(-1, real.view(1, -1, 1).expand(lp.shape[0], -1, 1))
            target_prob[row, : n - ahead] = real_lp[..., 0].exp()
            rank = (lp > real_lp).float().sum(-1) + 1
            target_rank[row, : n - ahead] = torch.where(real_lp[..., 0].isnan(), float("nan"), rank)
    model_top, lens_top = model_logp[None].topk(k, dim=-1), logp.topk(k, dim=-1)
    top_ids = torch.cat([model_top.indices, lens_top.indices])
    top_probs = torch.cat([model_top.values, lens_top.values]).exp()
    return Panel(name=name, offset=offset, layers=list(layers), top_ids=top_ids, top_probs=top_probs,
                 stats={"entropy": entropy, "kl": kl, "target_prob": target_prob, "target_rank": target_rank,
                        "top_prob": top_probs[..., 0]})


def _title(panel: Panel) -> str:
    # A future lens at column t predicts the token at t + 1 + k (the output row: the one at t + 1).
    ahead = f" (lens rows: the token {panel.offset + 1} ahead)" if panel.offset else ""
    return f"{panel.name} lens{ahead}"


def _drawing_order(x: torch.Tensor) -> torch.Tensor:
    """Row 0 (the output) stays first; the lensed layers go last layer first."""
    return torch.cat([x[:1], x[1:].flip(0)])


def _colour_range(values, stat: str) -> tuple[float, float]:
    if stat in ("target_prob", "top_prob"):
        return 0.0, 1.0
    finite = [float(v) for grid in values for v in grid.ravel() if not math.isnan(float(v))]
    high = max(finite) if finite else 1.0
    if stat == "target_rank":
        return 1.0, max(high, 2.0)
    return 0.0, max(high, 1e-6)


def _colour_map(stat: str) -> str:
    """A name both matplotlib and plotly know. High probability reads as "sure" (dark); high
    entropy, KL or rank as "lost" (bright)."""
    return "Blues" if stat in ("target_prob", "top_prob") else "viridis"


def _short(token: str, width: int) -> str:
    shown = token.replace("\n", "\\n").replace("\t", "\\t")
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def _cell(token: str, width: int) -> str:
    return _short(token, width - 1).ljust(width)


def _fmt(value) -> str:
    value = float(value)
    return "n/a" if math.isnan(value) else f"{value:.3g}"
