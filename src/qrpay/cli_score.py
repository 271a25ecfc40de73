"""`qrpay score fit|apply|report|sample`: scorecards from the command line
(docs/SCORING.md)."""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from qrpay import cli, cli_output, synthetic, synthetic_categories
from qrpay._args import MAX_THREADS
from qrpay.cli_progress import Progress, progress_bar
from qrpay.scoring import CategoryBins, LimitPolicy, Scorecard

Floats = npt.NDArray[np.float64]
Labels = npt.NDArray[np.object_]
CHUNK_ROWS = 65_536            # rows scored per step of `score apply`'s progress bar
MAX_SAMPLE_ACCOUNTS = 10_000_000
# Column names that are usually an identifier: `score fit` says so when it
# would train on one without --id-column.
_ID_NAMES = ("account", "account_id", "id", "customer_id", "citizen_id")


class _Table:
    """A CSV with a header row, kept as text: columns become numbers only
    when a command asks for them (an identifier need not be a number)."""

    def __init__(self, path: str, progress: Progress | None = None) -> None:
        self.path = path
        text = cli._read_text(path, "data")
        rows = list(csv.reader(io.StringIO(text)))
        if len(rows) < 2:
            raise cli.CliError(f"{path} needs a header row and at least one data row")
        self.header = rows[0]
        seen = set()
        for name in self.header:
            if name in seen:
                raise cli.CliError(f"{path}: column {name!r} appears twice in the header")
            seen.add(name)
        for line, row in enumerate(rows[1:], start=2):
            if len(row) != len(self.header):
                raise cli.CliError(f"{path} line {line} has {len(row)} columns; the header has "
                                   f"{len(self.header)}: every row needs one value (or an "
                                   "empty cell) per column")
        self.rows = rows[1:]
        self._progress = progress

    def column_index(self, name: str, what: str) -> int:
        if name not in self.header:
            raise cli.CliError(f"{self.path} has no column {name!r} ({what}; its columns: "
                               f"{', '.join(self.header)})")
        return self.header.index(name)

    def numbers(self, names: Sequence[str]) -> Floats:
        """The named columns as floats (an empty cell is NaN), in that order."""
        cols = [self.column_index(n, "asked for") for n in names]
        values = np.empty((len(self.rows), len(cols)), dtype=np.float64)
        step = max(1, len(self.rows) // 100)
        for i, row in enumerate(self.rows):
            for j, col in enumerate(cols):
                cell = row[col]
                try:
                    values[i, j] = float(cell) if cell.strip() else np.nan
                except ValueError:
                    raise cli.CliError(f"{self.path} line {i + 2}, column {names[j]!r}: "
                                       f"{cell[:40]!r} is not a number") from None
            if self._progress is not None and (i + 1) % step == 0:
                self._progress(i + 1, len(self.rows))
        if self._progress is not None:
            self._progress(len(self.rows), len(self.rows))
        return values

    def text(self, name: str, what: str) -> list[str]:
        col = self.column_index(name, what)
        return [row[col] for row in self.rows]

    def labels(self, name: str) -> Labels:
        """A categorical column: each cell's text, stripped; an empty cell
        is missing (None)."""
        col = self.column_index(name, "asked for")
        return np.array([row[col].strip() or None for row in self.rows], dtype=object)

    def holds_labels(self, name: str) -> bool:
        """Whether a column holds labels rather than numbers: most of its
        non-empty cells are not numbers. A column of numbers with a few
        that are not is a mistake, named by line (--categorical makes it a
        column of labels)."""
        col = self.column_index(name, "asked for")
        numbers, texts, first_text = 0, 0, None
        for line, row in enumerate(self.rows, start=2):
            cell = row[col]
            if not cell.strip():
                continue
            try:
                float(cell)
                numbers += 1
            except ValueError:
                texts += 1
                first_text = first_text or (line, cell)
        if first_text is None or texts >= numbers:
            return first_text is not None
        raise cli.CliError(f"{self.path} line {first_text[0]}, column {name!r}: "
                           f"{first_text[1][:40]!r} is not a number, though most of the "
                           "column is (name the column in --categorical if it holds labels)")

    def columns(self, names: Sequence[str], categorical: set[str]
                ) -> dict[str, Floats | Labels]:
        """The named columns by name, in that order: those in `categorical`
        as labels, the rest as numbers."""
        numeric = [n for n in names if n not in categorical]
        values = self.numbers(numeric)
        out: dict[str, Floats | Labels] = {n: values[:, j] for j, n in enumerate(numeric)}
        return {n: out[n] if n in out else self.labels(n) for n in names}


def _load_npy(path: str) -> Floats:
    try:
        X = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise cli.CliError(f"data file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise cli.CliError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
                           ) from None
    if X.ndim != 2 or X.dtype.kind not in "iuf":
        raise cli.CliError(f"{path} must hold a 2-D numeric array")
    out: Floats = X.astype(np.float64)
    return out


def _card_rows(path: str, card: Scorecard, what: str) -> Floats:
    """Rows for the card from a CSV (its columns picked by name; others are
    ignored) or a .npy (one column per card feature, in the card's order)."""
    if path.endswith(".npy"):
        X = _load_npy(path)
        if X.shape[1] != len(card.features):
            raise cli.CliError(f"{what} {path} has {X.shape[1]} columns; the card has "
                               f"{len(card.features)} features")
        return X
    return _features(_Table(path), card, what)


def _features(table: _Table, card: Scorecard, what: str) -> Floats:
    """The card's feature columns of a CSV, by name, as the kernel reads
    them: a categorical feature's labels become its codes (an empty cell
    is missing, a label the card never saw unseen)."""
    missing = [n for n in card.feature_names if n not in table.header]
    if missing:
        raise cli.CliError(f"{what} {table.path} has no column {missing[0]!r} of the card's "
                           f"features ({', '.join(card.feature_names)})")
    categorical = _categorical(card)
    if not categorical:
        return table.numbers(card.feature_names)
    codes = card.matrix(table.columns(card.feature_names, categorical))
    return np.asarray(codes, dtype=np.float64)   # float64 already: no copy


def _empty(column: Floats | Labels) -> bool:
    """Whether a column has no value in any row."""
    if column.dtype == np.object_:
        return all(v is None for v in column.tolist())
    return bool(np.isnan(column).all())


def _categorical(card: Scorecard) -> set[str]:
    return {f.name for f in card.features if isinstance(f, CategoryBins)}


def _check_out(args: argparse.Namespace) -> None:
    """--out - and --json would both write stdout."""
    if args.out == "-" and cli_output.wants_json(args):
        raise cli.CliError("--out - writes stdout, and so does --json: give --out a file")
    if args.out != "-":
        cli._check_out(args.out, "--out")


# -- fit ------------------------------------------------------------------------------------

def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r}: column names separated by commas")
    return names


