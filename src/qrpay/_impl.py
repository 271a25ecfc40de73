"""Chooses the core: the compiled module, or the pure-Python twin when
QRPAY_NO_EXTENSIONS=1 is set or the extension is not built."""

from __future__ import annotations

import os
from types import ModuleType

core: ModuleType
backend: str

if os.environ.get("QRPAY_NO_EXTENSIONS", "") not in ("", "0"):
    from qrpay import _ref as core

    backend = "python"
else:
    try:
        from qrpay import _core as core

        backend = "cython"
    except ImportError:  # not built (an sdist install without a compiler)
        from qrpay import _ref as core

        backend = "python"
