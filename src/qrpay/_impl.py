"""Chooses the core: the compiled module, or the pure-Python twin when
QRPAY_NO_EXTENSIONS=1 is set or the extension is not built."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

__all__ = ["backend", "core"]

backend: str

if TYPE_CHECKING:
    # Type checkers read the compiled core's stubs (_core.pyi); _ref matches them.
    from qrpay import _core as core  # noqa: F401
elif os.environ.get("QRPAY_NO_EXTENSIONS", "") not in ("", "0"):
    from qrpay import _ref as core
else:
    try:
        from qrpay import _core as core  # noqa: F401
    except ImportError:  # not built (an sdist install without a compiler)
        from qrpay import _ref as core

backend = "python" if core.__name__.endswith("_ref") else "cython"
