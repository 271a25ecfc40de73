"""Worker for test_settlement_crash.py (not a test module): ingests prepared
batch files, in order, into a settlement directory, and says so on stdout
after each ingest returns. The test SIGKILLs it at random moments.

    python settlement_crash_worker.py CONFIG.json

CONFIG holds: directory (or a store URL) and archive, issuer (public key
hex), gateways (public key hex list) and batches (file paths).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qrpay import GatewayPublicKey, IssuerPublicKey, TrustStore
from qrpay.settlement import Settlement


def main(config_path: str) -> int:
    config = json.loads(Path(config_path).read_text())
    trust = TrustStore()
    trust.add(IssuerPublicKey(bytes.fromhex(config["issuer"])))
    settlement = Settlement(config["directory"], trust,
                            [GatewayPublicKey(bytes.fromhex(g)) for g in config["gateways"]],
                            archive=config.get("archive"))
    print("ready", flush=True)
    for i, path in enumerate(config["batches"]):
        result = settlement.ingest(Path(path).read_bytes())
        print(i, result.status.value, result.records, flush=True)
    settlement.close()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
