"""The retrieval model's filter step as one custom op, `silvertorch::probed_filter_words`.

For each query q and each packed 64-item word words[q, m] (the words covering its probed
clusters), the filter plan of q evaluated on that word: a TERM is the AND of the term's k Bloom
row words in the word's bundle (a superset of the true matches), an EXACT_TERM (a term under NOT)
reads exact_words[q, slot, m], packed by the caller from the stored attributes, and AND/OR/NOT
combine the words bit for bit. `torch.compile` and `torch.export` see one op: on a Triton backend
one kernel runs the whole stack program in registers (the Bloom index's own evaluator,
`kernels._eval_words`); the reference runs it with tensor ops on a [Q, depth, M] stack
(`run_plans`, which is also the reference of `verify.verify_plans`, the model's exact verification).

`silvertorch::probed_keep` turns those words into the model's per-slot keep bits: each probed
cluster's words ANDed with the alive bits, shifted so that bit j is the cluster's slot j, cut at
the cluster's end and unpacked to bools (one kernel on a Triton backend, where the reference
takes some twenty small tensor ops).
"""

from __future__ import annotations

import torch

from gpukernels_common import register_op

from ..filtering import device_constant, unpack_bits
from ..ivf.probed import rows_of
from .hashing import bloom_positions
from .index import WORDS_PER_BUNDLE, _row_major
from .parser import AND, EXACT_TERM, MAX_DEPTH, NOT, OR, TERM, TRUE


def run_plans(ops: torch.Tensor, args: torch.Tensor, bloom_terms: torch.Tensor, exact_terms: torch.Tensor) -> torch.Tensor:
    """Evaluate postfix plans on a [Q, MAX_DEPTH (+ 1 spare), M] stack with tensor ops (no data-dependent branches).
    Term values [Q, T, M] are bool per item or int64 words of 64 items (the same ops, bitwise);
    exact_terms may hold only the leading slots (where the plans keep their EXACT_TERM terms)."""
    q, n_exact, m = exact_terms.shape
    dev = exact_terms.device
    everything = torch.full((q, 1, m), True if exact_terms.dtype == torch.bool else -1, dtype=exact_terms.dtype, device=dev)
    # everything that does not depend on the stack, for all steps at once: [Q, L, 1] op kinds, [Q, L, M] pushes
    term, exact_term, true, negate, conj, disj = ((ops == code).unsqueeze(-1) for code in (TERM, EXACT_TERM, TRUE, NOT, AND, OR))
    pick = args.long().unsqueeze(-1).expand(q, -1, m)
    # reads are clamped for the other steps' slots; torch.where drops what they read
    exact = exact_terms.gather(1, pick.clamp(max=n_exact - 1))
    bloom = bloom_terms.gather(1, pick.clamp(max=bloom_terms.shape[1] - 1))
    pushed = torch.where(term, bloom, torch.where(exact_term, exact, everything))
    is_push, is_pair = term | exact_term | true, conj | disj
    moves = is_push.long() - is_pair.long()
    sp = moves.cumsum(1) - moves  # stack size before each step
    at = torch.where(is_push, sp, torch.where(negate, sp - 1, sp - 2))
    # the slot each step writes; steps that write nothing (NOP padding) write a spare slot past
    # the stack, so a step updates one [Q, 1, M] row in place instead of selecting the whole stack
    writes = (is_push | is_pair | negate) & (at >= 0) & (at < MAX_DEPTH)
    at = torch.where(writes, at, MAX_DEPTH).expand(q, -1, m)
    top_at, below_at = (sp - 1).clamp(min=0).expand(q, -1, m), (sp - 2).clamp(min=0).expand(q, -1, m)
    stack = everything.expand(q, MAX_DEPTH + 1, m).clone()
    for step in range(ops.shape[1]):
        top = stack.gather(1, top_at[:, step : step + 1])
        below = stack.gather(1, below_at[:, step : step + 1])
        value = torch.where(is_push[:, step : step + 1], pushed[:, step : step + 1],
                            torch.where(negate[:, step : step + 1], ~top,
                                        torch.where(conj[:, step : step + 1], below & top, below | top)))
        stack.scatter_(1, at[:, step : step + 1], value)
    return stack[:, 0]


