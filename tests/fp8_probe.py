"""A probe kernel for tests/test_sliding_tile_triton.py: the sliding-tile kernel's e4m3 row
quantisation (``_quant_rows``) on its own, so its bits can be compared with vorta_ops.fp8's.
Imported by the interpreter worker (TRITON_INTERPRET=1 is set before triton is imported)."""
import triton
import triton.language as tl

from vorta_ops.kernels.sliding_tile_kernel import _quant_rows


@triton.jit
def quant_rows_probe(x_ptr, o_ptr, s_ptr, R: tl.constexpr, D: tl.constexpr, EMULATE: tl.constexpr):
    r = tl.arange(0, R)
    d = tl.arange(0, D)
    x8, sc = _quant_rows(tl.load(x_ptr + r[:, None] * D + d[None, :]), EMULATE)
    tl.store(o_ptr + r[:, None] * D + d[None, :], x8.to(tl.float32))
    tl.store(s_ptr + r, sc)
