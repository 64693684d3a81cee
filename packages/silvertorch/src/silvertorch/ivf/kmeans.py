"""k-means in torch (on whatever device the data is on), for inner-product or L2 partitions.

`metric="ip"` (what IVFIndex uses, since it searches by inner product and probes clusters by
centroid inner product): spherical k-means, each point assigned to the unit centroid of largest
inner product, centroids the normalized means. Probing then ranks clusters the way they were
formed; L2 partitions probed by inner product lose recall at small nprobe (measured in
benchmarks/bench_ivf.py: top-100 coverage at nprobe 4 went from 0.82 to 1.0 on clustered data)
and come out less balanced, which widens the padded candidate buffer.
`metric="l2"`: classic k-means++ seeding and Lloyd iterations.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

METRICS = ("ip", "l2")


def kmeans(x: torch.Tensor, n_clusters: int, iters: int = 20, seed: int = 0, metric: str = "ip",
           chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (centroids [C, D] fp32, assignment [N] int64). Empty clusters are re-seeded from the
    points worst served by their centroid."""
    n = x.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in [1, {n}] (the number of embeddings), got {n_clusters}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = x.float()
    centroids = _kmeans_pp(x, n_clusters, g, unit=metric == "ip")
    assign, fit = _assign(x, centroids, metric, chunk)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=n_clusters)
        means = F.normalize(sums, dim=1) if metric == "ip" else sums / counts.clamp_min(1).unsqueeze(1).float()
        empty = counts == 0
        centroids = torch.where(empty.unsqueeze(1), centroids, means)
        if empty.any():
            worst = torch.topk(fit, int(empty.sum()), largest=False).indices
            seeds = x[worst]
            centroids[empty.nonzero().squeeze(1)] = F.normalize(seeds, dim=1) if metric == "ip" else seeds
        new, fit = _assign(x, centroids, metric, chunk)
        if torch.equal(new, assign):
            break
        assign = new
    return centroids, assign


def _kmeans_pp(x: torch.Tensor, n_clusters: int, g: torch.Generator, unit: bool) -> torch.Tensor:
    """k-means++ seeding on a sample: each next seed with probability proportional to its squared
    distance to the nearest seed (between unit vectors with `unit`: 2 - 2 cos)."""
    n = x.shape[0]
    sample = x[torch.randperm(n, generator=g)[: min(n, 64 * n_clusters)].to(x.device)]
    if unit:
        sample = F.normalize(sample, dim=1)
    centroids = sample[torch.randint(0, sample.shape[0], (1,), generator=g).to(x.device)]
    d2 = ((sample - centroids[0]) ** 2).sum(1)
    for _ in range(1, n_clusters):
        if float(d2.sum()) > 0:
            nxt = sample[int(torch.multinomial((d2 / d2.sum()).cpu(), 1, generator=g))]
        else:
            nxt = sample[int(torch.randint(0, sample.shape[0], (1,), generator=g))]
        centroids = torch.cat([centroids, nxt.unsqueeze(0)])
        d2 = torch.minimum(d2, ((sample - nxt) ** 2).sum(1))
    return centroids


def _assign(x, centroids, metric, chunk) -> tuple[torch.Tensor, torch.Tensor]:
    """(assignment, fit): fit is the inner product with the chosen centroid (ip) or minus the
    squared distance to it (l2): higher is better served."""
    c2 = (centroids**2).sum(1)
    assign, fit = [], []
    for part in x.split(chunk):
        s = part @ centroids.T if metric == "ip" else 2 * part @ centroids.T - c2 - (part**2).sum(1, keepdim=True)
        best = s.max(1)
        assign.append(best.indices)
        fit.append(best.values)
    return torch.cat(assign), torch.cat(fit)