def cmd_score_fit(args: argparse.Namespace) -> int:
    if args.data.endswith(".npy"):
        raise cli.CliError("--label needs a CSV with a header (a .npy has no column names)")
    _check_out(args)
    table = _Table(args.data)
    table.column_index(args.label, "--label")
    exclude = [args.label]
    if args.id_column is not None:
        table.column_index(args.id_column, "--id-column")
        if args.id_column == args.label:
            raise cli.CliError("--id-column and --label name the same column")
        exclude.append(args.id_column)
    if args.features is not None:
        unknown = [n for n in args.features if n not in table.header]
        if unknown:
            raise cli.CliError(f"--features: {', '.join(map(repr, unknown))} "
                               f"{'is not a column' if len(unknown) == 1 else 'are not columns'}"
                               f" of {args.data} (its columns: {', '.join(table.header)})")
        for name in args.features:
            if name in exclude:
                what = "--label" if name == args.label else "--id-column"
                raise cli.CliError(f"--features names {name!r}, the {what} column: it cannot "
                                   "be a feature too")
        if len(set(args.features)) != len(args.features):
            raise cli.CliError("--features names a column twice")
        names = list(args.features)
    else:
        names = [n for n in table.header if n not in exclude]
        if not names:
            raise cli.CliError(f"{args.data} has no column left to train on")
        for name in names:
            if name.lower() in _ID_NAMES:
                cli_output.status(args, f"note: training on column {name!r} as a feature; if "
                                        f"it identifies the account, give --id-column {name} "
                                        "(or --features)")
    declared = list(args.categorical or [])
    stray = [n for n in declared if n not in names]
    if stray:
        raise cli.CliError(f"--categorical: {stray[0]!r} is not a feature of this fit (the "
                           f"features: {', '.join(names)})")
    # A column of labels is categorical; --categorical says so of a column
    # of numbered labels (a district code, say).
    categorical = set(declared) | {n for n in names
                                   if n not in declared and table.holds_labels(n)}
    columns = table.columns(names, categorical)
    y = table.numbers([args.label])[:, 0]
    empty = [name for name, column in columns.items() if _empty(column)]
    if empty:
        raise cli.CliError(f"{args.data}: column {empty[0]!r} is empty in every row: there is "
                           "nothing to fit; drop the column or fill it in")
    if categorical:
        card = Scorecard.fit(columns, y, names, trend=args.trend)
    else:
        card = Scorecard.fit(np.column_stack(list(columns.values())), y, names,
                             trend=args.trend)
    kinds = [n for n in names if n in categorical]
    cli._write_atomic(args.out, card.to_json().encode())
    cli_output.status(args, f"card {card.card_id}: {len(names)} features"
                            + (f" ({len(kinds)} categorical: {', '.join(kinds)})" if kinds
                               else "")
                            + f", written to {'stdout' if args.out == '-' else args.out}")
    if cli_output.wants_json(args):
        cli_output.emit(args, {"card_id": card.card_id, "features": list(card.feature_names),
                               "categorical": kinds, "rows": len(y),
                               "bad_rate": float(np.nanmean(y)), "out": args.out})
    return cli.EXIT_OK


