"""The `qrpay` command line (also `python -m qrpay`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from qrpay import simulate

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrpay", description="Offline signed QR payment tokens: issue, generate, verify.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sim = commands.add_parser(
        "simulate", help="run a city's day end to end on embedded defaults",
        description="Issue credentials to synthetic citizens, make their tokens offline, "
                    "verify them at gateways, plant attacks and report whether each was "
                    "caught. Exits 1 if any planted attack is missed or an honest token "
                    "is rejected.")
    sim.add_argument("--citizens", type=_positive, default=20_000,
                     help="number of citizens (default: %(default)s)")
    sim.add_argument("--trips", type=_positive, default=4,
                     help="rides per citizen in the day (default: %(default)s)")
    sim.add_argument("--seed", type=int, default=1, help="random seed (default: %(default)s)")
    sim.add_argument("--threads", type=_positive, default=2,
                     help="threads for signing and verifying (default: %(default)s)")
    sim.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "simulate":
        report = simulate.run(args.citizens, args.trips, args.seed, args.threads)
        print(simulate.format_report(report))
        if args.json:
            try:
                with open(args.json, "w", encoding="utf-8") as out:
                    json.dump(report.as_dict(), out, indent=2)
            except OSError as exc:
                print(f"qrpay: cannot write {args.json}: {exc.strerror}", file=sys.stderr)
                return EXIT_USAGE
        return EXIT_OK if not report.failures else EXIT_FAILED
    return EXIT_USAGE  # pragma: no cover  (argparse requires a command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
