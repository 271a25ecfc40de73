"""qrpay benchmarks: pytest-benchmark, with raw PyNaCl calls as the baseline.

Run them explicitly; plain `pytest` only collects tests/ (pyproject's
testpaths = ["tests"]):

    python -m pytest benchmarks            # full run: ~1 s per benchmark, ~12 s in all
    python -m pytest benchmarks -q --benchmark-min-rounds=3 --benchmark-max-time=0.05
                                           # short CI mode (.ci/run): ~2 s
    python -m pytest benchmarks --benchmark-max-time=3   # steadier medians, ~45 s

(--benchmark-max-time caps each benchmark's measuring time in seconds and
--benchmark-min-rounds sets a floor on rounds; both are pytest-benchmark 5
options. --benchmark-json=FILE also saves tokens/s and cache counters, which
the batch and cache benchmarks put in extra_info.)

The gateway benchmarks (test_bench_gateway.py) compare Gateway.scan_batch,
journal included, with verify_batch alone on the same tokens, and time single
Gateway.scan calls (median and p99, which pytest-benchmark does not report, in
extra_info["latency_us"] and in the summary). Their journal goes to pytest's
tmp_path unless QRPAY_BENCH_JOURNAL_DIR names a directory on the storage to
measure: a commit is an fsync, so the figures depend on that storage.

The baseline is libsodium reached through PyNaCl (`nacl.bindings.crypto_sign_open`
and `nacl.bindings.crypto_sign`) on the very messages the core signs and checks:
the credential's issuer signature over TAG_CRED || 67-byte body (16 + 67 bytes)
and the token's device signature over TAG_TOKEN || 140-byte body (16 + 140 bytes).
Every speed target is a ratio of medians measured in this one run, so a slow or
busy machine moves both sides of the ratio together.

At the end of the session the summary prints PASS / MISS per target with the
figures. A missed target does not fail the run (the machine may be shared and
noisy); a benchmark that errors, or that measured a wrong answer, fails it like
any other test. A benchmark test that failed is shown as ERROR in the summary.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nacl.bindings as sodium
import pytest

import qrpay
from qrpay import Credential, DeviceKey, IssuerKey, Scene, TokenGenerator, TrustStore
from qrpay.format import (
    CRED_BODY_LEN, CRED_ISSUER_SIG, CRED_LEN, TAG_CRED, TAG_TOKEN, TOKEN_BODY_LEN,
    TOKEN_DEVICE_SIG,
)

NOW = 1_800_000_000  # a fixed clock (2027-01-15), as in tests/
N_RIDERS = 64        # distinct credentials (one device each) in the shared pool
BATCH = 256          # tokens per verify_batch / generate_batch call
RIDER_SCENES = (Scene.BUS, Scene.FERRY, Scene.METRO)


# --------------------------------------------------------------------------
# Key material, built once per session (deterministic seeds, no randomness).

def _seed(label: str) -> bytes:
    return hashlib.sha256(f"qrpay-bench/{label}".encode()).digest()


@dataclass(frozen=True)
class Rider:
    account: int
    device: DeviceKey
    credential: Credential
    token: bytes        # one token, issued at NOW, counter 1, scene BUS
    cred_signed: bytes  # sig || TAG_CRED || body: what crypto_sign_open checks for the issuer
    token_signed: bytes  # sig || TAG_TOKEN || body: what crypto_sign_open checks for the device
    token_message: bytes  # TAG_TOKEN || body: what crypto_sign signs (16 + 140 bytes)


@dataclass(frozen=True)
class Env:
    """What the benchmark modules share, handed out as the `env` fixture (the
    modules do not import conftest: with tests/ collected in the same session
    that name is taken)."""

    now: int
    n_riders: int
    batch: int
    rider_scenes: tuple[Scene, ...]
    issuer: IssuerKey
    riders: list[Rider]


@pytest.fixture(scope="session")
def env() -> Env:
    issuer = IssuerKey(_seed("issuer"))
    return Env(NOW, N_RIDERS, BATCH, RIDER_SCENES, issuer, _make_riders(issuer))


def _make_riders(issuer: IssuerKey) -> list[Rider]:
    out = []
    for i in range(N_RIDERS):
        device = DeviceKey(_seed(f"device/{i}"))
        account = 10_000 + i
        credential = issuer.issue(account=account, device_public=device.public, limit=5_000,
                                  scenes=RIDER_SCENES, not_before=NOW - 86_400,
                                  not_after=NOW + 30 * 86_400, serial=1_000 + i)
        token = TokenGenerator(credential, device).make(Scene.BUS, NOW)
        out.append(Rider(
            account=account, device=device, credential=credential, token=token,
            cred_signed=token[CRED_ISSUER_SIG:CRED_LEN] + TAG_CRED + token[:CRED_BODY_LEN],
            token_signed=token[TOKEN_DEVICE_SIG:] + TAG_TOKEN + token[:TOKEN_BODY_LEN],
            token_message=TAG_TOKEN + token[:TOKEN_BODY_LEN],
        ))
    # The baseline messages are the sizes the core signs and checks.
    assert len(out[0].token_message) == 16 + 140
    assert len(out[0].cred_signed) == 64 + 16 + 67
    # Sanity: the raw baseline accepts exactly what qrpay signed.
    assert sodium.crypto_sign_open(out[0].cred_signed, issuer.public.to_bytes())
    assert sodium.crypto_sign_open(out[0].token_signed, out[0].device.public.to_bytes())
    return out


@pytest.fixture
def make_trust(env: Env) -> Callable[..., TrustStore]:
    """A fresh TrustStore per benchmark, so its cache_stats() start at (0, 0)."""
    def make(cache_size: int = 65_536) -> TrustStore:
        store = TrustStore(cache_size=cache_size)
        store.add(env.issuer.public)
        return store
    return make


# --------------------------------------------------------------------------
# Targets and the end-of-session summary.
#
# A benchmark's key is its test name without "test_", plus "_t<threads>" for
# the parametrized ones: test_verify_batch[threads=2] -> verify_batch_t2.

@dataclass(frozen=True)
class Target:
    name: str
    numerator: str      # key of the measured benchmark
    denominator: str    # key of the baseline benchmark
    limit: float
    at_most: bool       # True: ratio <= limit passes; False: ratio >= limit passes
    what: str


TARGETS = (
    Target("cold verify", "verify_cold", "raw_open_x2", 1.10, True,
           "qrpay.verify, issuer signature not cached / two raw crypto_sign_open"),
    Target("cached verify", "verify_cached", "raw_open_x2", 0.60, True,
           "qrpay.verify, issuer signature cached / two raw crypto_sign_open"),
    Target("verify_batch 2-thread scaling", "verify_batch_t1", "verify_batch_t2", 1.70, False,
           f"per-token median, threads=1 / threads=2 (batch of {BATCH}, warm cache)"),
    Target("token generation", "make", "raw_sign", 1.15, True,
           "TokenGenerator.make / one raw crypto_sign"),
    Target("gateway journal overhead", "scan_batch", "gateway_verify_batch", 1.20, True,
           f"Gateway.scan_batch (journal) / verify_batch alone, same {BATCH} tokens, threads=1"),
)

# Extra figures printed for context (never PASS/MISS).
LABELS = {
    "raw_open_x1": "raw crypto_sign_open x1 (token msg 16+140 B)",
    "raw_open_x2": "raw crypto_sign_open x2 (credential + token)",
    "raw_sign": "raw crypto_sign x1 (token msg 16+140 B)",
    "verify_cold": "qrpay.verify, cold credential",
    "verify_cached": "qrpay.verify, cached credential",
    "verify_batch_t1": f"qrpay.verify_batch x{BATCH}, threads=1",
    "verify_batch_t2": f"qrpay.verify_batch x{BATCH}, threads=2",
    "make": "TokenGenerator.make",
    "generate_batch_t1": f"qrpay.generate_batch x{BATCH}, threads=1",
    "generate_batch_t2": f"qrpay.generate_batch x{BATCH}, threads=2",
    "gateway_verify_batch": f"qrpay.verify_batch x{BATCH}, gateway tokens",
    "scan_batch": f"Gateway.scan_batch x{BATCH}, one commit",
    "scan": "Gateway.scan x1, one commit",
}
PER_CALL_ITEMS = {  # tokens handled per benchmarked call
    "verify_batch_t1": BATCH, "verify_batch_t2": BATCH,
    "generate_batch_t1": BATCH, "generate_batch_t2": BATCH,
    "gateway_verify_batch": BATCH, "scan_batch": BATCH,
}

BENCH_DIR = Path(__file__).resolve().parent
_bench_nodeids: set[str] = set()  # items collected from this directory
_failed_keys: set[str] = set()    # benchmarks whose test failed or errored in this session


def bench_key(test_name: str) -> str:
    match = re.fullmatch(r"test_(\w+?)(?:\[threads=(\d+)\])?", test_name)
    if match is None:
        return test_name
    return match[1] + (f"_t{match[2]}" if match[2] else "")


def pytest_sessionstart(session: pytest.Session) -> None:
    _bench_nodeids.clear()
    _failed_keys.clear()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Called with every collected item, tests/ too when both are run together.
    _bench_nodeids.update(i.nodeid for i in items if BENCH_DIR in Path(i.path).resolve().parents)


def pytest_report_header() -> str:
    return f"qrpay {qrpay.__version__} backend: {qrpay.backend}"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Setup, call or teardown: a failure before benchmark() ran still counts.
    if report.failed and report.nodeid in _bench_nodeids:
        _failed_keys.add(bench_key(report.nodeid.rpartition("::")[2]))


def _collect(config: pytest.Config) -> tuple[dict[str, float], set[str], dict[str, dict]]:
    """Per-item median seconds by key, the keys whose test failed, and each
    benchmark's extra_info by key."""
    session = getattr(config, "_benchmarksession", None)
    medians: dict[str, float] = {}
    extras: dict[str, dict] = {}
    broken = set(_failed_keys)
    for bench in getattr(session, "benchmarks", []):
        key = bench_key(bench.name)
        if bench.has_error:
            broken.add(key)
        elif key not in broken and bench.stats and bench.stats.rounds:
            medians[key] = bench.stats.median / PER_CALL_ITEMS.get(key, 1)
            extras[key] = dict(bench.extra_info)
    return medians, broken, extras


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:9.2f} us"


