"""The interpreter probe's kernel (imported only when the interpreter backend is first chosen:
importing this module imports triton)."""

import triton
import triton.language as tl


@triton.jit
def probe_kernel(ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    value = tl.load(ptr + offs, mask=offs < n, other=0)
    tl.store(ptr + offs, value + offs + tl.program_id(0), mask=offs < n)
