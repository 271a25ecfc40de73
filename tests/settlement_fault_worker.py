"""Worker for test_settlement_faults.py (not a test module): one settlement
day of writes, each repeated as docs/SETTLEMENT.md "Failures" says when it
raises StoreUnavailable. The test runs it under strace, which fails one
fdatasync (or every one from there on) with EIO.

    python settlement_fault_worker.py CONFIG.json MODE

MODE is `crash` (die right after the first StoreUnavailable, as a power cut
would) or `retry` (repeat the failed call, at most TRIES times, then die).
CONFIG holds: directory, issuer (secret key hex), gateway (public key hex),
batch (path of a signed upload batch).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from qrpay import GatewayPublicKey, IssuerKey, Role, TrustStore
from qrpay.errors import StoreUnavailable
from qrpay.settlement import Settlement

NOW = 1_800_000_000
TRIES = 3
T = TypeVar("T")

# The repayments of the day: one alone, then a bank file of two.
ONE = (42, 500, NOW, "TX-1")
FILE = ([7, 8], [70, 80], [NOW, NOW + 1], ["TX-2", "TX-3"])
EXPECTED_REPAYMENTS = [(42, 500, NOW), (7, 70, NOW), (8, 80, NOW + 1)]


def day(config: dict[str, Any], retry: Callable[[str, Callable[[], Any]], Any]
        ) -> dict[str, Any]:
    """Every write settlement has, each through `retry`; what each returned."""
    issuer = IssuerKey(bytes.fromhex(config["issuer"]))
    trust = TrustStore()
    trust.add(issuer.public, roles=Role.CREDENTIALS | Role.DENY_LIST)
    # A part of tokens after every batch: its registration is one more commit.
    s: Settlement = retry("open", lambda: Settlement(config["directory"], trust,
                                                     token_part_rows=1))
    got: dict[str, Any] = {}
    got["register"] = retry("register", lambda: s.register_gateway(
        GatewayPublicKey(bytes.fromhex(config["gateway"]))))
    batch = Path(config["batch"]).read_bytes()
    got["ingest"] = retry("ingest", lambda: s.ingest(batch)).status.value
    got["publish"] = retry("publish", lambda: s.publish_deny_list(issuer, NOW))[0]
    got["repay"] = retry("repay", lambda: s.record_repayment(*ONE))
    got["file"] = retry("file", lambda: s.record_repayments(*FILE))
    got["repayments"] = s.repayments()
    got["batches"] = s.batch_count()
    s.close()
    return got


def main(config_path: str, mode: str) -> int:
    config = json.loads(Path(config_path).read_text())

    def retry(name: str, call: Callable[[], T]) -> T:
        for _ in range(TRIES):
            try:
                return call()
            except StoreUnavailable as exc:
                print("unavailable", name, exc, flush=True)
                if mode == "crash":
                    os._exit(3)
        os._exit(4)   # the fault did not clear: give up as a crash would

    got = day(config, retry)
    print("done", got["ingest"], got["repay"], got["file"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
