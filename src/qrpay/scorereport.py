"""A scorecard report for a credit analyst: the score distribution with the
cut-off and the limit bands, the bad rate per band, PSI per feature against
a baseline and the most common reason codes, as charts and tables in one
self-contained HTML file (docs/SCORING.md, Reports).

`build` does the numbers (numpy only); `charts` draws them with matplotlib
(the `report` extra: `pip install 'qrpay[report]'`, imported only here and
only when drawing, on the Agg backend with no pyplot state); `to_html` puts
both in one page with the charts as base64 PNG, so the file opens anywhere
with no network.
"""

from __future__ import annotations

import base64
import html
import importlib
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from qrpay import _args
from qrpay.errors import InvalidArgument, QrPayError, Reason
from qrpay.scoring import LimitPolicy, Scorecard, auc, feature_psi, psi

MAX_SCALING_BANDS = 10      # bands of pdo points, widened to stay at most this many
CARD_RANGE_BANDS = 8        # bands over the card's possible range when it has no scaling
PSI_LOOK, PSI_ACT = 0.1, 0.25
TOP_REASONS = 12            # features drawn in the reason chart (the table has them all)

# One colour per chart, used nowhere else on the page: a reader (or a test)
# can tell each chart apart in a screenshot.
COLOURS = {"distribution": "#1f77b4", "bad_rate": "#ff7f0e", "psi": "#17becf",
           "reasons": "#9467bd"}
CUTOFF_COLOUR = "#d62728"
CHART_SIZE = (10.0, 4.2)    # inches at 100 dpi: 1000 x 420 pixels
CHART_DPI = 100

Ints = npt.NDArray[np.int64]


class ReportSupportMissing(QrPayError, RuntimeError):
    """matplotlib is not installed: pip install 'qrpay[report]'."""

    reason = Reason.INVALID_ARGUMENT


@dataclass(frozen=True)
class Band:
    """Scores `low <= s < high` (either end may be infinite)."""

    label: str
    low: float
    high: float
    rows: int
    bads: int | None                 # with a label only
    bad_rate: float | None           # None without a label or without rows
    limits: Mapping[str, int] | None  # a policy's limits per scene (None without a policy)
    odds: float | None               # the card's odds good:bad at `low` (with scaling)


@dataclass(frozen=True)
class ReasonCount:
    feature: str
    first: int      # rows whose first reason it is
    any: int        # rows with it among their first k reasons


@dataclass(frozen=True)
class ScoreReport:
    card_id: str
    card_version: int
    rows: int
    scores: Ints
    band_source: str                 # "policy", "card scaling" or "card range"
    bands: tuple[Band, ...]
    cutoff: int | None
    below_cutoff: int | None
    bad_rate: float | None           # overall, with a label
    auc: float | None                # with a label holding goods and bads
    psi: Mapping[str, float] | None  # per feature, with a baseline
    score_psi: float | None
    baseline_rows: int | None
    reasons: tuple[ReasonCount, ...]
    reason_k: int
    no_reason: int                   # rows that lost no points on any feature
    title: str

    def as_dict(self) -> dict[str, Any]:
        """The numbers (not the scores) as plain data: `qrpay score report --json`."""
        def number(x: float) -> float | None:
            return x if math.isfinite(x) else None
        return {
            "card_id": self.card_id, "card_version": self.card_version, "rows": self.rows,
            "score_min": int(self.scores.min()), "score_median": float(np.median(self.scores)),
            "score_max": int(self.scores.max()),
            "cutoff": self.cutoff, "below_cutoff": self.below_cutoff,
            "band_source": self.band_source,
            "bands": [{"label": b.label, "low": number(b.low), "high": number(b.high),
                       "rows": b.rows, "bads": b.bads, "bad_rate": b.bad_rate,
                       "limits": None if b.limits is None else dict(b.limits),
                       "odds": b.odds} for b in self.bands],
            "bad_rate": self.bad_rate, "auc": self.auc,
            "psi": None if self.psi is None else dict(self.psi), "score_psi": self.score_psi,
            "baseline_rows": self.baseline_rows,
            "reason_k": self.reason_k, "no_reason": self.no_reason,
            "reasons": [{"feature": r.feature, "first": r.first, "any": r.any}
                        for r in self.reasons],
        }


