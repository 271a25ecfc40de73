"""Worker for test_period_crash.py (not a test module): closes one period of
a prepared settlement store and says so on stdout once close_period
returned. The test SIGKILLs it at random moments.

    python period_crash_worker.py STORE UNTIL ARCHIVE [spool]

(STORE a directory or a postgresql:// URL, ARCHIVE its archive folder.)
With `spool`, it writes the live tokens to the archive's spool as a part
(archive_tokens) instead, and says "spooled N".
"""

from __future__ import annotations

import sys

from qrpay.keys import SettlementKey
from qrpay.settlement import Settlement

KEY = SettlementKey(b"\x07" * 32)


def main(location: str, until: str, archive: str, mode: str = "close") -> int:
    settlement = Settlement(location, archive=archive)
    print("ready", flush=True)
    if mode == "spool":
        print("spooled", settlement.archive_tokens(), flush=True)
    else:
        closed = settlement.close_period(int(until), KEY, now=int(until))
        print("closed", closed.number, closed.charged_total, flush=True)
    settlement.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
