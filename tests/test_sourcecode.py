"""The package as a user's type checker and importer sees it."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path


import qrpay
from qrpay import _ref

PACKAGE = Path(qrpay.__file__).parent


def test_backend_is_the_compiled_core_unless_disabled() -> None:
    if os.environ.get("QRPAY_NO_EXTENSIONS", "") not in ("", "0"):
        assert qrpay.backend == "python"
    else:
        # A build that silently fell back to Python must not pass as compiled.
        assert qrpay.backend == "cython"


def test_package_ships_type_information() -> None:
    assert (PACKAGE / "py.typed").is_file()
    assert (PACKAGE / "_core.pyi").is_file()


def test_public_names_exist() -> None:
    for name in qrpay.__all__:
        assert hasattr(qrpay, name), name


def _stub_functions() -> dict[str, list[str]]:
    tree = ast.parse((PACKAGE / "_core.pyi").read_text())
    found: dict[str, list[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = [a.arg for a in node.args.args]
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    found[f"{node.name}.{item.name}"] = [a.arg for a in item.args.args]
    return found


def test_pure_python_twin_matches_the_stub() -> None:
    for name, params in _stub_functions().items():
        obj: object = _ref
        for part in name.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, property):
            continue
        assert callable(obj), name
        assert list(inspect.signature(obj).parameters) == params, name


def test_mypy_accepts_the_package_and_a_typical_caller(tmp_path: Path) -> None:
    caller = tmp_path / "caller.py"
    caller.write_text(textwrap.dedent("""
        import numpy as np
        import qrpay
        from qrpay import IssuerKey, DeviceKey, Scene, TrustStore, TokenGenerator
        from qrpay._impl import core

        issuer = IssuerKey.generate()
        device = DeviceKey.generate()
        cred = issuer.issue(1, device.public, 100, [Scene.BUS], 0, 2**32 - 1)
        trust = TrustStore()
        trust.add(issuer.public)
        token: bytes = TokenGenerator(cred, device).make(Scene.BUS)
        account: int = qrpay.verify(token, trust).account
        result = qrpay.verify_batch([token], trust, threads=2)
        ok: np.ndarray = result.ok
        reason: int = core.Verifier([], 16).verify_one(token, 0, 60, 30)
        try:
            qrpay.verify(b"", trust)
        except qrpay.QrPayError as exc:
            code: qrpay.Reason = exc.reason
    """))
    run = subprocess.run(
        # -p: the package as installed, stubs and py.typed included.
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "-p", "qrpay", "-m", "caller"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
