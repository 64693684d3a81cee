"""The exact side of the retrieval model's filter as one custom op, `silvertorch::exact_words`.

For each query q, each packed 64-item word words[q, m] of its probed clusters and each of the
plan's first E term slots: the bits of the word's items that really have the slot's term (read
from their stored attribute hashes), which `probed_filter_words` reads for EXACT_TERM steps
(terms under NOT). Only slots an EXACT_TERM step of q reads are computed; the others are 0 (no
step reads them). On a Triton backend one kernel (`kernels.exact_words_kernel`: a lane per word,
its 64 items' attributes loaded only for the slots in use); the reference tests every item of
every word against every slot with tensor ops ([Q, E, 64 M] booleans, a few small ops per
attribute slot).
"""

from __future__ import annotations

import torch

from gpukernels_common import register_op

from .index import _row_major
from .parser import EXACT_TERM
from .verify import exact_terms


def exact_words_reference(attr_terms: torch.Tensor, attr_counts: torch.Tensor, words: torch.Tensor, hashes: torch.Tensor,
                          ops: torch.Tensor, args: torch.Tensor, last_item: int) -> torch.Tensor:
    """int64 [Q, E, M] (see the module docs). attr_terms [N, A] int64, attr_counts [N] int64: the
    items' attribute hashes; words [Q, M] int64 word indices (item 64 w + b, clamped to last_item:
    bits past the last item describe it and must be masked by the caller); hashes [Q, E] int64:
    the plans' first E term slots; ops, args [Q, L] int32: the plans."""
    q, m = words.shape
    e = hashes.shape[1]
    bit = torch.arange(64, device=words.device)
    items = (words.unsqueeze(-1) * 64 + bit).clamp(max=last_item).reshape(q, m * 64)
    packed = (exact_terms(attr_terms, attr_counts, items, hashes).view(q, e, m, 64).long() << bit).sum(-1)
    used = ((ops == EXACT_TERM).unsqueeze(-1) & (args.unsqueeze(-1) == torch.arange(e, device=ops.device))).any(1)
    return torch.where(used.unsqueeze(-1), packed, torch.zeros_like(packed))


def exact_words_triton(attr_terms: torch.Tensor, attr_counts: torch.Tensor, words: torch.Tensor, hashes: torch.Tensor,
                       ops: torch.Tensor, args: torch.Tensor, last_item: int) -> torch.Tensor:
    import triton

    from .kernels import exact_words_kernel

    q, m = words.shape
    e = hashes.shape[1]
    out = torch.empty(q, e, m, dtype=torch.int64, device=words.device)
    if out.numel() == 0:
        return out
    attr_terms, attr_counts, words, hashes, ops, args = _row_major(attr_terms, attr_counts, words, hashes, ops, args)
    bw = 32  # a [BW, 64] tile of items: 64 rows took some 250 registers a thread on sm_90
    exact_words_kernel[(q, triton.cdiv(m, bw))](out, words, attr_terms, attr_counts, hashes, ops, args, m, ops.shape[1], e, e,
                                               attr_terms.shape[1], last_item, BW=bw)
    return out


def _exact_words_fake(attr_terms, attr_counts, words, hashes, ops, args, last_item):
    return words.new_empty(words.shape[0], hashes.shape[1], words.shape[1], dtype=torch.int64)


exact_words = register_op("silvertorch::exact_words", reference=exact_words_reference, triton=exact_words_triton,
                          fake=_exact_words_fake)
