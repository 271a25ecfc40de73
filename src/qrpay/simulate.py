"""`qrpay simulate`: a city's day on embedded defaults, end to end.

What exists so far runs here: issuers issue credentials to citizens' phones,
phones make tokens offline all day, gateways verify them in batches, and a set
of planted attacks must each be rejected for the right reason. Later stages
(journal, settlement, scoring) join this same run.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from qrpay.credential import Credential, Scene
from qrpay.errors import Reason
from qrpay.format import CRED_LIMIT, TOKEN_COUNTER
from qrpay.keys import DeviceKey, IssuerKey
from qrpay._impl import backend, core
from qrpay.token import DEFAULT_MAX_AGE, DEFAULT_SKEW, generate_batch, verify_batch
from qrpay.trust import TrustStore

DAY_START = 1_800_000_000  # fixed, so a seed reproduces the same bytes
DAY = 86_400
GATEWAY_SCENES = (Scene.BUS, Scene.FERRY, Scene.METRO, Scene.CLINIC, Scene.CANTEEN,
                  Scene.LIBRARY)


@dataclass
class Planted:
    name: str
    expected: Reason
    got: Reason | None = None

    @property
    def caught(self) -> bool:
        return self.got == self.expected


@dataclass
class Report:
    citizens: int
    seed: int
    backend: str
    threads: int
    tokens: int = 0
    accepted: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    planted: list[Planted] = field(default_factory=list)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "citizens": self.citizens, "seed": self.seed, "backend": self.backend,
            "threads": self.threads, "tokens": self.tokens, "accepted": self.accepted,
            "by_reason": self.by_reason,
            "planted": [{"name": p.name, "expected": p.expected.name,
                         "got": p.got.name if p.got is not None else None,
                         "caught": p.caught} for p in self.planted],
            "stages": self.stages, "failures": self.failures, "ok": not self.failures,
        }


def _stage(report: Report, name: str, count: int, progress: TextIO,
           work: Callable[[], Any]) -> Any:
    progress.write(f"  {name} ({count:,}) ...")
    progress.flush()
    start = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - start
    report.stages[name] = {"count": count, "seconds": round(seconds, 4),
                           "per_second": round(count / seconds, 1) if seconds else 0.0}
    progress.write(f" {seconds:.2f} s, {count / seconds if seconds else 0:,.0f}/s\n")
    return result


def run(citizens: int = 20_000, trips: int = 4, seed: int = 1, threads: int = 2,
        progress: TextIO | None = None) -> Report:
    """Run the day; the report lists every planted attack and whether it was caught.
    Progress lines go to `progress` (default: stderr)."""
    progress = progress if progress is not None else sys.stderr
    rng = random.Random(seed)
    report = Report(citizens, seed, backend, threads)
    issuer = IssuerKey(rng.randbytes(32))
    retired = IssuerKey(rng.randbytes(32))
    trust = TrustStore(cache_size=max(4, 2 * citizens))
    trust.add(issuer, not_before=DAY_START - 365 * DAY, not_after=DAY_START + 365 * DAY)
    trust.add(retired, not_before=DAY_START - 730 * DAY, not_after=DAY_START - DAY)

    devices: list[DeviceKey] = _stage(
        report, "device keys", citizens, progress,
        lambda: [DeviceKey(rng.randbytes(32)) for _ in range(citizens)])

    def issue_all() -> list[Credential]:
        return [issuer.issue(account=100_000 + i, device_public=d.public,
                             limit=rng.choice((2000, 5000, 10000, 20000)),
                             scenes=GATEWAY_SCENES, not_before=DAY_START - 30 * DAY,
                             not_after=DAY_START + 60 * DAY, serial=i + 1)
                for i, d in enumerate(devices)]

    credentials: list[Credential] = _stage(report, "credentials", citizens, progress, issue_all)

    # Each citizen rides `trips` times; tokens are made right before each scan.
    n = citizens * trips
    who = np.repeat(np.arange(citizens), trips)
    counters = np.tile(np.arange(1, trips + 1), citizens).astype(np.uint32)
    times = np.sort(np.random.default_rng(seed).integers(
        DAY_START + 6 * 3600, DAY_START + 22 * 3600, size=n)).astype(np.uint32)
    scenes = np.array(GATEWAY_SCENES, dtype=np.uint8)[
        np.random.default_rng(seed + 1).integers(0, len(GATEWAY_SCENES), size=n)]
    tokens = _stage(report, "tokens signed", n, progress, lambda: generate_batch(
        [credentials[i] for i in who], [devices[i] for i in who], scenes, counters,
        times, threads=threads))

    def verify_all() -> np.ndarray:
        # Gateways verify what they scanned in each 30-second window as one batch.
        reasons = np.empty(n, dtype=np.uint8)
        window = times // 30
        edges = np.flatnonzero(np.diff(window)) + 1
        for start, end in zip(np.r_[0, edges], np.r_[edges, n]):
            reasons[start:end] = verify_batch(tokens[start:end], trust, int(times[end - 1]),
                                              threads=threads).reasons
        return reasons

    honest = _stage(report, "tokens verified", n, progress, verify_all)
    planted_tokens, report.planted = _plant(rng, issuer, retired, credentials[0], devices[0])
    planted_reasons = verify_batch(planted_tokens, trust, DAY_START + 12 * 3600).reasons
    reasons = np.concatenate([honest, planted_reasons])
    report.tokens = len(reasons)
    report.accepted = int(np.count_nonzero(reasons == Reason.OK))
    values, counts = np.unique(reasons, return_counts=True)
    report.by_reason = {Reason(int(v)).name: int(c) for v, c in zip(values, counts)}
    for p, r in zip(report.planted, planted_reasons):
        p.got = Reason(int(r))
        if not p.caught:
            report.failures.append(f"planted {p.name}: expected {p.expected.name}, "
                                   f"got {p.got.name}")
    rejected_honest = int(np.count_nonzero(honest != Reason.OK))
    if rejected_honest:
        report.failures.append(f"{rejected_honest} honest tokens were rejected")
    return report


def _plant(rng: random.Random, issuer: IssuerKey, retired: IssuerKey, victim: Credential,
           victim_device: DeviceKey) -> tuple[list[bytes], list[Planted]]:
    """Attacks that a verifying gateway alone must catch."""
    noon = DAY_START + 12 * 3600
    secret = victim_device._secret
    thief = DeviceKey(rng.randbytes(32))
    cases: list[tuple[str, Reason, bytes]] = []
    forged = bytearray(victim.raw)
    forged[CRED_LIMIT:CRED_LIMIT + 4] = (10_000_000).to_bytes(4, "little")
    cases.append(("credential with a raised limit", Reason.BAD_ISSUER_SIGNATURE,
                  core.make_token(bytes(forged), secret, noon, 900, Scene.BUS)))
    cases.append(("stolen credential, thief's phone", Reason.BAD_DEVICE_SIGNATURE,
                  core.make_token(victim.raw, thief._secret, noon, 901, Scene.BUS)))
    tampered = bytearray(core.make_token(victim.raw, secret, noon, 902, Scene.BUS))
    tampered[TOKEN_COUNTER] ^= 0x01
    cases.append(("tampered counter", Reason.BAD_DEVICE_SIGNATURE, bytes(tampered)))
    cases.append(("screenshot from this morning", Reason.TOKEN_STALE,
                  core.make_token(victim.raw, secret, noon - 3 * 3600, 903, Scene.BUS)))
    cases.append(("phone clock ten minutes fast", Reason.TOKEN_FROM_FUTURE,
                  core.make_token(victim.raw, secret, noon + 600, 904, Scene.BUS)))
    expired = issuer.issue(999_001, victim_device.public, 5000, [Scene.BUS],
                           DAY_START - 60 * DAY, DAY_START - DAY, serial=990_001)
    cases.append(("expired credential", Reason.CREDENTIAL_EXPIRED,
                  core.make_token(expired.raw, secret, noon, 1, Scene.BUS)))
    old_key = retired.issue(999_002, victim_device.public, 5000, [Scene.BUS],
                            DAY_START - 60 * DAY, DAY_START + DAY, serial=990_002)
    cases.append(("credential from a retired issuer key", Reason.ISSUER_KEY_NOT_VALID,
                  core.make_token(old_key.raw, secret, noon, 1, Scene.BUS)))
    rogue = IssuerKey(rng.randbytes(32)).issue(999_003, victim_device.public, 10**6,
                                               [Scene.BUS], DAY_START - DAY, DAY_START + DAY)
    cases.append(("credential from an unknown issuer", Reason.UNKNOWN_KID,
                  core.make_token(rogue.raw, secret, noon, 1, Scene.BUS)))
    bus_only = issuer.issue(999_004, victim_device.public, 5000, [Scene.BUS],
                            DAY_START - DAY, DAY_START + DAY, serial=990_004)
    cases.append(("bus-only credential at a clinic", Reason.SCENE_NOT_ALLOWED,
                  core.make_token(bus_only.raw, secret, noon, 1, Scene.CLINIC)))
    good = core.make_token(victim.raw, secret, noon, 905, Scene.BUS)
    cases.append(("half-read QR code", Reason.WRONG_LENGTH, good[:120]))
    return [token for _n, _r, token in cases], [Planted(n, r) for n, r, _t in cases]


def format_report(report: Report) -> str:
    lines = [
        f"qrpay simulate: {report.citizens:,} citizens, seed {report.seed}, "
        f"backend {report.backend}, {report.threads} threads",
        f"tokens: {report.tokens:,} verified, {report.accepted:,} accepted "
        f"(freshness {DEFAULT_MAX_AGE}s + skew {DEFAULT_SKEW}s)",
        "by reason:",
        *(f"  {name:<28}{count:>10,}" for name, count in sorted(report.by_reason.items())),
        "planted attacks:",
        *(f"  [{'caught' if p.caught else 'MISSED'}] {p.name}: "
          f"{p.got.name if p.got is not None else '-'}" for p in report.planted),
        "throughput:",
        *(f"  {name:<28}{s['per_second']:>12,.0f}/s  ({s['seconds']:.2f} s)"
          for name, s in report.stages.items()),
        "result: " + ("OK" if not report.failures else "FAILED: " + "; ".join(report.failures)),
    ]
    return "\n".join(lines)