# -- apply ----------------------------------------------------------------------------------

def _explain(card: Scorecard, X: Floats, k: int, threads: int, progress: Progress | None
             ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int16]]:
    """card.explain in steps of CHUNK_ROWS rows, so a bar can follow it."""
    if progress is None or len(X) <= CHUNK_ROWS:
        return card.explain(X, k=k, threads=threads)
    parts = []
    for start in range(0, len(X), CHUNK_ROWS):
        parts.append(card.explain(X[start:start + CHUNK_ROWS], k=k, threads=threads))
        progress(min(start + CHUNK_ROWS, len(X)), len(X))
    return (np.concatenate([s for s, _ in parts]), np.concatenate([r for _, r in parts]))


def cmd_score_apply(args: argparse.Namespace) -> int:
    _check_out(args)
    card = Scorecard.from_json(cli._read_text(args.card, "card"))
    ids: list[str] | None = None
    with progress_bar("reading", unit="row", quiet=cli_output.silent(args)) as progress:
        if args.data.endswith(".npy"):
            if args.id_column is not None:
                raise cli.CliError("--id-column needs a CSV with a header (a .npy has no "
                                   "column names)")
            X = _load_npy(args.data)
        else:
            table = _Table(args.data, progress)
            names = list(table.header)
            if args.id_column is not None:
                ids = table.text(args.id_column, "--id-column")
                names.remove(args.id_column)
            if tuple(names) != card.feature_names:
                raise cli.CliError(f"{args.data} columns {names} are not the card's "
                                   f"{list(card.feature_names)}"
                                   + (" (besides the --id-column)" if ids is not None else ""))
            X = _features(table, card, "data")
    if ids is not None and args.out.endswith(".npy"):
        raise cli.CliError("--id-column writes the ids next to the scores in a CSV; a .npy "
                           "--out holds the scores only")
    k = min(args.reasons, len(card.features))
    with progress_bar("scoring", unit="row", quiet=cli_output.silent(args)) as progress:
        scores, reasons = _explain(card, X, k, args.threads, progress)
    if args.out.endswith(".npy"):
        image = io.BytesIO()
        np.save(image, scores)
        cli._write_atomic(args.out, image.getvalue())
    else:
        head = [args.id_column] if ids is not None else []
        head += ["score", *(f"reason{i + 1}" for i in range(reasons.shape[1]))]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(head)
        named = card.reason_names(reasons, X)   # "housing = rent" for a categorical one
        for i, (s, r) in enumerate(zip(scores.tolist(), named)):
            lead = [ids[i]] if ids is not None else []
            writer.writerow([*lead, str(s), *r, *[""] * (reasons.shape[1] - len(r))])
        cli._write_atomic(args.out, buffer.getvalue().encode())
    cli_output.status(args, f"scored {len(scores):,} rows with card {card.card_id}")
    if cli_output.wants_json(args):
        cli_output.emit(args, {"card_id": card.card_id, "rows": len(scores), "reasons": k,
                               "out": args.out})
    return cli.EXIT_OK