# -- the numbers ----------------------------------------------------------------------------

def build(card: Scorecard, X: npt.ArrayLike, *, bad: npt.ArrayLike | None = None,
          baseline: npt.ArrayLike | None = None, policy: LimitPolicy | None = None,
          cutoff: int | None = None, reasons: int = 3, threads: int = 1,
          title: str = "") -> ScoreReport:
    """The report's numbers for rows X (one column per card feature, in the
    card's order; NaN = missing). `bad` (1 = defaulted, one per row) adds
    the bad rate per band and the AUC; `baseline` (rows in the same columns)
    adds PSI per feature over the card's bins and PSI of the score. Bands
    come from `policy` (its lowest band is the cut-off), else from the card:
    every `pdo` points from `base_score` when the card has its scaling,
    otherwise equal slices of the scores the card can give. `cutoff` draws
    a cut-off without a policy. Raises InvalidArgument for bad input."""
    if not isinstance(card, Scorecard):
        raise InvalidArgument("a report needs a Scorecard")
    if policy is not None and not isinstance(policy, LimitPolicy):
        raise InvalidArgument("policy is a LimitPolicy")
    if policy is not None and cutoff is not None:
        raise InvalidArgument("a policy's lowest band is its cut-off: give a policy or a "
                              "cut-off, not both")
    if cutoff is not None:
        cutoff = _args.integer("cutoff", cutoff, -2**53, 2**53)
    k = _args.integer("reasons", reasons, 1, 8)
    k = min(k, len(card.features))
    if not isinstance(title, str):
        raise InvalidArgument("title is text")
    scores, codes = card.explain(X, k=k, threads=threads)
    if len(scores) == 0:
        raise InvalidArgument("a report needs at least one row")
    labels = None if bad is None else _labels(bad, len(scores))

    if policy is not None:
        cutoff = policy.bands[0].min_score
        edges = [b.min_score for b in policy.bands]
        source = "policy"
    elif _scaling(card) is not None:
        edges = scaling_edges(card, scores)
        source = "card scaling"
    else:
        edges = range_edges(card)
        source = "card range"
    bands = _bands(card, scores, labels, edges, policy)

    psi_by_feature = score_psi = None
    baseline_rows = None
    if baseline is not None:
        base_scores = card.score(baseline, threads=threads)
        if len(base_scores) == 0:
            raise InvalidArgument("the baseline needs at least one row")
        psi_by_feature = feature_psi(card, baseline, X)
        score_psi = psi(base_scores, scores)
        baseline_rows = len(base_scores)

    names = card.feature_names
    first = np.bincount(codes[:, 0][codes[:, 0] >= 0], minlength=len(names))
    anywhere = np.bincount(codes[codes >= 0], minlength=len(names))
    counted = sorted(range(len(names)), key=lambda f: (-first[f], -anywhere[f], f))
    reason_counts = tuple(ReasonCount(names[f], int(first[f]), int(anywhere[f]))
                          for f in counted)

    overall = area = None
    if labels is not None:
        overall = float(labels.mean())
        if 0 < labels.sum() < len(labels):
            area = auc(scores, labels)
    return ScoreReport(
        card_id=card.card_id, card_version=card.version, rows=len(scores),
        scores=scores.astype(np.int64), band_source=source, bands=bands, cutoff=cutoff,
        below_cutoff=None if cutoff is None else int(np.count_nonzero(scores < cutoff)),
        bad_rate=overall, auc=area, psi=psi_by_feature, score_psi=score_psi,
        baseline_rows=baseline_rows, reasons=reason_counts, reason_k=k,
        no_reason=int(np.count_nonzero(codes[:, 0] < 0)), title=title)


def _labels(bad: npt.ArrayLike, n: int) -> npt.NDArray[np.float64]:
    try:
        labels = np.asarray(bad)
    except (TypeError, ValueError):
        raise InvalidArgument("bad must be 0/1 labels") from None
    if labels.dtype.kind not in "biuf" or labels.ndim != 1 or len(labels) != n:
        raise InvalidArgument("bad needs one 0/1 label per row")
    values = labels.astype(np.float64)
    if not np.all((values == 0.0) | (values == 1.0)):
        raise InvalidArgument("labels must be 0 (good) or 1 (bad), never missing")
    return values


