"""A gateway process for test_gateway_crash.py to SIGKILL mid-flight.

    python crash_worker.py DIRECTORY SEED MODE

Opens a Gateway on DIRECTORY with fixed keys (derived from fixed seeds, so the
test process can build the very same world) and scans forever, mixing `scan`
and `scan_batch` calls, with a clock that moves one second per call. After
every call it writes one line per receipt to stdout and flushes (after a
first line `START <backend> <counters journaled> <time floor>`):

    ACK <serial> <counter> <record> <amount> <gateway_time> <dup> <token-hex>

MODE "mixed" mostly makes single scans (`scan`, or `scan_batch` of one) and
now and then a small batch; "big" mostly makes batches of 300 to 1500 tokens,
so that a kill can land inside a large commit, or after it but before (all)
its ACK lines were written.

MODE "upload" (for test_gateway_prune_crash.py) runs a gateway with
retention 0 and a clock 40 s per call, and after about every other call
exports a batch, writes `BATCH <hex>` (settlement has it from then on), acks
it (which prunes) and writes `ACKED <seq>`. Its counters come from the clock,
so they keep growing after pruning has emptied the journal.

The worker keeps no state of its own: after a restart it takes its clock from
the gateway's time floor and each rider's next counter from the journal, so
it continues where the last committed scan left off. It plants a few double
taps (the very same bytes again) and checks that each comes back as the first
receipt with duplicate=True. Anything unexpected (a fresh token refused, a
double tap charged) exits with status 3 and a message on stderr.
"""

from __future__ import annotations

import hashlib
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

from qrpay import (
    Credential, DeviceKey, GatewayKey, IssuerKey, Reason, Scene, TrustStore, backend,
    generate_batch,
)
from qrpay.format import U32_MAX
from qrpay.gateway import Gateway, GatewayPolicy, Receipt

BASE_TIME = 1_800_000_000
RIDERS = 40
SCENE = Scene.BUS
MAX_AMOUNT = 300


def _seed(label: str) -> bytes:
    return hashlib.sha256(b"qrpay-crash-test/" + label.encode()).digest()


@dataclass(frozen=True)
class World:
    issuer: IssuerKey
    gateway_key: GatewayKey
    trust: TrustStore
    policy: GatewayPolicy
    devices: list[DeviceKey]
    credentials: list[Credential]

    def open(self, directory: str | Path, policy: GatewayPolicy | None = None) -> Gateway:
        return Gateway(directory, self.gateway_key, self.trust, policy or self.policy)


def world() -> World:
    """Keys, riders and policy, the same in every process."""
    issuer = IssuerKey(_seed("issuer"))
    trust = TrustStore()
    trust.add(issuer.public)
    # Offline caps out of the way: a long run makes thousands of payments per
    # rider and never acks. Tokens stay fresh for a day so that the test can
    # replay every token of a round with one `now`; the journal (not freshness)
    # is what must refuse them.
    policy = GatewayPolicy(max_age=86_400, max_offline_uses=1 << 40, deny_list_max_age=None)
    devices = [DeviceKey(_seed(f"device-{i}")) for i in range(RIDERS)]
    credentials = [
        issuer.issue(account=10_000 + i, device_public=d.public, limit=U32_MAX,
                     scenes=[Scene.BUS, Scene.METRO], not_before=BASE_TIME - 86_400,
                     not_after=BASE_TIME + 365 * 86_400, serial=7_000_000 + i)
        for i, d in enumerate(devices)
    ]
    return World(issuer, GatewayKey(_seed("gateway")), trust, policy, devices, credentials)


UPLOAD_STEP = 40    # seconds per call in "upload" mode: records age out fast
UPLOAD_POLICY = GatewayPolicy(max_age=60, skew=30, max_offline_uses=1 << 40,
                              deny_list_max_age=None, retention=0)


def upload_main(directory: str, rng: random.Random) -> None:
    w = world()
    gateway = w.open(directory, UPLOAD_POLICY)
    now = max(BASE_TIME, gateway.time_floor)
    out = sys.stdout
    out.write(f"START {backend} {len(gateway.records())} {gateway.time_floor}\n")
    out.flush()
    while True:
        now += UPLOAD_STEP
        counter = (now - BASE_TIME) // UPLOAD_STEP   # grows across restarts and prunes
        riders = rng.sample(range(RIDERS), rng.choice((1, 1, 2, rng.randint(3, RIDERS))))
        array = generate_batch([w.credentials[i] for i in riders],
                               [w.devices[i] for i in riders], np.full(len(riders), int(SCENE)),
                               [counter] * len(riders), now)
        tokens = [bytes(row) for row in array]
        amounts = [rng.randint(1, MAX_AMOUNT) for _ in riders]
        receipts = _scan(gateway, rng, tokens, amounts, now)
        out.writelines(_ack_line(token, receipt) for token, receipt in zip(tokens, receipts))
        out.flush()
        if rng.random() < 0.5:
            batch = gateway.export_batch(max_records=rng.randint(1, 60), now=now)
            if batch is not None:
                out.write(f"BATCH {batch.hex()}\n")
                out.flush()
                seq = msgpack.unpackb(msgpack.unpackb(batch)[0])["seq"]
                gateway.ack(seq)
                out.write(f"ACKED {seq}\n")
                out.flush()