# -- report ---------------------------------------------------------------------------------

def cmd_score_report(args: argparse.Namespace) -> int:
    from qrpay import scorereport
    try:
        scorereport.require_charts()     # before reading anything
    except scorereport.ReportSupportMissing as exc:
        raise cli.CliError(str(exc)) from None
    _check_out(args)
    if args.data == "-" and args.baseline == "-":
        raise cli.CliError("--data and --baseline cannot both read stdin")
    if args.policy is not None and args.cutoff is not None:
        raise cli.CliError("--cutoff is for a report without --policy: a policy's lowest "
                           "band is its cut-off")
    png_dir = None
    if args.png is not None:
        png_dir = Path(args.png)
        try:
            png_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise cli.CliError(f"--png {args.png} is not a directory") from None
        except OSError as exc:
            raise cli.CliError(f"--png {args.png} cannot be made: {exc.strerror or exc}"
                               ) from None
    card = Scorecard.from_json(cli._read_text(args.card, "card"))
    policy = None
    if args.policy is not None:
        try:
            policy = LimitPolicy.from_dict(json.loads(cli._read_text(args.policy, "policy")))
        except json.JSONDecodeError as exc:
            raise cli.CliError(f"--policy {args.policy} is not JSON: {exc}") from None

    bad = None
    if args.label is not None:
        if args.data.endswith(".npy"):
            raise cli.CliError("--label needs a CSV with a header (a .npy has no column names)")
        if args.label in card.feature_names:
            raise cli.CliError(f"--label {args.label!r} is one of the card's features")
        table = _Table(args.data)
        bad = table.numbers([args.label])[:, 0]
        wrong = np.flatnonzero(~((bad == 0.0) | (bad == 1.0)))
        if len(wrong):
            raise cli.CliError(f"{args.data} line {int(wrong[0]) + 2}: the --label column "
                               f"{args.label!r} holds 1 (defaulted) or 0, never anything else "
                               "or nothing")
        X = _features(table, card, "data")
    else:
        X = _card_rows(args.data, card, "data")
    baseline = None if args.baseline is None else _card_rows(args.baseline, card, "baseline")

    sources = [f"data {args.data}"]
    if args.label is not None:
        sources.append(f"label {args.label}")
    if args.baseline is not None:
        sources.append(f"baseline {args.baseline}")
    if args.policy is not None:
        sources.append(f"policy {args.policy}")
    report = scorereport.build(card, X, bad=bad, baseline=baseline, policy=policy,
                               cutoff=args.cutoff, reasons=args.reasons, threads=args.threads,
                               title="; ".join(sources))
    images = scorereport.charts(report)
    cli._write_atomic(args.out, scorereport.to_html(report, images).encode("utf-8"))
    written = []
    if png_dir is not None:
        for name, data in images.items():
            path = png_dir / f"{name}.png"
            cli._write_atomic(str(path), data)
            written.append(str(path))

    where = "stdout" if args.out == "-" else args.out
    cli_output.status(args, f"report {where}: {report.rows:,} accounts scored with card "
                            f"{report.card_id}, {len(report.bands)} bands from the "
                            f"{report.band_source}, charts: {', '.join(images)}")
    if report.psi is not None:
        name, value = max(report.psi.items(), key=lambda kv: kv[1])
        cli_output.status(args, f"largest PSI: {name} {value:.4f}")
    if written:
        cli_output.status(args, f"charts written to {args.png}: "
                                f"{', '.join(Path(p).name for p in written)}")
    if cli_output.wants_json(args):
        cli_output.emit(args, {**report.as_dict(), "out": args.out, "png": written})
    return cli.EXIT_OK


# -- sample ---------------------------------------------------------------------------------

def _number(value: float) -> str:
    if value != value:
        return ""
    return str(int(value)) if value.is_integer() else repr(value)


