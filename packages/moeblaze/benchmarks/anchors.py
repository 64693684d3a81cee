"""Benchmark anchors that are not pip-installable wheels, imported (never copied) from where they lie.

ScatterMoE (github.com/shawntan/scattermoe, Apache-2.0) has no wheel on PyPI: `bash
tools/gpu_session.sh --fetch-deps` exports its `scattermoe` package from a local mirror (the fetch
tool's github:shawntan/scattermoe) into the git-ignored `.gpu-deps/anchors/src`, which the GPU
session puts on PYTHONPATH (here: `PYTHONPATH=.gpu-deps/anchors/src`). Its kernels run on the CPU
only through the Triton interpreter (TRITON_INTERPRET=1 set before `scattermoe` is imported), in
fp32/fp16: bf16 runs there but computes garbage (the interpreter's bf16 dot), which is harmless for
counting saved bytes and wrong for anything else. Its `flatten_sort_count` is `@torch.compile`d:
that compiles with inductor on the CPU (needs a C compiler) and is skipped under
TORCHDYNAMO_DISABLE=1; both give the same indices.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch


def scattermoe_weights(wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """moeblaze's expert weights (gate, up `[E, d, d_ff]`, down `[E, d_ff, d]`) as ScatterMoE's
    `GLUMLP` parameters, new leaves requiring grad: `experts.weight` `[E, 2*d_ff, d]` and
    `output_experts.weight` `[E, d, d_ff]` (its `ParallelExperts` keep `[E, out, in]`). GLUMLP splits
    the first product into (h, gates) and computes activation(gates) * h, so the up projection comes
    first and the gate second: SiLU(x W_gate) * (x W_up), moeblaze's SwiGLU."""
    w_in = torch.cat([wu.detach(), wg.detach()], dim=2).transpose(1, 2).contiguous().requires_grad_()
    w_out = wd.detach().transpose(1, 2).contiguous().requires_grad_()
    return w_in, w_out


def scattermoe_grads_as_ours(d_in: torch.Tensor, d_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `scattermoe_weights`'s two tensors back in moeblaze's layout: (d_gate, d_up, d_down)."""
    f = d_out.shape[2]
    return d_in[:, f:].transpose(1, 2), d_in[:, :f].transpose(1, 2), d_out.transpose(1, 2)


def _eager_sort():
    """`torch.compiler.set_stance("force_eager")` where torch has it (2.6 on); on torch 2.5 nothing:
    ScatterMoE's sort is then compiled as on a GPU (slower to start, the same indices)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return contextlib.nullcontext() if set_stance is None else set_stance("force_eager")


def scattermoe_provider(interpret: bool = False):
    """ScatterMoE's `GLUMLP` (SiLU gates: SwiGLU) as `fn(x, ids, w, w_in, w_out)` with the weights of
    `scattermoe_weights`, differentiable in x, the routing weights w and both weight tensors; or None,
    with the reason printed, where `scattermoe` is not importable.

    `interpret=True` (CPU tensors) sets TRITON_INTERPRET=1 before `scattermoe` is imported and leaves
    it set (Triton reads it again when the kernels launch), so its kernels run through the
    interpreter; moeblaze's kernels, defined when moeblaze was imported, are then not usable in this
    process: run moeblaze there with GKC_BACKEND=reference (its PyTorch path, which saves the same
    tensors). Its `@torch.compile`d `flatten_sort_count` then runs eagerly
    (`torch.compiler.set_stance("force_eager")`: inductor would spend seconds on each new shape; it
    runs under no_grad, so nothing it does is saved for backward; torch 2.5 has no stances and
    compiles it). Compiled (a GPU), the caller's stance is left as it is."""
    already, before = "scattermoe" in sys.modules, os.environ.get("TRITON_INTERPRET")
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        from scattermoe.kernels import ops
        from scattermoe.mlp import GLUMLP
    except ImportError as error:
        if before is None:  # as it was: nothing of scattermoe will run
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before
        print(f"scattermoe not importable ({error}): not measured (bash tools/gpu_session.sh --fetch-deps "
              f"exports it into .gpu-deps/anchors/src; put that on PYTHONPATH)")
        return None
    kinds, kernel = set(), ops._scatter2scatter  # autotuner -> heuristics -> the kernel -> its Python function
    while kernel is not None:
        kinds.add(type(kernel).__name__)
        kernel = getattr(kernel, "fn", None)
    interpreted = "InterpretedFunction" in kinds
    if interpret != interpreted:
        print(f"scattermoe's kernels were defined {'interpreted' if interpreted else 'compiled'}"
              f"{' (imported before)' if already else ''}, not as interpret={interpret} asks: not measured")
        return None
    modules: dict[tuple, torch.nn.Module] = {}

    def run(x, ids, w, w_in, w_out):
        e, two_f, d = w_in.shape
        key = (e, two_f, d, ids.shape[1])
        if key not in modules:  # its parameters only give shapes: the call's weights replace them
            with torch.device("meta"):
                modules[key] = GLUMLP(d, two_f // 2, e, ids.shape[1], activation=torch.nn.SiLU())
        params = {"experts.weight": w_in, "output_experts.weight": w_out}
        with _eager_sort() if interpret else contextlib.nullcontext():
            return torch.func.functional_call(modules[key], params, (x, w, ids.long()))

    return run


def check_scattermoe(t=64, d=64, f=128, e=4, k=2, dtype=torch.float32) -> dict[str, float] | None:
    """ScatterMoE against moeblaze.moe_reference on the same routed tokens: the largest absolute
    difference of the output and of the gradients of x, the routing weights and the three expert
    weights, each divided by the reference's largest magnitude. None where it is not importable."""
    from moeblaze import moe_reference

    scattermoe = scattermoe_provider(interpret=True)
    if scattermoe is None:
        return None
    torch.manual_seed(0)
    x = torch.randn(t, d, dtype=dtype, requires_grad=True)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    w = torch.rand(t, k, dtype=dtype, requires_grad=True)
    wg, wu = (torch.randn(e, d, f, dtype=dtype).mul_(d ** -0.5).requires_grad_() for _ in range(2))
    wd = torch.randn(e, f, d, dtype=dtype).mul_(f ** -0.5).requires_grad_()
    dy = torch.randn(t, d, dtype=dtype)
    ref = moe_reference(x, ids, w, wg, wu, wd)
    ref_grads = torch.autograd.grad(ref, (x, w, wg, wu, wd), dy)
    w_in, w_out = scattermoe_weights(wg, wu, wd)
    out = scattermoe(x, ids, w, w_in, w_out)
    dx, dw, d_in, d_out = torch.autograd.grad(out, (x, w, w_in, w_out), dy)
    theirs = (out, dx, dw, *scattermoe_grads_as_ours(d_in, d_out))
    names = ("output", "dx", "d_routing_weights", "d_w_gate", "d_w_up", "d_w_down")
    return {name: float((a.detach().float() - b.detach().float()).abs().max() / b.detach().float().abs().max())
            for name, a, b in zip(names, theirs, (ref, *ref_grads))}


if __name__ == "__main__":  # on the CPU: ScatterMoE (interpreted) against the loop, fp32
    for shape in ((64, 64, 128, 4, 2), (48, 96, 80, 8, 3)):
        errors = check_scattermoe(*shape)
        if errors is None:
            sys.exit(1)
        print(f"T, d, d_ff, E, k = {shape}: " + ", ".join(f"{n} {v:.1e}" for n, v in errors.items()))