# Each section below (settlement, scoring) adds its targets and labels, and a
# function turning this run's medians into its own "info" lines.
Medians = dict[str, float]
Extras = dict[str, dict]
INFO_SECTIONS: list[Callable[[Medians, set[str], Extras], list[str]]] = []


def _write_targets(tr, medians: Medians, broken: set[str], extras: Extras) -> None:
    tr.write_sep("=", f"qrpay targets (medians of this run, backend={qrpay.backend})")
    tr.write_line("per-item median times:")
    for key, label in LABELS.items():
        if key in broken:
            tr.write_line(f"  {label:<48} ERROR (benchmark test failed)")
        elif key in medians:
            extra = ""
            if key in PER_CALL_ITEMS:
                extra = f"  per token; {1 / medians[key]:10,.0f} tokens/s"
            tr.write_line(f"  {label:<48} {_us(medians[key])}{extra}")
    tr.write_line("targets:")
    for t in TARGETS:
        if t.numerator in broken or t.denominator in broken:
            tr.write_line(f"  ERROR  {t.name}: a benchmark it needs failed", red=True)
            continue
        if t.numerator not in medians or t.denominator not in medians:
            tr.write_line(f"  n/a    {t.name}: not run ({t.numerator}, {t.denominator})")
            continue
        ratio = medians[t.numerator] / medians[t.denominator]
        ok = ratio <= t.limit if t.at_most else ratio >= t.limit
        sign = "<=" if t.at_most else ">="
        tr.write_line(
            f"  {'PASS' if ok else 'MISS'}   {t.name:<30} ratio {ratio:5.3f} (target {sign} {t.limit:.2f})"
            f"  [{_us(medians[t.numerator]).strip()} vs {_us(medians[t.denominator]).strip()}]"
            f"  {t.what}",
            green=ok, yellow=not ok)