def cmd_score_sample(args: argparse.Namespace) -> int:
    _check_out(args)
    labels: list[list[str]] = []
    if args.categorical:
        histories = synthetic_categories.categorical_histories(args.accounts, seed=args.seed)
        X, bad, names = histories.X, histories.y, histories.numeric_features
        names = (*names, *histories.categorical_features)
        labels = [[v or "" for v in histories.categorical[n].tolist()]
                  for n in histories.categorical_features]
    else:
        X, bad, names = synthetic.histories(args.accounts, seed=args.seed)
    head = ["account", *names] + ([] if args.no_label else ["defaulted"])
    lines = [",".join(head)]
    for i, (row, b) in enumerate(zip(X.tolist(), bad.tolist())):
        cells = [str(i + 1), *map(_number, row), *(column[i] for column in labels)]
        if not args.no_label:
            cells.append("1" if b else "0")
        lines.append(",".join(cells))
    cli._write_atomic(args.out, ("\n".join(lines) + "\n").encode())
    where = "stdout" if args.out == "-" else args.out
    cli_output.status(args, f"{args.accounts:,} synthetic accounts (seed {args.seed}) written "
                            f"to {where}" + ("" if args.no_label else
                                             f", {float(bad.mean()):.1%} defaulted"))
    if cli_output.wants_json(args):
        cli_output.emit(args, {"accounts": args.accounts, "seed": args.seed, "columns": head,
                               "bad_rate": None if args.no_label else float(bad.mean()),
                               "out": args.out})
    return cli.EXIT_OK


# -- parsers --------------------------------------------------------------------------------

