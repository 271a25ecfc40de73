"""Settlement shared: two processes creating one new store at the same instant
must both open (issue 10, D6: the second failed at once with `database is
locked`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


TRIALS = 1000        # racing pairs per run: ~3 s
SPACING = 0.003      # seconds between the pairs' start instants (an open takes ~1 ms on tmpfs)
SHM = Path("/dev/shm")

# One racer: opens Settlement(base/i) at start + i * spacing for every trial i,
# sleeping, then spinning up to that instant so that both racers start together.
# The window that made the old code fail is ~10 us wide (both must hold SQLite's
# shared lock on the new file at once), so racers are long-lived and spin.
RACER = """
import json, sys, time
from qrpay import IssuerKey, TrustStore
from qrpay.settlement import Settlement
base, start, spacing, trials = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
trust = TrustStore()
trust.add(IssuerKey(bytes(range(32))).public)
out = []
for i in range(trials):
    at = start + i * spacing
    time.sleep(max(0.0, at - time.time() - 0.002))   # a sleeper gets the CPU when it wakes
    while time.time() < at:
        pass
    try:
        Settlement(f"{base}/{i}", trust).close()
        out.append("opened")
    except Exception as exc:
        out.append(f"{type(exc).__name__}: {exc}")
print(json.dumps(out))
"""


def test_two_processes_create_one_new_store_at_once(tmp_path: Path) -> None:
    # On tmpfs an open is 5x faster than on disk (no real fsync): 5x more races
    # in the same time. The race is over locks, which tmpfs has the same.
    on_shm = SHM.is_dir() and os.access(SHM, os.W_OK)
    with tempfile.TemporaryDirectory(dir=SHM if on_shm else tmp_path) as base:
        for i in range(TRIALS):   # made here: two mkdirs of one name would not start together
            Path(base, str(i)).mkdir()
        # Imports take a while: the first instant is far enough ahead for both.
        start = time.time() + 2.0
        racers = [subprocess.Popen([sys.executable, "-c", RACER, base, str(start), str(SPACING),
                                    str(TRIALS)], stdout=subprocess.PIPE, text=True)
                  for _ in range(2)]
        results = [json.loads(p.communicate(timeout=120)[0]) for p in racers]
    failed = [r for both in zip(*results) for r in both if r != "opened"]
    assert failed == [], f"{len(failed)} of {2 * TRIALS} opens failed: {failed[:3]}"
