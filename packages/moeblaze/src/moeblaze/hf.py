"""Hugging Face adapter: moeblaze's experts inside transformers' Mixtral- and Qwen-MoE-style models.

    import moeblaze.hf
    moeblaze.hf.use_moeblaze(model)                # a loaded model: registers "moeblaze" and selects it

    moeblaze.hf.register()                         # first: importing moeblaze.hf registers nothing
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moeblaze")

transformers (>= 5) dispatches every experts module (`gate_up_proj` [E, 2*I, d], `down_proj`
[E, d, I], SiLU gating) through its experts interface; `register()` adds "moeblaze" there (it
must run before `from_pretrained(..., experts_implementation="moeblaze")`, which otherwise
refuses the name) and `use_moeblaze(model)` registers it if needed and selects it. The model's
router, shared experts and weights stay as they are (checkpoints load and save unchanged); each
forward hands moeblaze transposed views of them ([E, d, I] and [E, I, d]: no copy, the kernels
read through the strides), then runs `moe_experts` (buffer-free dispatch, fused kernels,
recompute-not-store backward). Slots that transformers marks with the sentinel id E (expert
parallelism) are skipped, as dropped slots are; top_k may exceed a rank's local expert count.
Requires the optional extra: `pip install moeblaze[hf]`.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .experts import CHECKPOINTS, moe_experts

NAME = "moeblaze"


_LAYOUT = {"has_gate": True, "has_bias": False, "is_concatenated": True, "is_transposed": False,
           "has_post_expert_norm": False}
_CHECKPOINT_ATTR = "_moeblaze_checkpoint"  # per-module checkpoint mode, set by use_moeblaze


def _is_experts_module(module: torch.nn.Module) -> bool:
    """An experts module transformers dispatches: 3-D expert weight tensors (a dense MLP's
    gate_up_proj / down_proj are nn.Linear modules, e.g. Phi-3's, and are left alone)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (hasattr(module, "config") and isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
            and gate_up.dim() == 3 and down.dim() == 3)


def _is_silu(act_fn) -> bool:
    # transformers' ACT2FN["silu"] is SiLUActivation, ACT2FN["swish"] is nn.SiLU
    return isinstance(act_fn, torch.nn.SiLU) or type(act_fn).__name__ == "SiLUActivation" or act_fn is F.silu


def _check_experts_module(module: torch.nn.Module) -> None:
    """Everything moeblaze needs of an experts module; run at swap time and by every forward,
    so a module use_moeblaze accepts never fails (or silently differs) at its first forward."""
    name = type(module).__name__
    if not _is_experts_module(module):
        raise ValueError(f"{name}: expected 3-D expert weights gate_up_proj [E, 2*I, d] and down_proj [E, d, I]")
    layout = {key: getattr(module, key, None) for key in _LAYOUT}
    if layout != _LAYOUT:
        raise ValueError(f"moeblaze runs gated, bias-free experts stored [E, 2*I, d] / [E, d, I] ({_LAYOUT}); "
                         f"{name} has {layout}")
    if module.gate_up_proj.shape[1] % 2 or module.down_proj.shape[2] != module.gate_up_proj.shape[1] // 2:
        raise ValueError(f"{name}: gate_up_proj {tuple(module.gate_up_proj.shape)} and down_proj "
                         f"{tuple(module.down_proj.shape)} are not [E, 2*I, d] / [E, d, I]")
    # a class of its own _apply_gate (DeepSeek-V4's swiglu_limit clamp, Inkling2's softcap, ...)
    # computes something other than SiLU(gate) * up, which is all moeblaze computes
    own_gate = module.__dict__.get("_apply_gate") or getattr(type(module), "_apply_gate", None)
    if own_gate is not None and own_gate is not _default_apply_gate():
        raise ValueError(f"moeblaze's gated experts compute SiLU(gate) * up; {name} overrides _apply_gate "
                         f"(e.g. a clamped or soft-capped gate), which moeblaze cannot run")
    # the module's own activation is what transformers applies; config.hidden_act only where it has none
    act_fn = getattr(module, "act_fn", None)
    if act_fn is not None:
        if not _is_silu(act_fn):
            raise ValueError(f"moeblaze's gated experts compute SiLU(gate) * up; {name}.act_fn is {act_fn!r}")
    else:
        act = getattr(module.config, "hidden_act", None)
        if act not in ("silu", "swish"):
            raise ValueError(f"moeblaze's gated experts compute SiLU(gate) * up; {name} has hidden_act={act!r}")


def _default_apply_gate():
    try:
        from transformers.integrations.moe import _default_apply_gate as default
    except ImportError:  # a transformers without it has no per-class gate either
        return None
    return default


def moeblaze_experts_forward(module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor, checkpoint: str = "preact") -> torch.Tensor:
    """The experts forward transformers calls: hidden_states [T, d], top_k_index / top_k_weights [T, k].
    The module's own checkpoint mode (set by use_moeblaze) wins over `checkpoint`."""
    _check_experts_module(module)
    checkpoint = getattr(module, _CHECKPOINT_ATTR, checkpoint)
    inter = module.gate_up_proj.shape[1] // 2
    w_gate = module.gate_up_proj[:, :inter, :].transpose(1, 2)
    w_up = module.gate_up_proj[:, inter:, :].transpose(1, 2)
    w_down = module.down_proj.transpose(1, 2)
    return moe_experts(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype), w_gate, w_up, w_down,
                       "swiglu", checkpoint)


def _interface():
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as err:
        raise ImportError("the Hugging Face adapter needs transformers >= 5: pip install 'moeblaze[hf]'") from err
    return ExpertsInterface


def register(checkpoint: str = "preact") -> str:
    """Register "moeblaze" in transformers' experts interface; returns the name to select.
    `checkpoint` applies to modules that use_moeblaze has not given a mode of their own
    (e.g. a model loaded with experts_implementation="moeblaze")."""
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {CHECKPOINTS}, got {checkpoint!r}")

    def forward(module, hidden_states, top_k_index, top_k_weights):
        return moeblaze_experts_forward(module, hidden_states, top_k_index, top_k_weights, checkpoint)

    _interface().register(NAME, forward)
    return NAME


def use_moeblaze(model: torch.nn.Module, checkpoint: str = "preact") -> int:
    """Route every experts module of a loaded transformers model through moeblaze, in checkpoint
    mode `checkpoint` (stored on each module: other models keep their own); returns how many
    experts modules it covers (0: the model has none transformers dispatches)."""
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {CHECKPOINTS}, got {checkpoint!r}")
    interface = _interface()
    if NAME not in getattr(interface, "_global_mapping", {}):  # keep a register(...) default already set
        register()
    experts = [m for m in model.modules() if _is_experts_module(m)]
    for module in experts:
        _check_experts_module(module)
    for module in experts:
        setattr(module, _CHECKPOINT_ATTR, checkpoint)
        module.config._experts_implementation = NAME
    return len(experts)