def _core_info(medians: Medians, broken: set[str], extras: Extras) -> list[str]:
    info = []
    if "verify_batch_t1" in medians and "raw_open_x1" in medians:
        info.append(f"verify_batch threads=1 per token / one raw open: "
                    f"{medians['verify_batch_t1'] / medians['raw_open_x1']:.3f}")
    if "generate_batch_t1" in medians and "generate_batch_t2" in medians:
        info.append(f"generate_batch scaling threads=1 / threads=2 (per token): "
                    f"{medians['generate_batch_t1'] / medians['generate_batch_t2']:.3f}")
    if "generate_batch_t1" in medians and "raw_sign" in medians:
        info.append(f"generate_batch threads=1 per token / one raw sign: "
                    f"{medians['generate_batch_t1'] / medians['raw_sign']:.3f}")
    latency = extras.get("scan", {}).get("latency_us")
    if "scan" in medians and latency:
        info.append(f"Gateway.scan latency: median {latency['median']:.1f} us, "
                    f"p99 {latency['p99']:.1f} us, max {latency['max']:.1f} us "
                    f"({latency['samples']} calls, journal on "
                    f"{extras['scan'].get('journal_fs', '?')})")
    if "scan_batch" in medians and "scan" in medians:
        info.append(f"Gateway.scan_batch per token / one Gateway.scan (group commit): "
                    f"{medians['scan_batch'] / medians['scan']:.3f}")
    return info