def _scaling(card: Scorecard) -> tuple[float, float, float] | None:
    """The card's (base_score, base_odds, pdo), when it has usable ones."""
    try:
        values = tuple(float(card.scaling[k]) for k in ("base_score", "base_odds", "pdo"))
    except (KeyError, TypeError, ValueError):
        return None
    base, odds, pdo = values
    if not all(math.isfinite(v) for v in values) or odds <= 0 or pdo <= 0:
        return None
    return base, odds, pdo


def scaling_edges(card: Scorecard, scores: npt.ArrayLike) -> list[int]:
    """Band edges every `pdo` points from `base_score` (each band doubles the
    odds), over the scores seen; every `m * pdo` points when that would make
    more than MAX_SCALING_BANDS bands. Edges are rounded up to whole scores."""
    scaling = _scaling(card)
    if scaling is None:
        raise InvalidArgument("the card has no scaling (base_score, base_odds, pdo)")
    base, _odds, pdo = scaling
    s = np.asarray(scores, dtype=np.float64)
    low = math.floor((float(s.min()) - base) / pdo)
    high = math.floor((float(s.max()) - base) / pdo)
    step = max(1, math.ceil((high - low + 1) / MAX_SCALING_BANDS))
    low = math.floor(low / step) * step
    edges = [math.ceil(base + pdo * k) for k in range(low + step, high + 1, step)]
    return sorted(set(edges))


def range_edges(card: Scorecard) -> list[int]:
    """CARD_RANGE_BANDS equal slices of the scores the card can give (its
    base plus every feature's lowest to highest points)."""
    low = card.base_points + sum(min(_points(f)) for f in card.features)
    high = card.base_points + sum(max(_points(f)) for f in card.features)
    edges = [round(low + (high - low) * i / CARD_RANGE_BANDS) for i in range(1, CARD_RANGE_BANDS)]
    return sorted({e for e in edges if low < e <= high})


def _points(feature: Any) -> list[int]:
    return [*feature.points, feature.missing_points, *(p for _, p in feature.specials)]


def _bands(card: Scorecard, scores: Ints, labels: npt.NDArray[np.float64] | None,
           edges: Sequence[int], policy: LimitPolicy | None) -> tuple[Band, ...]:
    """One band below the first edge, one from each edge to the next."""
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), scores, side="right")
    size = len(edges) + 1
    rows = np.bincount(index, minlength=size)
    bads = None if labels is None else np.bincount(index, weights=labels, minlength=size)
    scaling = _scaling(card)
    lows = [-math.inf, *map(float, edges)]
    highs = [*map(float, edges), math.inf]
    out = []
    for b in range(size):
        low, high = lows[b], highs[b]
        if math.isinf(low) and math.isinf(high):
            label = "every score"
        elif math.isinf(low):
            label = f"below {int(high)}"
        elif math.isinf(high):
            label = f"{int(low)} and above"
        else:
            label = f"{int(low)} to {int(high) - 1}"
        limits = None
        if policy is not None:
            label = ("below the cut-off" if b == 0 else f"band {b}") + f" ({label})"
            limits = {} if b == 0 else {s.name.lower(): v for s, v
                                        in sorted(policy.bands[b - 1].limits.items()) if v}
        odds = None
        if scaling is not None and math.isfinite(low):
            base, base_odds, pdo = scaling
            doublings = (low - base) / pdo
            odds = base_odds * 2.0 ** doublings if abs(doublings) < 1000 else None
        n_bads = None if bads is None else int(round(bads[b]))
        rate = None if n_bads is None or rows[b] == 0 else n_bads / int(rows[b])
        out.append(Band(label, low, high, int(rows[b]), n_bads, rate, limits, odds))
    return tuple(out)


# -- the charts -----------------------------------------------------------------------------

def _matplotlib() -> tuple[Any, Any]:
    """matplotlib's Figure and Agg canvas, or ReportSupportMissing."""
    try:
        figure = importlib.import_module("matplotlib.figure")
        agg = importlib.import_module("matplotlib.backends.backend_agg")
    except ImportError:
        raise ReportSupportMissing(
            "score reports draw their charts with matplotlib, which is not installed: "
            "pip install 'qrpay[report]'") from None
    return figure.Figure, agg.FigureCanvasAgg


