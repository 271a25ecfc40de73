"""`qrpay score report` (charts and tables in one HTML file, looked at in
headless Chromium), `score fit --features/--id-column`, `score apply
--id-column`, `score sample`, and the README's scorecard lines run as written."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from qrpay import cli, scorereport
from qrpay.scoring import Scorecard, auc
from qrpay.synthetic import histories

ROOT = Path(__file__).resolve().parent.parent
POLICY = {"bands": [{"min_score": 560, "limits": {"bus": 3000, "metro": 3000}},
                    {"min_score": 600, "limits": {"bus": 8000, "metro": 8000, "clinic": 8000}},
                    {"min_score": 640, "limits": {"bus": 20000}}]}


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(args))
    except SystemExit as exc:        # a usage error, as argparse reports it
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def write_csv(path: Path, X: np.ndarray, names: tuple[str, ...] | list[str],
              bad: np.ndarray | None = None, first_account: int = 1) -> None:
    head = ["account", *names] + ([] if bad is None else ["defaulted"])
    lines = [",".join(head)]
    for i, row in enumerate(X):
        cells = [str(first_account + i), *("" if np.isnan(v) else repr(float(v)) for v in row)]
        if bad is not None:
            cells.append(str(int(bad[i])))
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A card fitted on 8,000 synthetic accounts, 6,000 more with outcomes to
    report on, and a baseline in which utilisation has drifted."""
    tmp = tmp_path_factory.mktemp("report")
    X, bad, names = histories(14_000, seed=11)
    card = Scorecard.fit(X[:8000], bad[:8000], names)
    (tmp / "card.json").write_text(card.to_json())
    data, labels = X[8000:], bad[8000:]
    write_csv(tmp / "data.csv", data, names, labels)
    baseline = X[:8000].copy()
    baseline[:, names.index("utilisation")] *= 0.5       # a population that used less credit
    write_csv(tmp / "baseline.csv", baseline, names)
    (tmp / "policy.json").write_text(json.dumps(POLICY))
    return {"dir": tmp, "card": card, "names": names, "X": data, "bad": labels,
            "baseline": baseline}


class Page(HTMLParser):
    """The tables (by id: rows of (text, data-value)) and images (by figure id)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, str | None]]]] = {}
        self.heads: dict[str, list[str]] = {}
        self.images: dict[str, str] = {}
        self.tags: list[str] = []
        self.urls: list[str] = []
        self._table: str | None = None
        self._figure: str | None = None
        self._cell: list[str] | None = None
        self._value: str | None = None
        self._in_head = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        for key in ("src", "href"):
            if a.get(key):
                self.urls.append(str(a[key]))
        if tag == "table":
            self._table = str(a["id"])
            self.tables[self._table] = []
            self.heads[self._table] = []
        elif tag == "thead":
            self._in_head = True
        elif tag == "tr" and self._table and not self._in_head:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell, self._value = [], a.get("data-value")
        elif tag == "figure":
            self._figure = a.get("id")
        elif tag == "img" and self._figure:
            self.images[self._figure] = str(a["src"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "thead":
            self._in_head = False
        elif tag in ("td", "th") and self._table and self._cell is not None:
            text = "".join(self._cell)
            if self._in_head:
                self.heads[self._table].append(text)
            else:
                self.tables[self._table][-1].append((text, self._value))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "figure":
            self._figure = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def column(self, table: str, head: str) -> list[tuple[str, str | None]]:
        i = self.heads[table].index(head)
        return [row[i] for row in self.tables[table]]


def psi_by_hand(card: Scorecard, expected: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """PSI per feature over the card's bins, written out plainly."""
    out = {}
    for f, feature in enumerate(card.features):
        codes = [c for c, _ in feature.specials]
        size = len(feature.edges) + 2 + len(codes)

        def shares(column: np.ndarray) -> np.ndarray:
            index = np.searchsorted(np.array(feature.edges), column, side="right")
            index[np.isnan(column)] = len(feature.edges) + 1
            for j, code in enumerate(codes):
                index[column == code] = len(feature.edges) + 2 + j
            return np.maximum(np.bincount(index, minlength=size) / len(column), 1e-4)

        e, a = shares(expected[:, f]), shares(actual[:, f])
        out[feature.name] = float(np.sum((a - e) * np.log(a / e)))
    return out