INFO_SECTIONS.append(_core_info)


# --------------------------------------------------------------------------
# Settlement (test_bench_settlement.py). A self-contained section: it adds one
# target, its labels and an info section with the totals.
#
# Target: the bookkeeping for 1,000,000 transactions (ledger.settle +
# ledger.totals_by_account over 1M records) at most 5% of verifying their
# signatures once each (verify_batch threads=1 on 2,000 real tokens, warm
# credential cache: one Ed25519 verify per token, scaled to 1,000,000). Both
# medians are divided per transaction, so the ratio is the ratio of the totals.
# The section adds about 10 s to a run (building the 1M-row day, and one
# Settlement.report() over a store holding it).

SETTLEMENT_RECORDS = 1_000_000
SETTLEMENT_SAMPLE = 2_000
TARGETS = TARGETS + (
    Target("settlement bookkeeping", "settlement_kernel_1m", "settlement_verify_baseline",
           0.05, True, "per transaction: settle + totals_by_account over 1M records / one "
           "Ed25519 verify (verify_batch threads=1, warm cache)"),
)
LABELS.update({
    "settlement_kernel_1m": "ledger.settle + totals_by_account (of 1M records)",
    "settlement_verify_baseline": f"qrpay.verify_batch x{SETTLEMENT_SAMPLE:,}, threads=1 (baseline)",
})
PER_CALL_ITEMS.update({"settlement_kernel_1m": SETTLEMENT_RECORDS,
                       "settlement_verify_baseline": SETTLEMENT_SAMPLE})

def _settlement_info(medians: Medians, broken: set[str], extras: Extras) -> list[str]:
    lines = []
    kernel, verify = medians.get("settlement_kernel_1m"), medians.get("settlement_verify_baseline")
    if kernel is not None and verify is not None:
        lines.append(f"settlement, {SETTLEMENT_RECORDS:,} transactions: bookkeeping "
                     f"{kernel * SETTLEMENT_RECORDS:.3f} s vs verifying each once "
                     f"{verify * SETTLEMENT_RECORDS:.1f} s ({verify * 1e6:.2f} us x "
                     f"{SETTLEMENT_RECORDS:,}) = {100 * kernel / verify:.2f}% (target <= 5%)")
    # Figures, not targets; each also as a multiple of the kernel's time on the
    # same 1M records, measured in this run.
    whole_kernel = kernel * SETTLEMENT_RECORDS if kernel is not None else None

    def versus(key: str) -> str:
        return f", {medians[key] / whole_kernel:.2f}x the settlement kernel" if whole_kernel else ""

    if "settlement_report_1m" in broken:
        lines.append("Settlement.report() over 1M stored records: ERROR (benchmark test failed)")
    elif "settlement_report_1m" in medians:
        extra = extras.get("settlement_report_1m", {})
        lines.append(f"Settlement.report() over {SETTLEMENT_RECORDS:,} stored records "
                     f"({extra.get('batches', '?')} batches, {extra.get('store_mb', '?')} MB): "
                     f"{medians['settlement_report_1m']:.2f} s{versus('settlement_report_1m')}, "
                     f"of which the SQLite read {extra.get('store_read_s', '?')} s "
                     f"(a figure, not a target)")
    if "credit_history_1m" in broken:
        lines.append("credit.history over the 1M-record day: ERROR (benchmark test failed)")
    elif "credit_history_1m" in medians:
        extra = extras["credit_history_1m"]     # the benchmark always records both
        lines.append(f"credit.history over {extra['charges']:,} charges and "
                     f"{extra['repayments']:,} repayments: {medians['credit_history_1m']:.2f} s"
                     f"{versus('credit_history_1m')} (a figure, not a target)")
    return lines