def require_charts() -> None:
    """Raise ReportSupportMissing now if charts cannot be drawn (before any work)."""
    _matplotlib()


def charts(report: ScoreReport) -> dict[str, bytes]:
    """Each chart as PNG bytes, by name: distribution, bad_rate (with a
    label), psi (with a baseline), reasons. Raises ReportSupportMissing
    without matplotlib."""
    Figure, Canvas = _matplotlib()

    def new() -> tuple[Any, Any]:
        fig = Figure(figsize=CHART_SIZE, dpi=CHART_DPI, layout="constrained")
        Canvas(fig)
        return fig, fig.add_subplot()

    def png(fig: Any) -> bytes:
        out = io.BytesIO()
        # No Software tag: no URL anywhere in the file, and the same bytes every run.
        fig.savefig(out, format="png", metadata={"Software": None})
        return out.getvalue()

    out = {}
    fig, ax = new()
    _draw_distribution(ax, report)
    out["distribution"] = png(fig)
    if report.bad_rate is not None:
        fig, ax = new()
        _draw_bad_rate(ax, report)
        out["bad_rate"] = png(fig)
    if report.psi is not None:
        fig, ax = new()
        _draw_psi(ax, report)
        out["psi"] = png(fig)
    fig, ax = new()
    _draw_reasons(ax, report)
    out["reasons"] = png(fig)
    return out


def _draw_distribution(ax: Any, report: ScoreReport) -> None:
    s = report.scores
    lo, hi = int(s.min()), int(s.max())
    width = max(1, math.ceil((hi - lo + 1) / 60))
    bins = np.arange(lo, hi + width + 1, width) - 0.5
    counts, _, _ = ax.hist(s, bins=bins, color=COLOURS["distribution"], edgecolor="white",
                           linewidth=0.3)
    ax.set_ylim(0, max(1.0, float(np.max(counts))) * 1.25)   # room for the labels on top
    left, right = bins[0] - width, bins[-1] + width
    for i, band in enumerate(report.bands):
        start, stop = max(band.low, left), min(band.high, right)
        if start >= stop:
            continue
        if i % 2:
            ax.axvspan(start, stop, color="#e8e8e8", zorder=0, linewidth=0)
        if math.isfinite(band.low) and band.low > left:
            ax.axvline(band.low, color="#777777", linestyle="--", linewidth=0.8)
        if report.band_source == "policy":
            name = "no credit" if i == 0 else f"band {i}"
        elif band.odds is not None:
            name = f"odds {band.odds:,.3g}:1"
        else:
            name = ""
        ax.text((start + stop) / 2, 0.98, name, transform=ax.get_xaxis_transform(),
                ha="center", va="top", fontsize=8, color="#444444")
    if report.cutoff is not None and left <= report.cutoff <= right:
        ax.axvline(report.cutoff, color=CUTOFF_COLOUR, linewidth=2.0)
        ax.text(report.cutoff, 0.91, f" cut-off {report.cutoff}", color=CUTOFF_COLOUR,
                transform=ax.get_xaxis_transform(), ha="left", va="top", fontsize=9,
                fontweight="bold")
    ax.set_xlim(left, right)
    ax.set_xlabel("score")
    ax.set_ylabel("accounts")
    ax.set_title(f"Score distribution, {report.rows:,} accounts "
                 f"(bands from the {report.band_source}: dashed lines)")


