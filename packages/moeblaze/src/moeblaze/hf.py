"""Hugging Face adapter: moeblaze's experts inside transformers' Mixtral- and Qwen-MoE-style models.

    import moeblaze.hf
    moeblaze.hf.use_moeblaze(model)                # or: from_pretrained(..., experts_implementation="moeblaze")

transformers (>= 5) dispatches every experts module (`gate_up_proj` [E, 2*I, d], `down_proj`
[E, d, I], SiLU gating) through its experts interface; `register()` adds "moeblaze" there and
`use_moeblaze(model)` selects it. The model's router, shared experts and weights stay as they
are (checkpoints load and save unchanged); each forward hands moeblaze transposed views of them
([E, d, I] and [E, I, d]: no copy, the kernels read through the strides), then runs
`moe_experts` (buffer-free dispatch, fused kernels, recompute-not-store backward). Slots that
transformers marks with the sentinel id E (expert parallelism) are skipped, as dropped slots are.
Requires the optional extra: `pip install moeblaze[hf]`.
"""

from __future__ import annotations

import torch

from .experts import CHECKPOINTS, moe_experts

NAME = "moeblaze"


def moeblaze_experts_forward(module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor, checkpoint: str = "preact") -> torch.Tensor:
    """The experts forward transformers calls: hidden_states [T, d], top_k_index / top_k_weights [T, k]."""
    layout = {name: getattr(module, name, None) for name in ("has_gate", "has_bias", "is_concatenated", "is_transposed",
                                                              "has_post_expert_norm")}
    if layout != {"has_gate": True, "has_bias": False, "is_concatenated": True, "is_transposed": False,
                  "has_post_expert_norm": False}:
        raise ValueError(f"moeblaze runs gated, bias-free experts stored [E, 2*I, d] / [E, d, I]; this module has {layout}")
    act = getattr(getattr(module, "config", None), "hidden_act", None)
    if act != "silu":
        raise ValueError(f"moeblaze's gated experts compute SiLU(gate) * up; the model uses hidden_act={act!r}")
    inter = module.gate_up_proj.shape[1] // 2
    w_gate = module.gate_up_proj[:, :inter, :].transpose(1, 2)
    w_up = module.gate_up_proj[:, inter:, :].transpose(1, 2)
    w_down = module.down_proj.transpose(1, 2)
    return moe_experts(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype), w_gate, w_up, w_down,
                       "swiglu", checkpoint)


def register(checkpoint: str = "preact") -> str:
    """Register "moeblaze" in transformers' experts interface; returns the name to select."""
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {CHECKPOINTS}, got {checkpoint!r}")
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as err:
        raise ImportError("the Hugging Face adapter needs transformers >= 5: pip install 'moeblaze[hf]'") from err

    def forward(module, hidden_states, top_k_index, top_k_weights):
        return moeblaze_experts_forward(module, hidden_states, top_k_index, top_k_weights, checkpoint)

    ExpertsInterface.register(NAME, forward)
    return NAME


def use_moeblaze(model: torch.nn.Module, checkpoint: str = "preact") -> int:
    """Route every experts module of a loaded transformers model through moeblaze; returns how
    many experts modules it covers (0: the model has none transformers dispatches)."""
    register(checkpoint)
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj") and hasattr(m, "config")]
    for module in experts:
        _check_experts_module(module)
    for module in experts:
        module.config._experts_implementation = NAME
    return len(experts)


def _check_experts_module(module: torch.nn.Module) -> None:
    """Fail at swap time, not at the first forward, on an experts layout moeblaze cannot run."""
    if module.gate_up_proj.dim() != 3 or module.down_proj.dim() != 3:
        raise ValueError("expected 3-D expert weights gate_up_proj [E, 2*I, d] and down_proj [E, d, I]")
    if getattr(module.config, "hidden_act", None) != "silu" or getattr(module, "has_bias", False):
        raise ValueError(f"moeblaze runs SiLU-gated, bias-free experts; {type(module).__name__} has "
                         f"hidden_act={getattr(module.config, 'hidden_act', None)!r}, has_bias={getattr(module, 'has_bias', None)}")