INFO_SECTIONS.append(_settlement_info)


# --------------------------------------------------------------------------
# Scorecards (test_bench_scoring.py). A self-contained section: two targets,
# their labels, and an info section for rows/s and the optional optbinning /
# toad figures. Medians are per call (1,000,000 rows x 12
# features); both targets are ratios of medians of this run.

SCORING_ROWS = 1_000_000
TARGETS = TARGETS + (
    Target("scorecard vs numpy reference", "scorecard_numpy_reference", "scorecard_score_t1",
           15.0, False, "speed-up: numpy searchsorted reference / Scorecard.score threads=1 "
           "(1M x 12)"),
    Target("scorecard 2-thread scaling", "scorecard_score_t1", "scorecard_score_t2", 1.70,
           False, "Scorecard.score threads=1 / threads=2 (1M x 12)"),
)
LABELS.update({
    "scorecard_numpy_reference": "numpy searchsorted reference scorer, 1M x 12",
    "scorecard_score_t1": "Scorecard.score 1M x 12, threads=1",
    "scorecard_score_t2": "Scorecard.score 1M x 12, threads=2",
    "scorecard_explain": "Scorecard.explain k=3, 1M x 12, threads=1",
    "scorecard_optbinning": "optbinning Scorecard.score, 1M x 12 (own card)",
    "scorecard_toad": "toad ScoreCard.predict, 1M x 12 (own card)",
    "scorecard_fit": "Scorecard.fit, 200k x 12 synthetic histories",
    "scorecard_fit_optbinning": "optbinning Scorecard.fit, same 200k x 12",
    "scorecard_fit_toad": "toad binning + WOE + ScoreCard.fit, same 200k x 12",
})

def _scoring_info(medians: Medians, broken: set[str], extras: Extras) -> list[str]:
    lines = []
    t1 = medians.get("scorecard_score_t1")
    for key in ("scorecard_score_t1", "scorecard_score_t2", "scorecard_explain",
                "scorecard_numpy_reference", "scorecard_optbinning", "scorecard_toad"):
        if key in medians:
            rate = SCORING_ROWS / medians[key] / 1e6
            versus = (f", {medians[key] / t1:.2f}x the time of score threads=1"
                      if t1 and key != "scorecard_score_t1" else "")
            lines.append(f"{LABELS[key]}: {medians[key] * 1e3:.1f} ms, "
                         f"{rate:.1f} M rows/s{versus}")
    for key in ("scorecard_optbinning", "scorecard_toad"):
        if key not in medians and key not in broken and t1 is not None:
            lines.append(f"{LABELS[key]}: not measured (not importable here)")
    ours = medians.get("scorecard_fit")
    for key in ("scorecard_fit", "scorecard_fit_optbinning", "scorecard_fit_toad"):
        if key in medians:
            extra = extras.get(key, {})
            versus = (f", {medians[key] / ours:.1f}x the time of ours"
                      if ours and key != "scorecard_fit" else "")
            lines.append(f"{LABELS[key]}: {medians[key]:.2f} s{versus}; held-out AUC "
                         f"{extra.get('auc', '?')} (true model {extra.get('ceiling', '?')})")
        elif key not in broken and ours is not None:
            lines.append(f"{LABELS[key]}: not measured (not importable here)")
    return lines


INFO_SECTIONS.append(_scoring_info)


# --------------------------------------------------------------------------

@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table
def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    medians, broken, extras = _collect(config)
    if not medians and not broken:
        return  # benchmarks skipped or disabled, or none collected
    _write_targets(terminalreporter, medians, broken, extras)
    for section in INFO_SECTIONS:
        for line in section(medians, broken, extras):
            terminalreporter.write_line(f"  info   {line}")
    terminalreporter.write_line(
        "(a MISS does not fail the run: timings on a shared machine are noisy)")


@pytest.fixture(scope="session")
def write_at_end() -> Callable[[pytest.FixtureRequest, list[str]], None]:
    """_write_at_end, as a fixture (the modules do not import conftest)."""
    return _write_at_end


def _write_at_end(request: pytest.FixtureRequest, lines: list[str]) -> None:
    """Print `lines` in the terminal summary area of a module's run, past
    pytest's output capture (the modules with their own tables call it
    from a module-scoped fixture after their benchmarks ran)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or not lines:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        for line in lines:
            reporter.write_line(line)
