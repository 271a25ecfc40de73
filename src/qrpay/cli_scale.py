"""`qrpay scale ...`: the archive's jobs on a Dask cluster (qrpay.scale,
docs/SCALE.md): on the scheduler `--scheduler tcp://HOST:PORT` names, or on a
LocalCluster of `--workers N` processes started for the command."""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from qrpay import cli
from qrpay.cli_output import emit, silent
from qrpay.cli_progress import progress_bar
from qrpay.errors import Reason


@contextmanager
def _client(args: argparse.Namespace) -> Iterator[Any]:
    try:
        import distributed as module
    except ImportError as exc:
        raise cli.CliError(f"qrpay scale needs the scale extra: pip install 'qrpay[scale]' "
                           f"({exc})") from None
    distributed: Any = module   # untyped
    if args.scheduler:
        with distributed.Client(args.scheduler, timeout="30s") as client:
            yield client
        return
    from qrpay.scale import local_cluster
    with local_cluster(args.workers) as client:
        yield client


def _periods(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise cli.CliError("--periods is a comma-separated list of period numbers") from None


def cmd_verify(args: argparse.Namespace) -> int:
    from qrpay import scale
    trust = cli._trust(args)
    with _client(args) as client, progress_bar("re-verifying", quiet=silent(args)) as progress:
        result = scale.reverify(args.archive, trust, _periods(args.periods), client=client,
                                rows_per_task=args.rows_per_task, progress=progress)
    if args.failed_out:
        with open(args.failed_out, "w", newline="", encoding="utf-8") as handle:
            out = csv.writer(handle)
            out.writerow(["period", "row", "record", "reason"])
            for row in result.failed.tolist():
                out.writerow([row[0], row[1], row[2], Reason(row[3]).name])
    emit(args, {"periods": list(result.periods), "tokens": result.tokens,
                "by_reason": result.by_reason(), "failed": len(result.failed)})
    return cli.EXIT_OK if not len(result.failed) else cli.EXIT_REFUSED


def cmd_settle(args: argparse.Namespace) -> int:
    from qrpay import scale
    now = args.now
    with _client(args) as client, progress_bar("settling", quiet=silent(args)) as progress:
        result = scale.settle(args.archive, _periods(args.periods), now=now, client=client,
                              shards=args.shards, due_after=args.due_days * 86_400,
                              progress=progress)
    if args.history_out:
        cli._write_rows(args.history_out, result.history)
    kinds: dict[str, int] = {}
    for finding in result.findings:
        kinds[finding.kind] = kinds.get(finding.kind, 0) + 1
    emit(args, {"periods": list(result.periods), "records": result.records,
                "charged_total": result.charged_total,
                "not_charged_total": result.rejected_total,
                "accounts": len(result.accounts), "findings": kinds})
    return cli.EXIT_OK


def cmd_score(args: argparse.Namespace) -> int:
    from qrpay import scale
    from qrpay.scoring import LimitPolicy, Scorecard
    card = Scorecard.from_json(cli._read_text(args.card, "card"))
    try:
        policy = LimitPolicy.from_dict(json.loads(cli._read_text(args.policy, "policy")))
    except json.JSONDecodeError as exc:
        raise cli.CliError(f"{args.policy} is not JSON: {exc}") from None
    with _client(args) as client, progress_bar("scoring", quiet=silent(args)) as progress:
        result = scale.score(args.archive, card, policy, args.out, _periods(args.periods),
                             now=args.now, client=client, shards=args.shards,
                             due_after=args.due_days * 86_400, progress=progress)
    emit(args, {"accounts": result.accounts, "out": str(result.folder),
                "psi": result.psi, "bins": result.bins})
    return cli.EXIT_OK


def add_parsers(commands: argparse._SubParsersAction) -> None:   # type: ignore[type-arg]
    group = commands.add_parser(
        "scale", help="the archive's jobs on a Dask cluster (pip install 'qrpay[scale]')"
    ).add_subparsers(dest="scale_command", required=True, metavar="ACTION")

    def cluster_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--archive", required=True, help="the archive folder (every worker "
                                                        "reads it: a shared mount)")
        where = p.add_mutually_exclusive_group()
        where.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                           help="a running Dask scheduler (dask scheduler; dask worker on "
                                "each machine)")
        where.add_argument("--workers", type=cli._int(1, 1024), default=2,
                           help="without --scheduler: a local cluster of N worker processes "
                                "(default: 2)")
        p.add_argument("--periods", help="comma-separated period numbers (default: all)")

    def history_args(p: argparse.ArgumentParser) -> None:
        """What settle and score work the credit histories out with."""
        p.add_argument("--now", required=True, type=cli._TIME,
                       help="the time the credit histories are worked out at")
        p.add_argument("--shards", type=cli._int(1, 4096), default=8,
                       help="tasks the accounts are split into (default: 8; more when a "
                            "shard would not fit a worker's memory)")
        p.add_argument("--due-days", type=cli._int(0, 3650), default=7,
                       help="days after a charge it falls due (default: 7)")

    p = group.add_parser(
        "verify", help="verify every archived token again (JSON counts by reason)",
        description="Every token of the chosen periods is verified again on the cluster at "
                    "the time its gateway scanned it; prints the counts per reason. Exit 1 "
                    "when any fails (--failed-out lists them).")
    cluster_args(p)
    p.add_argument("--issuer-public", action="append", metavar="KEY", required=True,
                   help="an issuer public key tokens are verified with (text or file); "
                        "repeatable")
    p.add_argument("--rows-per-task", type=cli._int(1, 2**40), default=1_000_000,
                   help="tokens per task (default: 1,000,000; docs/SCALE.md, Sizing "
                        "partitions)")
    p.add_argument("--failed-out", metavar="CSV", help="write the rows that fail here")
    p.set_defaults(run=cmd_verify)

    p = group.add_parser(
        "settle", help="settle the archived records as one stream, sharded by account (JSON)",
        description="The records of the chosen periods settled as one stream on the cluster, "
                    "sharded by account: prints the totals and the findings by kind; "
                    "--history-out writes every account's credit history at --now as CSV "
                    "(the columns of qrpay history).")
    cluster_args(p)
    history_args(p)
    p.add_argument("--history-out", metavar="CSV", help="write the credit histories here")
    p.set_defaults(run=cmd_settle)

    p = group.add_parser(
        "score", help="score every account's credit history, limits by a policy (Parquet)",
        description="Each account's credit history at --now (as scale settle works it out) "
                    "scored with the card (features named as qrpay history's columns), its "
                    "limits from the policy, written to --out as one Parquet file per shard; "
                    "prints the PSI per feature against the last run written to --out.")
    cluster_args(p)
    p.add_argument("--card", required=True, help="the scorecard (JSON, qrpay score fit)")
    p.add_argument("--policy", required=True,
                   help='the limit policy (JSON: {"bands": [{"min_score": 560, "limits": '
                        '{"bus": 3000}}, ...]})')
    p.add_argument("--out", required=True, help="the folder the scores are written to")
    history_args(p)
    p.set_defaults(run=cmd_score)