def _draw_bad_rate(ax: Any, report: ScoreReport) -> None:
    shown = [b for b in report.bands if b.rows]
    x = np.arange(len(shown))
    rates = [100.0 * (b.bad_rate or 0.0) for b in shown]
    ax.bar(x, rates, color=COLOURS["bad_rate"])
    for i, b in enumerate(shown):
        ax.annotate(f"{rates[i]:.1f}%\nn={b.rows:,}", (i, rates[i]), ha="center",
                    va="bottom", fontsize=8)
    if report.bad_rate is not None:
        ax.axhline(100.0 * report.bad_rate, color="#555555", linestyle="--", linewidth=0.8,
                   label=f"all accounts {100.0 * report.bad_rate:.2f}%")
        ax.legend(loc="upper right")
    ax.set_xticks(x, [b.label for b in shown], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("bad rate (%)")
    ax.set_ylim(0, max(rates + [1.0]) * 1.25)
    ax.set_title("Bad rate per score band")


def _draw_psi(ax: Any, report: ScoreReport) -> None:
    assert report.psi is not None
    items = sorted(report.psi.items(), key=lambda kv: kv[1])
    y = np.arange(len(items))
    ax.barh(y, [v for _, v in items], color=COLOURS["psi"])
    ax.axvline(PSI_LOOK, color="#bb8800", linestyle="--", linewidth=1.0,
               label=f"{PSI_LOOK}: worth a look")
    ax.axvline(PSI_ACT, color=CUTOFF_COLOUR, linestyle="--", linewidth=1.0,
               label=f"{PSI_ACT}: needs action")
    ax.set_yticks(y, [name for name, _ in items], fontsize=8)
    ax.set_xlim(0, max([v for _, v in items] + [PSI_ACT]) * 1.15)
    ax.set_xlabel("PSI against the baseline")
    ax.legend(loc="lower right")
    ax.set_title("Population stability per feature")


def _draw_reasons(ax: Any, report: ScoreReport) -> None:
    top = [r for r in report.reasons[:TOP_REASONS] if r.any][::-1]
    y = np.arange(len(top))
    ax.barh(y - 0.2, [r.any for r in top], height=0.4, color="#cdbfe3",
            label=f"among the first {report.reason_k}")
    ax.barh(y + 0.2, [r.first for r in top], height=0.4, color=COLOURS["reasons"],
            label="first reason")
    ax.set_yticks(y, [r.feature for r in top], fontsize=8)
    ax.set_xlabel("accounts")
    if top:
        ax.legend(loc="lower right")
    ax.set_title("Reason codes: the features that cost accounts the most points")


# -- the page -------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1100px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f4f4f4; }
img { max-width: 100%; display: block; }
figure { margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
"""


def to_html(report: ScoreReport, images: Mapping[str, bytes]) -> str:
    """The report as one HTML page, `images` (from `charts`) embedded as
    base64 PNG: nothing is fetched when it opens."""
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>Scorecard report: card {e(report.card_id)}</title>",
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>Scorecard report: card {e(report.card_id)}</h1>"]
    if report.title:
        parts.append(f'<p class="note">{e(report.title)}</p>')
    summary: list[tuple[str, str, object]] = [
        ("card id", report.card_id, report.card_id),
        ("card version", str(report.card_version), report.card_version),
        ("accounts", f"{report.rows:,}", report.rows),
        ("lowest score", str(int(report.scores.min())), int(report.scores.min())),
        ("median score", f"{float(np.median(report.scores)):g}", float(np.median(report.scores))),
        ("highest score", str(int(report.scores.max())), int(report.scores.max())),
    ]
    if report.cutoff is not None and report.below_cutoff is not None:
        summary += [("cut-off", str(report.cutoff), report.cutoff),
                    ("below the cut-off", f"{report.below_cutoff:,} "
                     f"({report.below_cutoff / report.rows:.1%})", report.below_cutoff)]
    if report.bad_rate is not None:
        summary.append(("bad rate", f"{report.bad_rate:.2%}", report.bad_rate))
    if report.auc is not None:
        summary.append(("AUC", f"{report.auc:.3f}", report.auc))
    if report.score_psi is not None:
        summary.append(("PSI of the score", f"{report.score_psi:.4f}", report.score_psi))
    parts.append(_table("summary", [], [[(k, None), (text, value)]
                                               for k, text, value in summary]))

    parts.append('<section id="distribution"><h2>Score distribution and bands</h2>')
    parts.append(_figure("distribution", images, "score distribution with the cut-off and "
                         "the bands"))
    where = {"policy": "the limit policy (its lowest band is the cut-off)",
             "card scaling": "the card's scaling: every pdo points from base_score, each "
                             "band doubling the odds",
             "card range": "equal slices of the scores the card can give"}[report.band_source]
    parts.append(f'<p class="note">Bands from {e(where)}. A band holds the scores from its '
                 "lower edge up to, not including, the next band's.</p>")
    head = ["band", "from", "to (below)", "accounts", "share"]
    with_odds = any(b.odds is not None for b in report.bands)
    with_limits = any(b.limits is not None for b in report.bands)
    with_bads = report.bad_rate is not None
    if with_odds:
        head.append("odds good:bad at the lower edge")
    if with_limits:
        head.append("offline limits")
    if with_bads:
        head += ["bads", "bad rate"]
    rows = []
    for b in report.bands:
        row: list[tuple[str, object]] = [
            (b.label, None), (_edge(b.low), b.low), (_edge(b.high), b.high),
            (f"{b.rows:,}", b.rows), (f"{b.rows / report.rows:.1%}", b.rows / report.rows)]
        if with_odds:
            row.append(("" if b.odds is None else f"{b.odds:,.1f}:1", b.odds))
        if with_limits:
            text = ", ".join(f"{scene} {value:,}" for scene, value in (b.limits or {}).items())
            row.append((text or "no credit", None))
        if with_bads:
            row.append((f"{b.bads:,}" if b.bads is not None else "", b.bads))
            row.append(("" if b.bad_rate is None else f"{b.bad_rate:.2%}", b.bad_rate))
        rows.append(row)
    parts.append(_table("bands", head, rows))
    parts.append("</section>")

    if report.bad_rate is not None:
        parts.append('<section id="bad-rate"><h2>Bad rate per band</h2>')
        parts.append(_figure("bad_rate", images, "bad rate per score band"))
        parts.append('<p class="note">The share of accounts in each band that defaulted (the '
                     "label column); the dashed line is all accounts'. A card that ranks well "
                     "has it falling band by band. Numbers: the bands table above.</p>")
        parts.append("</section>")

    if report.psi is not None:
        parts.append('<section id="psi"><h2>Population stability (PSI)</h2>')
        parts.append(_figure("psi", images, "PSI per feature against the baseline"))
        parts.append(f'<p class="note">Each feature\'s PSI over the card\'s own bins '
                     f"(missing and special codes included), these {report.rows:,} accounts "
                     f"against the baseline's {report.baseline_rows:,}: below {PSI_LOOK} "
                     f"stable, {PSI_LOOK} to {PSI_ACT} a shift worth a look, above {PSI_ACT} a "
                     "shift that needs action.</p>")
        psi_rows = [[(name, None), (f"{value:.4f}", value), (_reading(value), None)]
                    for name, value in sorted(report.psi.items(), key=lambda kv: -kv[1])]
        parts.append(_table("psi-table", ["feature", "PSI", "reading"], psi_rows))
        parts.append("</section>")

    parts.append('<section id="reasons"><h2>Reason codes</h2>')
    parts.append(_figure("reasons", images, "reason code counts"))
    parts.append(f'<p class="note">Per account, the {report.reason_k} features that cost it '
                 "the most points against their best bin (Scorecard.explain). "
                 f"{report.no_reason:,} accounts lost no points on any feature.</p>")
    reason_rows = [[(r.feature, None), (f"{r.first:,}", r.first), (f"{r.any:,}", r.any)]
                   for r in report.reasons]
    parts.append(_table("reasons-table", ["feature", "first reason",
                                          f"among the first {report.reason_k}"], reason_rows))
    parts.append("</section></body></html>")
    return "\n".join(parts) + "\n"


def _edge(x: float) -> str:
    return "" if math.isinf(x) else str(int(x))


def _reading(value: float) -> str:
    if value < PSI_LOOK:
        return "stable"
    return "worth a look" if value <= PSI_ACT else "needs action"


def _figure(name: str, images: Mapping[str, bytes], alt: str) -> str:
    if name not in images:
        return ""
    data = base64.b64encode(images[name]).decode("ascii")
    return (f'<figure id="chart-{name.replace("_", "-")}"><img alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{data}"></figure>')


def _table(table_id: str, head: Sequence[str], rows: Sequence[Sequence[tuple[str, object]]]
           ) -> str:
    """A table; a numeric cell carries its exact value in data-value."""
    e = html.escape
    out = [f'<table id="{table_id}">']
    if head:
        out.append("<thead><tr>")
        out += [f"<th>{e(h)}</th>" for h in head]
        out.append("</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        out.append("<tr>")
        for text, value in row:
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                out.append(f'<td data-value="{value!r}">{e(text)}</td>')
            else:
                out.append(f"<td>{e(text)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)
