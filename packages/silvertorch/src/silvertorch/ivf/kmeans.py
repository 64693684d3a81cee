"""k-means++ seeding and Lloyd iterations in torch (on whatever device the data is on)."""

from __future__ import annotations

import torch


def kmeans(x: torch.Tensor, n_clusters: int, iters: int = 20, seed: int = 0, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (centroids [C, D] fp32, assignment [N] int64). Empty clusters are re-seeded from far points."""
    n = x.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in [1, {n}] (the number of embeddings), got {n_clusters}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = x.float()
    sample = x[torch.randperm(n, generator=g)[: min(n, 64 * n_clusters)].to(x.device)]
    centroids = sample[torch.randint(0, sample.shape[0], (1,), generator=g).to(x.device)]
    d2 = ((sample - centroids[0]) ** 2).sum(1)
    for _ in range(1, n_clusters):  # k-means++: next seed with probability proportional to squared distance
        probs = (d2 / d2.sum().clamp_min(1e-30)).cpu()
        nxt = sample[int(torch.multinomial(probs, 1, generator=g))] if float(d2.sum()) > 0 else sample[int(torch.randint(0, sample.shape[0], (1,), generator=g))]
        centroids = torch.cat([centroids, nxt.unsqueeze(0)])
        d2 = torch.minimum(d2, ((sample - nxt) ** 2).sum(1))
    assign = _assign(x, centroids, chunk)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=n_clusters).float()
        empty = counts == 0
        centroids = torch.where(empty.unsqueeze(1), centroids, sums / counts.clamp_min(1).unsqueeze(1))
        if empty.any():  # re-seed empty clusters from the points farthest from their centroid
            dist = ((x - centroids[assign]) ** 2).sum(1)
            far = torch.topk(dist, int(empty.sum())).indices
            centroids[empty.nonzero().squeeze(1)] = x[far]
        new = _assign(x, centroids, chunk)
        if torch.equal(new, assign):
            break
        assign = new
    return centroids, assign


def _assign(x, centroids, chunk):
    c2 = (centroids**2).sum(1)
    return torch.cat([(c2 - 2 * part @ centroids.T).argmin(1) for part in x.split(chunk)])