def _scan(gateway: Gateway, rng: random.Random, tokens: list[bytes], amounts: list[int],
          now: int) -> list[Receipt]:
    """`scan` (half the time, for a single token) or `scan_batch`; any refusal
    ends the worker."""
    if len(tokens) == 1 and rng.random() < 0.5:
        return [gateway.scan(tokens[0], amounts[0], SCENE, now)]
    result = gateway.scan_batch(tokens, amounts, SCENE, now)
    if not result.ok.all():
        fail(f"refused at {now}: "
             f"{[Reason(int(x)).name for x in result.reasons if x != Reason.OK][:5]}")
    return [r for r in result.receipts if r is not None]


def _ack_line(token: bytes, r: Receipt) -> str:
    return (f"ACK {r.serial} {r.counter} {r.record} {r.amount} {r.gateway_time} "
            f"{int(r.duplicate)} {token.hex()}\n")


def fail(message: str) -> None:
    sys.stderr.write(f"crash_worker: {message}\n")
    sys.stderr.flush()
    sys.exit(3)


def main(argv: list[str]) -> None:
    directory, seed, mode = argv[1], int(argv[2]), argv[3]
    rng = random.Random(seed)
    if mode == "upload":
        upload_main(directory, rng)
        return
    w = world()
    gateway = w.open(directory)
    by_serial = {c.serial: i for i, c in enumerate(w.credentials)}
    counters = [0] * RIDERS          # the last counter journaled, per rider
    for r in gateway.records():
        i = by_serial[r.serial]
        counters[i] = max(counters[i], r.counter)
    now = max(BASE_TIME, gateway.time_floor)
    recent: list[tuple[bytes, int, int]] = []   # (token, record, amount) to double-tap
    out = sys.stdout
    out.write(f"START {backend} {sum(counters)} {gateway.time_floor}\n")
    out.flush()

    while True:
        now += 1
        if mode == "big":
            n = rng.randint(300, 1500) if rng.random() < 0.8 else 1
        else:
            n = rng.choice((1, 1, 1, 1, rng.randint(2, 40)))
        riders = [rng.randrange(RIDERS) for _ in range(n)]
        scan_counters = []
        for i in riders:
            counters[i] += 1
            scan_counters.append(counters[i])
        array = generate_batch([w.credentials[i] for i in riders], [w.devices[i] for i in riders],
                               np.full(n, int(SCENE)), scan_counters, now)
        tokens = [bytes(row) for row in array]
        amounts = [rng.randint(1, MAX_AMOUNT) for _ in range(n)]
        taps: list[tuple[bytes, int, int]] = []
        if recent and n > 1 and rng.random() < 0.3:
            taps = rng.sample(recent, min(len(recent), 3))
        scan_tokens = tokens + [t for t, _, _ in taps]
        scan_amounts = amounts + [rng.randint(1, MAX_AMOUNT) for _ in taps]

        receipts = _scan(gateway, rng, scan_tokens, scan_amounts, now)
        lines = []
        for k, (token, receipt) in enumerate(zip(scan_tokens, receipts)):
            if k < n:
                expected = (w.credentials[riders[k]].serial, scan_counters[k], amounts[k], now)
                if receipt.duplicate or (receipt.serial, receipt.counter, receipt.amount,
                                         receipt.gateway_time) != expected:
                    fail(f"fresh token {receipt} came back wrong")
                recent.append((token, receipt.record, receipt.amount))
            else:
                _, record, amount = taps[k - n]
                if not receipt.duplicate or (receipt.record, receipt.amount) != (record, amount):
                    fail(f"double tap {receipt} is not the first receipt {record}")
            lines.append(_ack_line(token, receipt))
        del recent[:-200]
        for line in lines:   # block-buffered: a big call reaches the file in 8 KiB pieces
            out.write(line)
        out.flush()


if __name__ == "__main__":
    main(sys.argv)
