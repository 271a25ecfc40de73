"""Worker for test_period_crash.py (not a test module): closes one period of
a prepared settlement store and says so on stdout once close_period
returned. The test SIGKILLs it at random moments.

    python period_crash_worker.py STORE UNTIL ARCHIVE

(STORE a directory or a postgresql:// URL, ARCHIVE its archive folder.)
"""

from __future__ import annotations

import sys

from qrpay.keys import SettlementKey
from qrpay.settlement import Settlement

KEY = SettlementKey(b"\x07" * 32)


def main(location: str, until: str, archive: str) -> int:
    settlement = Settlement(location, archive=archive)
    print("ready", flush=True)
    closed = settlement.close_period(int(until), KEY, now=int(until))
    print("closed", closed.number, closed.charged_total, flush=True)
    settlement.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3]))
