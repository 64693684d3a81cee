"""An HSTU-style sequential recommender over jagged sequences, in plain torch.

HSTU layer (Zhai et al. 2024): one projection gives U, V, Q, K (SiLU), attention weights are
SiLU(QK^T)/N with a causal mask (no softmax), and the output is LayerNorm(A V) * U projected
back, with a residual. N is the model's max_len, a constant (as in the reference HSTU code,
which pads to a fixed length), so a sequence's states do not depend on which other sequences
share its padded batch: balanced, capped or split batches see the same maths. Sequences are
padded per batch from their jagged form; positions count back from the newest item.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gpukernels_common.checks import check_sizes


class HSTULayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int = 2, dropout: float = 0.0, max_len: int = 200):
        super().__init__()
        check_sizes(d_model=d_model, n_heads=n_heads, max_len=max_len)
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.h, self.max_len = n_heads, max_len
        self.norm = nn.LayerNorm(d_model)
        self.uvqk = nn.Linear(d_model, 4 * d_model)
        self.attn_norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        u, v, q, k = F.silu(self.uvqk(self.norm(x))).chunk(4, dim=-1)
        heads = lambda t: t.view(b, n, self.h, d // self.h).transpose(1, 2)  # noqa: E731
        scores = F.silu(heads(q) @ heads(k).transpose(-1, -2)) / self.max_len
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        scores = scores * (causal & mask[:, None, None, :]).to(scores.dtype)
        attn = (scores @ heads(v)).transpose(1, 2).reshape(b, n, d)
        return x + self.dropout(self.out(self.attn_norm(attn) * u))


def pad_jagged(values: torch.Tensor, lengths: torch.Tensor, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-aligned padding: the most recent item of each sequence sits in the last column."""
    if lengths.dim() != 1 or values.dim() != 1:
        raise ValueError(f"pad_jagged: values and lengths must be 1-D, got shapes {tuple(values.shape)} and {tuple(lengths.shape)}")
    sizes = lengths.tolist()  # one host copy; the loop below slices by Python ints
    if any(n < 0 for n in sizes) or sum(sizes) != values.numel():
        raise ValueError(f"pad_jagged: lengths must be non-negative and sum to the {values.numel()} values, "
                         f"got sum {sum(sizes)}" + (" with negative entries" if any(n < 0 for n in sizes) else ""))
    max_len = max(sizes, default=0) if max_len is None else max_len
    b = len(sizes)
    out = values.new_zeros(b, max_len)
    mask = torch.zeros(b, max_len, dtype=torch.bool, device=values.device)  # beside the padded values (a GPU model)
    start = 0
    for i, n in enumerate(sizes):
        seq = values[start : start + n][-max_len:] if max_len else values[:0]
        start += n
        if seq.numel():
            out[i, -seq.numel():] = seq
            mask[i, -seq.numel():] = True
    return out, mask


class HSTURecommender(nn.Module):
    """Next-item model: item (+ position) embeddings -> HSTU layers -> user state at the last position.

    `ffn_factory(d_model)` optionally adds a feed-forward block after each HSTU layer (e.g. an MoE).
    """

    def __init__(self, n_items: int, d_model: int = 32, n_layers: int = 2, n_heads: int = 2, max_len: int = 200,
                 ffn_factory=None):
        super().__init__()
        check_sizes(n_items=n_items, d_model=d_model, n_heads=n_heads, max_len=max_len)
        check_sizes(0, n_layers=n_layers)
        self.max_len = max_len
        self.item = nn.Embedding(n_items, d_model)
        self.position = nn.Embedding(max_len, d_model)
        self.layers = nn.ModuleList(HSTULayer(d_model, n_heads, max_len=max_len) for _ in range(n_layers))
        self.ffns = nn.ModuleList(ffn_factory(d_model) for _ in range(n_layers)) if ffn_factory else None
        self.final_norm = nn.LayerNorm(d_model)

    def sequence_states(self, items: torch.Tensor | None, lengths: torch.Tensor,
                        item_embeddings: torch.Tensor | None = None,
                        trailing: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The state after every position of each jagged history: ([B, W, D], valid mask [B, W]),
        right-aligned (the newest item in the last column); attention is causal, so position t
        has seen items up to t only, and the feed-forward blocks run on the valid positions only.

        Or from item rows looked up elsewhere (e.g. a sharded table): `item_embeddings`
        [B, W, D], right-aligned like `pad_jagged` (W <= max_len), `items` then unused.

        `trailing` [B]: positions of each full sequence that come after the given window (a piece
        of a split sequence, `BalancePlan.received().trailing`), so positions still count back
        from the full sequence's newest item; window + trailing must fit max_len."""
        if item_embeddings is None:
            # at least one column: a batch of empty histories (or no histories) still has a state
            # per sequence, the one an empty history gets in any batch
            longest = int(lengths.max()) if lengths.numel() else 0
            padded, mask = pad_jagged(items, lengths, max(1, min(self.max_len, longest)))
            x = self.item(padded)
        else:
            width = item_embeddings.shape[1]
            if width > self.max_len or item_embeddings.shape[0] != lengths.numel():
                raise ValueError(f"item_embeddings must be [B={lengths.numel()}, W<={self.max_len}, D], got {tuple(item_embeddings.shape)}")
            mask = torch.arange(width, device=lengths.device) >= (width - lengths.clamp_max(width)).unsqueeze(1)
            x = item_embeddings
            if width == 0:  # one empty column, as for the items above
                x, mask = x.new_zeros(x.shape[0], 1, x.shape[2]), mask.new_zeros(x.shape[0], 1)
        width = x.shape[1]
        if trailing is None:
            positions = self.position.weight[self.max_len - width :]  # the newest `width` (not [-0:], the whole table)
        else:
            trailing = torch.as_tensor(trailing, device=lengths.device)
            if trailing.is_floating_point() or trailing.is_complex() or trailing.dtype == torch.bool:
                raise ValueError(f"trailing must be integer position counts, got dtype {trailing.dtype}")  # not truncated
            trailing = trailing.long()
            if trailing.shape != lengths.shape or (trailing < 0).any() or (lengths.clamp_max(width) + trailing > self.max_len).any():
                raise ValueError(f"trailing must be [B={lengths.numel()}] non-negative counts with window + trailing "
                                 f"<= max_len={self.max_len}")
            index = self.max_len - width + torch.arange(width, device=lengths.device) - trailing.unsqueeze(1)
            positions = self.position(index.clamp_min(0))  # padding slots clamp, then are masked out
        x = (x + positions) * mask.unsqueeze(-1)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask)
            if self.ffns is not None:
                valid = x[mask]
                x = x.masked_scatter(mask.unsqueeze(-1), valid + self.ffns[i](valid))
        return self.final_norm(x), mask

    def user_state(self, items: torch.Tensor | None, lengths: torch.Tensor, item_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """User vector [B, D] after each whole history (the last position of `sequence_states`)."""
        return self.sequence_states(items, lengths, item_embeddings)[0][:, -1]

    def forward(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits over all items for the next item of each sequence."""
        return self.user_state(items, lengths) @ self.item.weight.T