# -- the report's numbers -------------------------------------------------------------------

def test_report_tables_hold_the_numbers(scene: dict[str, object], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    d = scene["dir"]
    assert isinstance(d, Path)
    card, X, bad = scene["card"], scene["X"], scene["bad"]
    assert isinstance(card, Scorecard) and isinstance(X, np.ndarray) and isinstance(bad, np.ndarray)
    out = tmp_path / "report.html"
    code, _, err = run(capsys, "score", "report", "--card", str(d / "card.json"), "--data",
                       str(d / "data.csv"), "--label", "defaulted", "--baseline",
                       str(d / "baseline.csv"), "--policy", str(d / "policy.json"), "--out",
                       str(out), "--png", str(tmp_path / "charts"))
    assert code == 0, err
    assert "4 bands from the policy" in err and "largest PSI: utilisation" in err
    text = out.read_text(encoding="utf-8")
    page = Page(text)

    # Self-contained: every image inline, nothing to fetch.
    assert set(page.images) == {"chart-distribution", "chart-bad-rate", "chart-psi",
                                "chart-reasons"}
    assert page.urls and all(u.startswith("data:image/png;base64,") for u in page.urls)
    assert "script" not in page.tags and "link" not in page.tags
    assert not re.search(r"https?:|//[a-z]|url\(",
                         re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text))
    # --png wrote the same charts.
    for name in ("distribution", "bad_rate", "psi", "reasons"):
        png = (tmp_path / "charts" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
        src = page.images[f"chart-{name.replace('_', '-')}"]
        assert base64.b64decode(src.split(",", 1)[1]) == png

    # Bands: the policy's, with each band's accounts, bads and bad rate by plain masks.
    scores = card.score(X)
    mins = [b["min_score"] for b in POLICY["bands"]]
    lows, highs = [-math.inf, *mins], [*mins, math.inf]
    rows = page.column("bands", "accounts")
    bads = page.column("bands", "bads")
    rates = page.column("bands", "bad rate")
    assert len(rows) == 4
    for i, (lo, hi) in enumerate(zip(lows, highs)):
        mask = (scores >= lo) & (scores < hi)
        n, b = int(mask.sum()), int(bad[mask].sum())
        assert n > 0
        assert rows[i] == (f"{n:,}", repr(n))
        assert bads[i] == (f"{b:,}", repr(b))
        assert rates[i][0] == f"{b / n:.2%}"
        assert float(rates[i][1] or "nan") == pytest.approx(bad[mask].mean(), rel=1e-12)
    limits = [text for text, _ in page.column("bands", "offline limits")]
    assert limits == ["no credit", "bus 3,000, metro 3,000",
                      "bus 8,000, metro 8,000, clinic 8,000", "bus 20,000"]
    # A card that ranks: the bad rate falls band by band.
    measured = [float(v or "nan") for _, v in rates]
    assert measured == sorted(measured, reverse=True)

    summary = {row[0][0]: row[1] for row in page.tables["summary"]}
    assert summary["accounts"][1] == repr(len(X))
    assert summary["cut-off"][1] == "560"
    assert summary["below the cut-off"][1] == repr(int((scores < 560).sum()))
    assert float(summary["bad rate"][1] or "nan") == pytest.approx(bad.mean())
    assert float(summary["AUC"][1] or "nan") == pytest.approx(auc(scores, bad))

    # PSI per feature against the baseline, worked out by hand.
    baseline = scene["baseline"]
    assert isinstance(baseline, np.ndarray)
    expected = psi_by_hand(card, baseline, X)
    shown = {row[0][0]: (float(row[1][1] or "nan"), row[2][0]) for row in page.tables["psi-table"]}
    assert set(shown) == set(expected)
    for name, value in expected.items():
        assert shown[name][0] == pytest.approx(value, rel=1e-9, abs=1e-12)
    assert expected["utilisation"] > 0.25 and shown["utilisation"][1] == "needs action"
    assert max(v for k, v in expected.items() if k != "utilisation") < 0.1

    # Reason codes: how often each feature is the first reason and among the first three.
    _, codes = card.explain(X, k=3)
    first = {r[0][0]: int(r[1][1] or -1) for r in page.tables["reasons-table"]}
    anywhere = {r[0][0]: int(r[2][1] or -1) for r in page.tables["reasons-table"]}
    for f, name in enumerate(card.feature_names):
        assert first[name] == int((codes[:, 0] == f).sum())
        assert anywhere[name] == int((codes == f).sum())
    ordered = [r[0][0] for r in page.tables["reasons-table"]]
    assert [first[n] for n in ordered] == sorted(first.values(), reverse=True)


def test_report_bands_from_the_card_and_a_cutoff(scene: dict[str, object], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    d = scene["dir"]
    card, X = scene["card"], scene["X"]
    assert isinstance(d, Path) and isinstance(card, Scorecard) and isinstance(X, np.ndarray)
    code, out, err = run(capsys, "score", "report", "--card", str(d / "card.json"), "--data",
                         str(d / "data.csv"), "--cutoff", "575", "--out", "-")
    assert code == 0, err
    page = Page(out)                              # the HTML on stdout
    assert set(page.images) == {"chart-distribution", "chart-reasons"}
    assert "psi-table" not in page.tables and "bads" not in page.heads["bands"]
    scores = card.score(X)
    base, pdo = card.scaling["base_score"], card.scaling["pdo"]
    lows = [float(v) if v else -math.inf for _, v in page.column("bands", "from")]
    highs = [float(v) if v else math.inf for _, v in page.column("bands", "to (below)")]
    # Every pdo points from base_score (each band doubles the odds), or every
    # m * pdo to keep at most 10 bands; covering every score.
    assert lows[0] == -math.inf and highs[-1] == math.inf and lows[1:] == highs[:-1]
    assert all(((e - base) / pdo).is_integer() for e in highs[:-1])
    step = highs[1] - highs[0]
    assert 4 <= len(highs) <= scorereport.MAX_SCALING_BANDS and (step / pdo).is_integer()
    assert np.diff(highs[:-1]).tolist() == [step] * (len(highs) - 2)
    assert scores.min() < lows[1] <= scores.min() + step
    assert scores.max() >= highs[-2] > scores.max() - step
    if step > pdo:      # widened only when bands of pdo points would be too many
        assert (math.floor((scores.max() - base) / pdo) - math.floor((scores.min() - base) / pdo)
                + 1) > scorereport.MAX_SCALING_BANDS
    counts = [int(v or -1) for _, v in page.column("bands", "accounts")]
    assert counts == [int(((scores >= lo) & (scores < hi)).sum()) for lo, hi in zip(lows, highs)]
    odds = [v for _, v in page.column("bands", "odds good:bad at the lower edge")]
    assert float(odds[1] or "nan") == pytest.approx(
        card.scaling["base_odds"] * 2 ** ((lows[1] - base) / pdo))
    summary = {row[0][0]: row[1] for row in page.tables["summary"]}
    assert summary["below the cut-off"][1] == repr(int((scores < 575).sum()))

    # A hand-built card has no scaling: equal slices of the scores it can give.
    bare = Scorecard(card.features[:2], base_points=600)
    assert scorereport.range_edges(bare)[0] > 600 + sum(
        min(f.points + (f.missing_points,) + tuple(p for _, p in f.specials))
        for f in bare.features)
    report = scorereport.build(bare, X[:, :2])
    assert report.band_source == "card range" and len(report.bands) == 8
    assert sum(b.rows for b in report.bands) == len(X)


def test_report_json_and_refusals(scene: dict[str, object], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    d = scene["dir"]
    assert isinstance(d, Path)
    base = ["score", "report", "--card", str(d / "card.json"), "--data", str(d / "data.csv")]
    code, out, err = run(capsys, *base, "--label", "defaulted", "--out",
                         str(tmp_path / "r.html"), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["out"] == str(tmp_path / "r.html") and doc["png"] == []
    assert doc["rows"] == 6000 and doc["band_source"] == "card scaling"
    assert sum(b["rows"] for b in doc["bands"]) == 6000
    assert sum(b["bads"] for b in doc["bands"]) == int(round(doc["bad_rate"] * 6000))
    assert {r["feature"] for r in doc["reasons"]} == set(scene["names"])  # type: ignore[arg-type]

    (tmp_path / "labels.csv").write_text(
        (d / "data.csv").read_text().replace(",0\n", ",2\n", 1))
    for args, said in (
            (["--out", "-", "--json"], "--json"),
            (["--out", "x.html", "--policy", str(d / "policy.json"), "--cutoff", "5"],
             "--cutoff is for a report without --policy"),
            (["--out", "x.html", "--label", "nope"], "has no column 'nope'"),
            (["--out", "x.html", "--label", "utilisation"], "is one of the card's features"),
            (["--out", "x.html", "--baseline", str(tmp_path / "none.csv")],
             "data file not found"),
            (["--out", str(tmp_path / "missing" / "r.html")], "no such directory")):
        code, _, err = run(capsys, *base, *args)
        assert code == 2 and said in err, (args, err)
    code, _, err = run(capsys, "score", "report", "--card", str(d / "card.json"), "--data",
                       str(tmp_path / "labels.csv"), "--label", "defaulted", "--out", "x.html")
    assert code == 2 and "line 2: the --label column 'defaulted' holds 1" in err, err
    (tmp_path / "few.csv").write_text("account,utilisation\n1,0.5\n")
    code, _, err = run(capsys, "score", "report", "--card", str(d / "card.json"), "--data",
                       str(tmp_path / "few.csv"), "--out", "x.html")
    assert code == 2 and "has no column 'social_insurance_months'" in err, err


def test_report_without_matplotlib_names_the_extra(scene: dict[str, object], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    d = scene["dir"]
    assert isinstance(d, Path)
    # As if matplotlib were not installed: importing it raises ImportError.
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends",
                 "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    code, _, err = run(capsys, "score", "report", "--card", str(d / "card.json"), "--data",
                       str(d / "data.csv"), "--out", str(tmp_path / "r.html"))
    assert code == 2 and "pip install 'qrpay[report]'" in err and "matplotlib" in err, err
    assert not (tmp_path / "r.html").exists()
    with pytest.raises(scorereport.ReportSupportMissing, match=r"qrpay\[report\]"):
        scorereport.charts(scorereport.build(scene["card"], scene["X"]))  # type: ignore[arg-type]


# -- the report in a browser ----------------------------------------------------------------

def screenshot(page: Path, shot: Path, profile: Path) -> np.ndarray:
    """The page as headless Chromium draws it, as an RGB array."""
    from PIL import Image

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("headless Chromium is needed to look at the report: install Debian's "
                    "chromium package (apt-get install -y chromium); .ci/run does")
    run_ = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,4000",
         page.as_uri()], capture_output=True, text=True, timeout=180)
    if run_.returncode != 0 or not shot.exists():
        pytest.fail(f"chromium could not take a screenshot (exit {run_.returncode}): "
                    f"{run_.stderr[-2000:]}")
    with Image.open(shot) as image:
        return np.asarray(image.convert("RGB"))


def near(pixels: np.ndarray, colour: str, tolerance: int = 8) -> np.ndarray:
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return np.all(np.abs(pixels.astype(np.int32) - rgb) <= tolerance, axis=-1)


def test_report_in_headless_chromium_shows_the_charts(scene: dict[str, object],
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    d = scene["dir"]
    assert isinstance(d, Path)
    report = tmp_path / "report.html"
    code, _, err = run(capsys, "score", "report", "--card", str(d / "card.json"), "--data",
                       str(d / "data.csv"), "--label", "defaulted", "--baseline",
                       str(d / "baseline.csv"), "--policy", str(d / "policy.json"), "--out",
                       str(report))
    assert code == 0, err
    pixels = screenshot(report, tmp_path / "shot.png", tmp_path / "profile")
    assert pixels.shape[1] == 1200
    # The page is drawn, not blank: a picture's worth of colours.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 300
    assert (pixels.min(axis=-1) < 200).mean() > 0.04
    # Each chart's own colour is on screen, in a good number of pixels, and
    # the charts come in the page's order, top to bottom.
    rows = []
    for name in ("distribution", "bad_rate", "psi", "reasons"):
        mask = near(pixels, scorereport.COLOURS[name])
        assert mask.sum() > 1500, (name, int(mask.sum()))
        rows.append(float(np.nonzero(mask)[0].mean()))
    assert rows == sorted(rows), rows
    assert near(pixels, scorereport.CUTOFF_COLOUR).sum() > 200       # the cut-off line

    # The same page without its images has none of the charts' colours: the
    # check above sees the charts, not the tables.
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r"<img [^>]*>", "", report.read_text(encoding="utf-8")))
    blank = screenshot(bare, tmp_path / "bare.png", tmp_path / "profile2")
    for name in ("distribution", "bad_rate", "psi", "reasons"):
        assert near(blank, scorereport.COLOURS[name]).sum() < 50, name


# -- fit, apply, sample ---------------------------------------------------------------------

def test_fit_trains_on_the_features_named_never_the_id(scene: dict[str, object],
                                                       tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    d = scene["dir"]
    names = scene["names"]
    assert isinstance(d, Path) and isinstance(names, tuple)
    data = str(d / "data.csv")
    card = tmp_path / "card.json"

    def features() -> tuple[str, ...]:
        return Scorecard.from_json(card.read_text()).feature_names

    # Without --id-column the account number is a feature, and fit says so.
    code, _, err = run(capsys, "score", "fit", "--data", data, "--label", "defaulted",
                       "--out", str(card))
    assert code == 0 and "give --id-column account" in err, err
    assert features() == ("account", *names)
    code, _, err = run(capsys, "score", "fit", "--data", data, "--label", "defaulted",
                       "--id-column", "account", "--out", str(card))
    assert code == 0 and "--id-column" not in err, err
    assert features() == names
    chosen = ["utilisation", "on_time_ratio", "max_days_past_due"]
    code, out, err = run(capsys, "score", "fit", "--data", data, "--label", "defaulted",
                         "--features", ",".join(chosen), "--out", str(card), "--json")
    assert code == 0, err
    assert features() == tuple(chosen) and json.loads(out)["features"] == chosen
    assert json.loads(out)["card_id"] == Scorecard.from_json(card.read_text()).card_id

    # `-`: the CSV from stdin, the card to stdout.
    with monkeypatch.context() as patch:
        patch.setattr(sys, "stdin", io.StringIO((d / "data.csv").read_text()))
        code, out, err = run(capsys, "score", "fit", "--data", "-", "--label", "defaulted",
                             "--features", ",".join(chosen), "--out", "-")
    assert code == 0, err
    assert Scorecard.from_json(out).card_id == Scorecard.from_json(card.read_text()).card_id

    before = card.read_bytes()
    for extra, said in (
            (["--features", "utilisation,salary"], "'salary' is not a column of"),
            (["--features", "utilisation,defaulted"], "names 'defaulted', the --label column"),
            (["--features", "account,utilisation", "--id-column", "account"],
             "names 'account', the --id-column column"),
            (["--features", "utilisation,utilisation"], "names a column twice"),
            (["--id-column", "acct"], "has no column 'acct' (--id-column"),
            (["--id-column", "defaulted"], "--id-column and --label name the same column")):
        code, _, err = run(capsys, "score", "fit", "--data", data, "--label", "defaulted",
                           "--out", str(card), *extra)
        assert code == 2 and said in err, (extra, err)
    assert card.read_bytes() == before
    code, _, err = run(capsys, "score", "fit", "--data", data, "--label", "defaulted",
                       "--features", "a,,b", "--out", str(card))
    assert code == 2 and "column names separated by commas" in err


def test_apply_carries_the_id_column(scene: dict[str, object], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    d, card, X = scene["dir"], scene["card"], scene["X"]
    names = scene["names"]
    assert isinstance(d, Path) and isinstance(card, Scorecard) and isinstance(X, np.ndarray)
    assert isinstance(names, tuple)
    rows = tmp_path / "rows.csv"
    write_csv(rows, X[:300], names, first_account=5000)
    code, out, err = run(capsys, "score", "apply", "--card", str(d / "card.json"), "--data",
                         str(rows), "--id-column", "account", "--out", "-", "--reasons", "2")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "account,score,reason1,reason2" and len(lines) == 301
    assert [line.split(",")[0] for line in lines[1:]] == [str(5000 + i) for i in range(300)]
    assert [int(line.split(",")[1]) for line in lines[1:]] == card.score(X[:300]).tolist()
    # Without --id-column the account column is not the card's: refused, as before.
    code, _, err = run(capsys, "score", "apply", "--card", str(d / "card.json"), "--data",
                       str(rows), "--out", str(tmp_path / "s.csv"))
    assert code == 2 and "are not the card's" in err
    code, _, err = run(capsys, "score", "apply", "--card", str(d / "card.json"), "--data",
                       str(rows), "--id-column", "account", "--out", str(tmp_path / "s.npy"))
    assert code == 2 and "a .npy --out holds the scores only" in err
    code, out, err = run(capsys, "score", "apply", "--card", str(d / "card.json"), "--data",
                         str(rows), "--id-column", "account", "--out", str(tmp_path / "s.csv"),
                         "--json")
    assert code == 0 and json.loads(out) == {"card_id": card.card_id, "rows": 300,
                                             "reasons": 3, "out": str(tmp_path / "s.csv")}


def test_sample_writes_the_same_accounts_for_a_seed(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert run(capsys, "score", "sample", "--accounts", "500", "--seed", "3", "--out",
               str(a))[0] == 0
    code, out, _ = run(capsys, "score", "sample", "--accounts", "500", "--seed", "3", "--out",
                       "-")
    assert code == 0 and out == a.read_text()
    X, bad, names = histories(500, seed=3)
    lines = a.read_text().splitlines()
    assert lines[0].split(",") == ["account", *names, "defaulted"] and len(lines) == 501
    parsed = np.array([[float(c) if c else np.nan for c in line.split(",")]
                       for line in lines[1:]])
    assert parsed[:, 0].tolist() == list(range(1, 501))
    assert np.array_equal(parsed[:, 1:-1], X, equal_nan=True)
    assert parsed[:, -1].tolist() == bad.astype(float).tolist()
    code, out, _ = run(capsys, "score", "sample", "--accounts", "20", "--no-label", "--out",
                       str(b), "--json")
    assert code == 0 and json.loads(out)["columns"] == ["account", *names]
    assert b.read_text().splitlines()[0] == ",".join(["account", *names])


# -- the README -----------------------------------------------------------------------------

def test_readme_scorecard_lines_run(tmp_path: Path) -> None:
    """The README's scorecard lines, run as written with the installed `qrpay`."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("Scorecards from the command line"):]
    script = re.findall(r"^```sh\n(.*?)^```", section, re.S | re.M)[0]   # the first after it
    assert "qrpay score fit" in script and "qrpay score report" in script
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    card = Scorecard.from_json((tmp_path / "card.json").read_text())
    _, _, names = histories(1)
    assert card.feature_names == names                    # the account number is not one
    scores = (tmp_path / "scores.csv").read_text().splitlines()
    assert scores[0].startswith("account,score,reason1") and len(scores) > 1000
    for html in tmp_path.glob("*.html"):
        page = Page(html.read_text(encoding="utf-8"))
        assert page.images and all(u.startswith("data:image/png;base64,") for u in page.urls)
        assert "bands" in page.tables and "reasons-table" in page.tables
    assert len(list(tmp_path.glob("*.html"))) >= 2
    charts = sorted(p.name for p in (tmp_path / "charts").iterdir())
    assert charts == ["distribution.png", "psi.png", "reasons.png"]
    assert any("bads" in Page(h.read_text()).heads["bands"] for h in tmp_path.glob("*.html"))
    assert any("psi-table" in Page(h.read_text()).tables for h in tmp_path.glob("*.html"))
