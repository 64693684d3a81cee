"""A two-minute tour: one real call into each package, on the CPU, with what it measured.

    nox -s quickstart        (or: python tools/quickstart.py in a venv with the packages installed)
"""

from __future__ import annotations

import time

import torch


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)

    import moeblaze
    from gpukernels_common.bench import saved_tensor_bytes

    layer = moeblaze.MoE(d_model=256, d_ff=512, n_experts=8, top_k=2)
    x = torch.randn(512, 256, requires_grad=True)
    saved = saved_tensor_bytes(lambda: layer(x)) - sum(p.numel() * 4 for p in layer.parameters())
    layer(x).sum().backward()
    print(f"moeblaze     MoE(256, 512, 8 experts, top-2): forward+backward ok; "
          f"{saved / 512:.0f} bytes/token saved for backward (fp32, incl. router)")

    import silvertorch

    n = 100_000
    fids = torch.arange(1, 4).repeat(n)
    vals = torch.randint(0, 20, (3 * n,))
    index = silvertorch.BloomIndex.build(fids, torch.arange(0, 3 * n + 1, 3), vals, k=3, b_multiplier=5)
    plans = silvertorch.parse_filters(["1:3 AND (2:{4,5}) AND NOT 3:7"])
    words = index.search(plans)
    candidates = ((words.unsqueeze(-1) >> torch.arange(64)) & 1).reshape(-1)[:n].bool()
    exact = index.verify(plans, torch.arange(n).unsqueeze(0))[0]
    lost = int((exact & ~candidates).sum())
    print(f"silvertorch  Bloom filter over {n:,} items ({index.bytes_per_item():.1f} B/item): "
          f"{int(candidates.sum())} candidates, {int(exact.sum())} exact matches, {lost} lost")

    import freescale
    from freescale.data import zipf_lengths

    batches = list(zipf_lengths(256 * 32 * 4, seed=1).split(256 * 32))
    cost = freescale.CostModel(a=256.0, b=1.0)
    naive = freescale.simulate(batches, 256, cost, method="contiguous")
    balanced = freescale.simulate(batches, 256, cost, method="kk")
    print(f"freescale    256 simulated ranks, Zipf lengths: bubble {naive.bubble_ratio:.3f} -> {balanced.bubble_ratio:.4f} "
          f"({100 * freescale.bubble_reduction(naive.bubble_ratio, balanced.bubble_ratio):.1f}% fewer bubbles)")

    import multibalance

    bottom = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU())
    heads = torch.nn.ModuleDict({"click": torch.nn.Linear(32, 1), "purchase": torch.nn.Linear(32, 1)})
    balancer = multibalance.MultiBalance(list(heads))
    rep = balancer.attach(bottom(torch.randn(64, 16)))
    scales = balancer.backward({"click": heads["click"](rep).pow(2).mean(), "purchase": 100 * heads["purchase"](rep).pow(2).mean()})
    print("multibalance per-task scales toward the largest gradient: "
          + ", ".join(f"{k}={v:.2f}" for k, v in scales.items()))
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
