"""Whether the Triton CPU interpreter can run the kernel tests here (TRITON_INTERPRET=1 workers).

triton before 3.7 converts 1-element arrays with int(), which numpy 2.4+ refuses ("only
0-dimensional arrays can be converted to Python scalars"): every kernel with a loop bound then
fails inside the interpreter, whatever the kernel. Triton 3.7 squeezes first. This module names
that combination as a skip reason instead of 70 identical failures (the GPU tests still compile the
kernels for real)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re


def _version(dist: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", importlib.metadata.version(dist))[:3])


def interpreter_skip_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (the Triton kernels are optional)"
    import numpy as np

    try:
        int(np.zeros(1))
        return None
    except TypeError:
        pass
    if _version("triton") >= (3, 7):
        return None
    return (f"triton {importlib.metadata.version('triton')}'s CPU interpreter cannot run with numpy {np.__version__} "
            "(int() of a 1-element array; fixed in triton 3.7): install triton>=3.7 or numpy<2.4 for the interpreter tests")


SKIP_REASON = interpreter_skip_reason()
