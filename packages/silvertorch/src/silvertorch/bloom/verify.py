"""Exact verification of candidates as one custom op, `silvertorch::verify_plans`.

For each query q and each candidate item positions[q, m], the filter plan of q evaluated with
every term tested exactly against the item's stored attribute hashes (no Bloom false positive
passes). The retrieval model verifies its candidate pool with it, and its fresh items. On a
Triton backend one kernel runs the stack program per item in registers (`kernels.verify_kernel`,
one launch); the reference gathers the attributes, tests each term slot ([Q, T, M] booleans,
`exact_terms`) and runs the plans with tensor ops (`probed.run_plans`: about six small ops per
program step, some two hundred launches for a 32-step bound on a GPU).
"""

from __future__ import annotations

import torch

from gpukernels_common import register_op

from ..ivf.probed import rows_of
from .index import _row_major
from .probed import run_plans


def exact_terms(attr_terms: torch.Tensor, attr_counts: torch.Tensor, positions: torch.Tensor, hashes: torch.Tensor) -> torch.Tensor:
    """bool [Q, T, M]: the item at positions[q, m] really has term hashes[q, t] (its first
    attr_counts[item] attribute hashes, attr_terms [N, A], hold its terms)."""
    terms = rows_of(attr_terms, positions)  # [Q, M, A]
    counts = rows_of(attr_counts, positions).unsqueeze(1)
    hit = torch.zeros(hashes.shape[0], hashes.shape[1], positions.shape[1], dtype=torch.bool, device=positions.device)
    for a in range(terms.shape[-1]):  # one attribute slot at a time: [Q, T, M], never [Q, T, M, A]
        hit = hit | ((terms[:, None, :, a] == hashes.unsqueeze(-1)) & (counts > a))
    return hit


def verify_plans_reference(attr_terms: torch.Tensor, attr_counts: torch.Tensor, positions: torch.Tensor, ops: torch.Tensor,
                           args: torch.Tensor, hashes: torch.Tensor) -> torch.Tensor:
    """bool [Q, M] (see the module docs). attr_terms [N, A] int64 and attr_counts [N] int64: the
    items' attribute hashes; positions [Q, M] int64 item rows; ops, args [Q, L] int32 and hashes
    [Q, T] int64: the plans (their term slots < T)."""
    exact = exact_terms(attr_terms, attr_counts, positions, hashes)
    return run_plans(ops, args, exact, exact).contiguous()


def verify_plans_triton(attr_terms: torch.Tensor, attr_counts: torch.Tensor, positions: torch.Tensor, ops: torch.Tensor,
                        args: torch.Tensor, hashes: torch.Tensor) -> torch.Tensor:
    import triton

    from .kernels import verify_kernel

    q, m = positions.shape
    out = torch.empty(q, m, dtype=torch.bool, device=positions.device)
    if out.numel() == 0:
        return out
    n_attr = attr_terms.shape[1]
    attr_terms, attr_counts, positions, ops, args, hashes = _row_major(attr_terms, attr_counts, positions, ops, args, hashes)
    bm = 64
    verify_kernel[(q, triton.cdiv(m, bm))](out.view(torch.int8), positions, attr_terms, attr_counts, ops, args, hashes, m,
                                           ops.shape[1], hashes.shape[1], n_attr, BM=bm,
                                           BA=max(2, triton.next_power_of_2(n_attr)))
    return out


def _verify_plans_fake(attr_terms, attr_counts, positions, ops, args, hashes):
    return positions.new_empty(positions.shape, dtype=torch.bool)


verify_plans = register_op("silvertorch::verify_plans", reference=verify_plans_reference, triton=verify_plans_triton,
                           fake=_verify_plans_fake)
