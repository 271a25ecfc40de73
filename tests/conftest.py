"""Shared fixtures. The whole suite runs once per backend: plain `pytest` tests
the compiled core, `QRPAY_NO_EXTENSIONS=1 pytest` the pure-Python twin (the
README's test command runs both)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from collections.abc import Iterator
from types import ModuleType

import pytest
from hypothesis import HealthCheck, settings

import qrpay
import stores
from pg_server import PostgresServer
from qrpay import Credential, DeviceKey, IssuerKey, Role, Scene, TokenGenerator, TrustStore

DATA = Path(__file__).parent / "data"

# Hypothesis: a quick default, a thorough profile on request (HYPOTHESIS_PROFILE=slow).
settings.register_profile("default", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

NOW = 1_800_000_000  # a fixed clock: 2027-01-15T08:00:00Z


NO_EXTENSIONS = os.environ.get("QRPAY_NO_EXTENSIONS", "") not in ("", "0")


def compiled_core() -> ModuleType:
    """qrpay._core, for tests that compare it with the twin. Failing to import
    it is a test failure, unless the pure-Python twin was asked for."""
    try:
        return importlib.import_module("qrpay._core")
    except ImportError as exc:
        if NO_EXTENSIONS:
            pytest.skip(f"QRPAY_NO_EXTENSIONS is set and qrpay._core is not built ({exc})")
        raise


def pytest_report_header() -> str:
    return f"qrpay backend: {qrpay.backend}"


# -- the settlement store on SQLite and on PostgreSQL (tests/stores.py) ----------------------

# The load test runs in the compiled run: in the twin's, the service replicas
# it starts would verify its 100,000 tokens in Python.
collect_ignore = ["test_service_load.py"] if NO_EXTENSIONS else []

# The store layer is pure Python, the same under either core: the twin's run
# (QRPAY_NO_EXTENSIONS=1) settles on SQLite only, and the compiled run on both.
STORE_KINDS = ("sqlite",) if NO_EXTENSIONS else ("sqlite", "postgresql")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sqlite_only: a test of SQLite itself, in a module "
                                       "whose tests run on each store")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_kind" in metafunc.fixturenames:
        sqlite_only = metafunc.definition.get_closest_marker("sqlite_only") is not None
        metafunc.parametrize("store_kind", ["sqlite"] if sqlite_only else list(STORE_KINDS))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (started on first use; failing to start
    is an error, not a skip)."""
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def each_store(store_kind: str, request: pytest.FixtureRequest) -> Iterator[str]:
    stores.use(request.getfixturevalue("postgres") if store_kind == "postgresql" else None)
    yield store_kind
    stores.use(None)


@pytest.fixture
def now() -> int:
    return NOW


@pytest.fixture
def issuer() -> IssuerKey:
    return IssuerKey(bytes(range(32)))


@pytest.fixture
def device() -> DeviceKey:
    return DeviceKey(bytes(range(32, 64)))


@pytest.fixture
def trust(issuer: IssuerKey) -> TrustStore:
    store = TrustStore()
    store.add(issuer)
    return store


@pytest.fixture
def credential(issuer: IssuerKey, device: DeviceKey) -> Credential:
    return issuer.issue(account=1001, device_public=device.public, limit=5000,
                        scenes=[Scene.BUS, Scene.METRO, Scene.CLINIC],
                        not_before=NOW - 86400, not_after=NOW + 30 * 86400, serial=77)


@pytest.fixture
def generator(credential: Credential, device: DeviceKey) -> TokenGenerator:
    return TokenGenerator(credential, device)


@pytest.fixture
def deny_trust(issuer: IssuerKey) -> TrustStore:
    """The issuer trusted for credentials and deny lists."""
    store = TrustStore()
    store.add(issuer, roles=Role.CREDENTIALS | Role.DENY_LIST)
    return store
