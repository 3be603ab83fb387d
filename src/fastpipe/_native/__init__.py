"""Native kernels (Cython, GIL released) and the choice between them and their twins.

``scan`` and ``cdc`` are the compiled extension modules. They are required: when one is
missing (the package was not built) importing this package raises ImportError saying so.
``FASTPIPE_NO_EXTENSIONS=1`` selects the plain-Python twins instead (``_scan_py``,
``_cdc_py``): they give the same results a thousand times slower, for debugging only.
"""

from __future__ import annotations

import os
from types import ModuleType

#: True when the plain-Python twins stand in for the extensions (debugging only).
NO_EXTENSIONS = os.environ.get("FASTPIPE_NO_EXTENSIONS", "") == "1"

scan: ModuleType
cdc: ModuleType

if NO_EXTENSIONS:
    from . import _cdc_py as cdc
    from . import _scan_py as scan
else:
    try:
        from . import _cdc as cdc
        from . import _scan as scan
    except ImportError as exc:
        raise ImportError(
            f"fastpipe's native extensions are missing or broken ({exc}); build them with "
            "`python setup.py build_ext --inplace` or reinstall fastpipe "
            "(FASTPIPE_NO_EXTENSIONS=1 forces the slow plain-Python twins, for debugging)"
        ) from exc

__all__ = ["NO_EXTENSIONS", "cdc", "scan"]