def bloom_words(bits: torch.Tensor, row_offsets: torch.Tensor, widths: torch.Tensor, bloom_k: int,
                words: torch.Tensor, hashes: torch.Tensor) -> torch.Tensor:
    """int64 [Q, T, M]: the Bloom test (a superset) of term hashes[q, t] on the 64 items of word
    words[q, m]: the AND of the term's k row words in the word's bundle."""
    q, t = hashes.shape
    n_bundles = widths.numel()
    # a term's rows depend on its bundle only: hash once per (term, bundle), then gather per word
    per_bundle = bloom_positions(hashes.unsqueeze(-1).expand(q, t, n_bundles), widths.expand(q, t, n_bundles), bloom_k)
    per_bundle = per_bundle + row_offsets[:n_bundles][None, None, :, None]  # [Q, T, B, k]
    bundle = (words // WORDS_PER_BUNDLE)[:, None, :, None].expand(q, t, -1, bloom_k)
    rows = per_bundle.gather(2, bundle)  # [Q, T, M, k]
    found = rows_of(bits.reshape(-1), rows * WORDS_PER_BUNDLE + (words % WORDS_PER_BUNDLE)[:, None, :, None])
    passing = found[..., 0]
    for j in range(1, bloom_k):
        passing = passing & found[..., j]
    return passing


def probed_filter_words_reference(bits: torch.Tensor, row_offsets: torch.Tensor, widths: torch.Tensor,
                                  words: torch.Tensor, ops: torch.Tensor, args: torch.Tensor, hashes: torch.Tensor,
                                  exact_words: torch.Tensor, bloom_k: int) -> torch.Tensor:
    """int64 [Q, M] (see the module docs). bits [rows, 32] int64 and row_offsets, widths per bundle:
    the Bloom index's layout; words [Q, M] int64 word indices inside it; ops, args [Q, L] int32 and
    hashes [Q, T] int64: the plans; exact_words [Q, E >= 1, M] int64 for the plans' first E slots."""
    # contiguous, as the fake promises: the stack's first slot is a strided view, and compiled
    # graphs check the strides (torch.compile failed on CPU)
    return run_plans(ops, args, bloom_words(bits, row_offsets, widths, bloom_k, words, hashes), exact_words).contiguous()


def probed_filter_words_triton(bits: torch.Tensor, row_offsets: torch.Tensor, widths: torch.Tensor,
                               words: torch.Tensor, ops: torch.Tensor, args: torch.Tensor, hashes: torch.Tensor,
                               exact_words: torch.Tensor, bloom_k: int) -> torch.Tensor:
    import triton

    from .kernels import words_kernel

    q, m = words.shape
    e, t = exact_words.shape[1], hashes.shape[1]
    out = torch.empty(q, m, dtype=torch.int64, device=words.device)
    # the exact row of (query, slot): that query's own E rows, the slot clamped (plans read exact slots < E only);
    # a constant made once (six launches a call on a GPU otherwise), for a power of two of queries
    # from 64 on and cut to q, so that a server's many batch sizes share a few tables
    rows = max(64, triton.next_power_of_2(q))
    exact_row = device_constant(f"probed_exact_rows{rows},{e},{t}", words.device, lambda d: (
        torch.arange(rows, device=d).unsqueeze(1) * e + torch.arange(t, device=d).clamp(max=e - 1)).to(torch.int32))[:q]
    bw = 64
    words, bits, row_offsets, widths, ops, args, hashes, exact_words = _row_major(
        words, bits, row_offsets, widths, ops, args, hashes, exact_words.reshape(q * e, m))
    words_kernel[(q, triton.cdiv(m, bw))](
        out, words, bits, row_offsets, widths, ops, args, hashes, exact_words, exact_row,
        ops.shape[1], t, m, widths.numel() * WORDS_PER_BUNDLE, K=bloom_k, BW=bw)
    return out


def _probed_filter_words_fake(bits, row_offsets, widths, words, ops, args, hashes, exact_words, bloom_k):
    return words.new_empty(words.shape, dtype=torch.int64)


probed_filter_words = register_op("silvertorch::probed_filter_words", reference=probed_filter_words_reference,
                                  triton=probed_filter_words_triton, fake=_probed_filter_words_fake)


def _signed64(value: int) -> int:
    return (value + 2**63) % 2**64 - 2**63


# int64 word masks: low_bits[c] keeps the lowest c bits (c = 0..64); high_bits_cleared[s] clears
# the s highest, what an arithmetic right shift by s filled with copies of the sign bit
_WORD_MASKS = {"low_bits": [_signed64((1 << c) - 1) for c in range(65)],
               "high_bits_cleared": [_signed64((1 << (64 - s)) - 1) for s in range(64)]}


def _word_mask(name: str, device: torch.device) -> torch.Tensor:
    """A table of _WORD_MASKS on `device`, copied there once (no host-to-device copy per call)."""
    return device_constant(f"word_mask_{name}", device,
                           lambda d: torch.tensor(_WORD_MASKS[name], dtype=torch.int64, device=d))


def probed_keep_reference(passing: torch.Tensor, words: torch.Tensor, alive_words: torch.Tensor, clusters: torch.Tensor,
                          cluster_starts: torch.Tensor, cluster_sizes: torch.Tensor, width: int) -> torch.Tensor:
    """bool [Q, P, width]: slot j of probed cluster clusters[q, p] (item cluster_starts[c] + j)
    exists (j < cluster_sizes[c]), is alive and passes. passing, words [Q, P x NW] int64: the plans'
    words (`probed_filter_words`) on the words words[q, p x NW + i] = start // 64 + i (clamped
    to the last word) covering each probed cluster; alive_words [ceil(N / 64)] int64: the alive
    bits, packed as the Bloom words. Word-sized work: the words shifted so that bit j of a row is
    slot j, the alive bits and the cluster's end applied to the words, then unpacked a byte at a time."""
    q, p = clusters.shape
    n_words = passing.shape[1] // p
    passing = (passing & rows_of(alive_words, words)).view(q, p, n_words)
    shift = (rows_of(cluster_starts, clusters) & 63).unsqueeze(-1)
    following = torch.cat([passing[..., 1:], passing.new_zeros(q, p, 1)], -1)
    aligned = ((passing >> shift) & rows_of(_word_mask("high_bits_cleared", shift.device), shift)) | ((following << (63 - shift)) << 1)
    sizes = rows_of(cluster_sizes, clusters).unsqueeze(-1)  # bits from a cluster's end on are 0
    in_cluster = (sizes - 64 * torch.arange(n_words, device=sizes.device)).clamp(0, 64)
    aligned &= rows_of(_word_mask("low_bits", shift.device), in_cluster)
    # contiguous, as the fake promises (unpack_bits cuts a view to `width`)
    return unpack_bits(aligned.view(torch.int32), width).contiguous()


def probed_keep_triton(passing: torch.Tensor, words: torch.Tensor, alive_words: torch.Tensor, clusters: torch.Tensor,
                       cluster_starts: torch.Tensor, cluster_sizes: torch.Tensor, width: int) -> torch.Tensor:
    import triton

    from .kernels import keep_kernel

    q, p = clusters.shape
    out = torch.empty(q, p, width, dtype=torch.bool, device=clusters.device)
    if out.numel() == 0:
        return out
    passing, words, alive_words, clusters, cluster_starts, cluster_sizes = _row_major(
        passing, words, alive_words, clusters, cluster_starts, cluster_sizes)
    bs = min(1024, triton.next_power_of_2(width))
    keep_kernel[(q * p, triton.cdiv(width, bs))](out.view(torch.int8), passing, words, alive_words, clusters, cluster_starts,
                                                 cluster_sizes, passing.shape[1] // p, width, BS=bs)
    return out


def _probed_keep_fake(passing, words, alive_words, clusters, cluster_starts, cluster_sizes, width):
    return clusters.new_empty(clusters.shape[0], clusters.shape[1], width, dtype=torch.bool)


probed_keep = register_op("silvertorch::probed_keep", reference=probed_keep_reference, triton=probed_keep_triton,
                          fake=_probed_keep_fake)