def add_parsers(commands: argparse._SubParsersAction) -> None:   # type: ignore[type-arg]
    score = commands.add_parser(
        "score", help="fit, apply and report on scorecards",
        description="Scorecards from the command line: fit a card to accounts with known "
                    "outcomes, score accounts with it, report on the scores (docs/SCORING.md)."
    ).add_subparsers(dest="score_command", required=True, metavar="ACTION")

    p = score.add_parser(
        "fit", help="fit a card from a CSV with a 0/1 label column",
        description="Fit a scorecard (monotonic bins, WOE, logistic regression, points) to a "
                    "CSV with a header row: one row per account, a 0/1 --label column (1 = "
                    "defaulted) and feature columns: numbers, or labels (a column whose "
                    "cells are mostly not numbers, or named by --categorical, is "
                    "categorical: its categories are grouped by bad rate); an empty cell is "
                    "missing. Every "
                    "other column is a feature unless --features names them or --id-column "
                    "sets one aside.")
    p.add_argument("--data", required=True, metavar="CSV",
                   help="the accounts: a CSV with a header row (- reads stdin)")
    p.add_argument("--label", required=True, metavar="COLUMN",
                   help="the column with 1 = defaulted, 0 = repaid")
    p.add_argument("--features", type=_names, metavar="A,B,C",
                   help="the columns to train on, in this order (default: every column but "
                        "the label and the --id-column)")
    p.add_argument("--id-column", metavar="COLUMN",
                   help="a column that identifies the account (say, account): never a feature")
    p.add_argument("--categorical", type=_names, metavar="A,B",
                   help="columns to fit as categorical even though they hold numbers (a "
                        "district code, say); a column whose cells are mostly not numbers is "
                        "categorical anyway")
    p.add_argument("--trend", default="auto", choices=["auto", "increasing", "decreasing"],
                   help="how the bad rate may move with each numeric feature: auto "
                        "(whichever fits better, per feature; the default), or one direction "
                        "for all")
    p.add_argument("--out", required=True, metavar="CARD",
                   help="where the card JSON goes (- for stdout)")
    p.set_defaults(run=cmd_score_fit)

    p = score.add_parser(
        "apply", help="score rows of a CSV or .npy with a card",
        description="Score each row with the card and name the features that cost it the "
                    "most points (its reason codes). A CSV's columns are the card's "
                    "features in the card's order, plus the --id-column if given (carried to "
                    "--out); a categorical feature's column holds labels (one the card never "
                    "saw scores as unseen; a reason names the row's category: housing = rent). "
                    "A .npy holds one column per feature, a categorical one as codes "
                    "(docs/SCORING.md).")
    p.add_argument("--card", required=True, help="the scorecard JSON (qrpay score fit)")
    p.add_argument("--data", required=True, metavar="CSV|NPY",
                   help="the rows to score (- reads a CSV from stdin)")
    p.add_argument("--id-column", metavar="COLUMN",
                   help="a column of the CSV that identifies the row: not scored, written as "
                        "the first column of --out")
    p.add_argument("--out", required=True, metavar="CSV|NPY",
                   help="a CSV of score and reasons (- for stdout), or a .npy of the scores")
    p.add_argument("--reasons", type=cli._int(0), default=3,
                   help="reason codes per row, 0 to 8 (default: %(default)s)")
    p.add_argument("--threads", type=cli._int(1, MAX_THREADS), default=1,
                   help="threads that score (default: %(default)s)")
    p.set_defaults(run=cmd_score_apply)

    p = score.add_parser(
        "report", help="charts and tables of a card's scores in one HTML file",
        description="One self-contained HTML file (charts as embedded PNG, nothing fetched): "
                    "the score distribution with the cut-off and the bands, the bad rate per "
                    "band (--label), PSI per feature against a baseline (--baseline), and the "
                    "most common reason codes. Needs matplotlib: pip install 'qrpay[report]'. "
                    "See docs/SCORING.md, Reports.")
    p.add_argument("--card", required=True, help="the scorecard JSON (qrpay score fit)")
    p.add_argument("--data", required=True, metavar="CSV|NPY",
                   help="the accounts to report on: a CSV holding the card's feature columns "
                        "by name (other columns are ignored; - reads stdin), or a .npy with "
                        "one column per feature")
    p.add_argument("--out", required=True, metavar="HTML",
                   help="the report (- for stdout)")
    p.add_argument("--png", metavar="DIR",
                   help="also write each chart to DIR as PNG (made if missing)")
    p.add_argument("--label", metavar="COLUMN",
                   help="a 0/1 column of --data (1 = defaulted): adds the bad rate per band "
                        "and the AUC")
    p.add_argument("--baseline", metavar="CSV|NPY",
                   help="accounts to compare with, in the same columns (say, the ones the "
                        "card was fitted on): adds PSI per feature and of the score")
    p.add_argument("--policy", metavar="JSON",
                   help='the limit policy whose bands to show (JSON: {"bands": [{"min_score": '
                        '560, "limits": {"bus": 3000}}, ...]}, as qrpay scale score takes); '
                        "its lowest band is the cut-off. Without it, bands come from the card: "
                        "every pdo points from its base_score")
    p.add_argument("--cutoff", type=cli._int(-2**53, 2**53), metavar="SCORE",
                   help="a cut-off to draw when there is no --policy")
    p.add_argument("--reasons", type=cli._int(1, 8), default=3,
                   help="reason codes counted per account, 1 to 8 (default: %(default)s)")
    p.add_argument("--threads", type=cli._int(1, MAX_THREADS), default=1,
                   help="threads that score (default: %(default)s)")
    p.set_defaults(run=cmd_score_report)

    p = score.add_parser(
        "sample", help="write synthetic accounts as CSV (to try fit, apply and report)",
        description="Synthetic credit histories with a known ground truth "
                    "(qrpay.synthetic.histories): an account column, twelve feature columns "
                    "(eighteen with --categorical) and, unless --no-label, a 0/1 defaulted "
                    "column. The same --seed gives the same file.")
    p.add_argument("--accounts", type=cli._int(1, MAX_SAMPLE_ACCOUNTS), default=10_000,
                   help="how many accounts (rows) (default: %(default)s)")
    p.add_argument("--seed", type=cli._int(0, 2**63 - 1), default=0,
                   help="the random seed (default: %(default)s)")
    p.add_argument("--no-label", action="store_true",
                   help="leave out the defaulted column (accounts to score, outcomes unknown)")
    p.add_argument("--categorical", action="store_true",
                   help="add six categorical columns of known effect (employment type, "
                        "housing, ...: qrpay.synthetic_categories)")
    p.add_argument("--out", required=True, metavar="CSV", help="the CSV (- for stdout)")
    p.set_defaults(run=cmd_score_sample)
