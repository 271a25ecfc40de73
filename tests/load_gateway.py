"""One gateway process of the load test (tests/test_service_load.py): scans
its riders' tokens in rounds and syncs after each round through a transport
that drops connections (before a request is sent, and after it was sent but
before the answer came back), uploads some old batches again out of order,
and at the end syncs until nothing waits. Prints a JSON summary: what it
accepted, every batch it exported (written to a file), and every batch it
acked with the digest of its body."""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import msgpack

from qrpay import DeviceKey, Gateway, GatewayKey, IssuerKey, Role, Scene, TokenGenerator
from qrpay import Reason, TrustStore
from qrpay.gateway import GatewayPolicy
from qrpay.sync import ServiceUnavailable, SettlementClient
from qrpay.wire import split_document

NOW = 1_800_000_000
ISSUER = IssuerKey(bytes(range(32)))
RIDERS = 200          # per gateway: each gateway's riders are its own
ROUND = 500           # scans between syncs (one batch each)


class FlakyTransport(httpx.BaseTransport):
    """Drops a connection before sending (`before`) or after the server got
    the request and before its answer arrives (`after`): the second is the
    one that matters, the server may have stored what the gateway never
    hears about."""

    def __init__(self, rng: random.Random, before: float, after: float) -> None:
        self.inner = httpx.HTTPTransport()
        self.rng, self.before, self.after = rng, before, after
        self.dropped = {"before": 0, "after": 0}

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        roll = self.rng.random()
        if roll < self.before:
            self.dropped["before"] += 1
            raise httpx.ConnectError("injected: dropped before sending", request=request)
        response = self.inner.handle_request(request)
        if roll < self.before + self.after:
            response.read()
            response.close()
            self.dropped["after"] += 1
            raise httpx.ReadError("injected: dropped before the answer", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


def gateway_key(index: int) -> GatewayKey:
    return GatewayKey(bytes([100 + index]) * 32)


def main() -> None:
    index, workdir, urls, payments, seed = (int(sys.argv[1]), Path(sys.argv[2]),
                                            sys.argv[3].split(","), int(sys.argv[4]),
                                            int(sys.argv[5]))
    rng = random.Random(seed)
    trust = TrustStore()
    trust.add(ISSUER.public, roles=Role.CREDENTIALS | Role.DENY_LIST)
    phones = []
    for j in range(RIDERS):
        n = index * RIDERS + j
        device = DeviceKey(hashlib.blake2b(n.to_bytes(8, "little"), digest_size=32).digest())
        credential = ISSUER.issue(account=100_000 + n, device_public=device.public,
                                  limit=10**9, scenes=[Scene.BUS, Scene.METRO],
                                  not_before=NOW - 3600, not_after=NOW + 30 * 86_400,
                                  serial=1_000_000 + n)
        phones.append(TokenGenerator(credential, device))
    policy = GatewayPolicy(deny_list_max_age=None, max_offline_uses=10**6)
    transport = FlakyTransport(rng, before=0.05, after=0.05)
    exported: dict[int, bytes] = {}
    acked: dict[int, str] = {}
    again: list[list[Any]] = []
    accepted = amount_accepted = 0
    refused: dict[str, int] = {}
    started = time.monotonic()
    clock = NOW + index

    def sync_round(gateway: Gateway, client: SettlementClient) -> bool:
        """Export and sync one batch at a time until none waits; False if
        the service was not reached (the batch stays queued)."""
        while True:
            batch = gateway.export_batch(max_records=ROUND, now=clock)
            if batch is None:
                return True
            seq = int(msgpack.unpackb(split_document(batch)[0])["seq"])
            exported[seq] = batch
            report = gateway.sync(client, now=clock, max_records=ROUND, max_batches=1)
            if not report.online:
                return False
            if not report.acked:
                raise SystemExit(f"batch {seq} not acked: {report.problems}")
            acked[seq] = hashlib.blake2b(split_document(batch)[0], digest_size=32).hexdigest()

    with Gateway(workdir / f"gw{index}", gateway_key(index), trust, policy) as gateway, \
            SettlementClient(urls, retries=6, backoff=0.05, transport=transport) as client:
        done = 0
        while done < payments:
            count = min(ROUND, payments - done)
            tokens, amounts = [], []
            for k in range(count):
                clock += k % 16 == 0   # 16 scans a second: a busy line, tokens well within max_age
                phone = phones[rng.randrange(RIDERS)]
                tokens.append(phone.make(Scene.BUS, clock))
                amounts.append(rng.randrange(100, 400))
            result = gateway.scan_batch(tokens, amounts, Scene.BUS, now=clock)
            ok = result.ok
            for reason in result.reasons[~ok].tolist():
                refused[Reason(reason).name] = refused.get(Reason(reason).name, 0) + 1
            accepted += int(ok.sum())
            amount_accepted += int(sum(a for a, good in zip(amounts, ok.tolist()) if good))
            done += count
            sync_round(gateway, client)
            # Now and then an old batch again, out of order: the server must
            # answer `exists` and change nothing.
            if exported and rng.random() < 0.2:
                seq = rng.choice(list(exported))
                try:
                    answer = client.upload(exported[seq])
                    again.append([seq, answer.status_code, answer.json().get("status")])
                except ServiceUnavailable:
                    pass
        deadline = time.monotonic() + 120
        while gateway.unacked_records() and time.monotonic() < deadline:
            if not sync_round(gateway, client):
                time.sleep(0.5)
        waiting = gateway.unacked_records()
    with open(workdir / f"batches{index}.msgpack", "wb") as f:
        f.write(msgpack.packb([exported[s] for s in sorted(exported)]))
    print(json.dumps({"index": index, "gateway": gateway_key(index).public.gateway_id,
                      "accepted": accepted, "amount": amount_accepted, "waiting": waiting,
                      "acked": acked, "again": again, "refused": refused, "dropped": transport.dropped,
                      "seconds": round(time.monotonic() - started, 1)}))


if __name__ == "__main__":
    main()
