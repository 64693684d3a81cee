"""`moeblaze.MoE`: router + routed experts (+ optional shared experts) as one nn.Module."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from gpukernels_common.checks import check_numbers, check_sizes

from .experts import CHECKPOINTS, moe_experts
from .naive import check_activation
from .parallel import expert_parallel_experts, local_expert_count
from .router import Router, check_capacity_factor, check_renormalize, check_score, check_top_k, check_x_dtype


class MoE(nn.Module):
    """Token-choice Mixture of Experts, dropless by default; `capacity_factor` caps each expert at
    ceil(capacity_factor * tokens * top_k / n_experts) slots (later tokens' overflow dropped,
    never computed; `self.last_dropped` counts them).

    `renormalize` rescales the top-k routing weights to sum to 1 for top_k > 1; at top_k = 1 the
    weight stays the expert's probability (Switch-style: the task loss still trains the router).
    `reset_parameters()` re-draws every parameter as __init__ does (meta-device builds: `to_empty()`
    then `reset_parameters()`).

    After each forward, `self.aux_loss` holds aux_loss_coef * load-balancing loss +
    z_loss_coef * router z-loss; add it to the training loss.

    With `expert_group` (a torch.distributed process group, e.g. `dist.group.WORLD`) the routed
    experts are sharded over its ranks: this rank's w_gate/w_up/w_down hold experts
    [rank * E_local, (rank + 1) * E_local), E_local = n_experts / group size, and tokens reach
    them through `expert_parallel_experts`. The router and shared experts stay replicated
    (all-reduce their gradients as for any data-parallel parameter; never the expert weights':
    under DistributedDataParallel call `prepare_ddp(model)` before wrapping).
    The capacity then applies per rank, to this rank's tokens; `self.last_traffic` holds the
    rows this rank sent in the last forward (see `expert_parallel_experts`).
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int, activation: str = "swiglu",
                 checkpoint: str = "preact", n_shared_experts: int = 0, score: str = "softmax", renormalize: bool = True,
                 aux_loss_coef: float = 0.01, z_loss_coef: float = 0.001, capacity_factor: float | None = None,
                 expert_group=None):
        super().__init__()
        # every argument checked here, before anything is built: not at the first forward
        # stored as Python ints (a numpy int would not go into a JSON config)
        d_model, d_ff, n_experts = check_sizes(d_model=d_model, d_ff=d_ff, n_experts=n_experts)
        check_sizes(0, n_shared_experts=n_shared_experts)
        check_top_k(top_k, n_experts)
        top_k = int(top_k)
        check_numbers(0, aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef)  # NaN would make every aux_loss NaN
        check_activation(activation)
        if checkpoint not in CHECKPOINTS:
            raise ValueError(f"checkpoint must be one of {CHECKPOINTS}, got {checkpoint!r}")
        check_score(score)
        check_renormalize(renormalize)
        check_capacity_factor(capacity_factor)
        self.d_model, self.d_ff, self.n_experts, self.top_k = d_model, d_ff, n_experts, top_k
        self.activation, self.checkpoint = activation, checkpoint
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.expert_group = expert_group
        held = n_experts if expert_group is None else local_expert_count(n_experts, expert_group)
        # parameters are allocated uninitialised (built on meta, then moved to the default
        # device) and drawn once, by reset_parameters: the same draws as a meta-device build
        # followed by to_empty() and reset_parameters()
        device = torch.empty(0).device  # the default device (honours `with torch.device(...)`)
        with torch.device("meta"):
            self.router = Router(d_model, n_experts, top_k, score, renormalize, capacity_factor)
            self.w_gate = nn.Parameter(torch.empty(held, d_model, d_ff))
            self.w_up = nn.Parameter(torch.empty(held, d_model, d_ff)) if activation == "swiglu" else None
            self.w_down = nn.Parameter(torch.empty(held, d_ff, d_model))
            self.shared = nn.ModuleList(_SharedExpert(d_model, d_ff) for _ in range(n_shared_experts))
        if device.type != "meta":
            self.to_empty(device=device)
            self.reset_parameters()
        self.aux_loss = torch.zeros(())
        self.last_dropped = torch.zeros((), dtype=torch.long)
        self.last_traffic: dict = {}

    def reset_parameters(self) -> None:
        """(Re-)initialise the router, the routed experts and the shared experts, drawing from the
        CPU generator in that order, as __init__ does (so a model built on the meta device,
        materialised with `to_empty()`, starts as a normally built one with the same seed).

        Routed experts are drawn expert by expert over all n_experts, N(0, 1/d_model) for w_gate
        and w_up and N(0, 1/d_ff) for w_down, and each rank of an `expert_group` keeps its own
        experts' draws: every rank seeded alike holds the matching slice of the weights a
        single-process MoE with that seed would have (not E_local copies of the same experts)."""
        self.router.proj.reset_parameters()
        held = self.w_gate.shape[0]
        first = 0 if self.expert_group is None else dist.get_rank(self.expert_group) * held
        std_in, std_out = 1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_ff)
        with torch.no_grad():
            for param, std in ((self.w_gate, std_in), (self.w_up, std_in), (self.w_down, std_out)):
                if param is None:
                    continue
                for e in range(self.n_experts):  # one expert at a time: no [E, ...] CPU copy
                    draw = torch.randn(param.shape[1:], dtype=torch.float32, device="cpu")
                    if first <= e < first + held:
                        param[e - first].copy_(draw * std)
        for expert in self.shared:
            expert.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        shape = x.shape
        flat = x.reshape(-1, self.d_model)
        routing = self.router(flat)
        self.aux_loss = self.aux_loss_coef * routing.aux_loss + self.z_loss_coef * routing.z_loss
        self.last_dropped = routing.dropped.sum()
        weights = routing.weights.to(flat.dtype)
        if self.expert_group is None:
            out = moe_experts(flat, routing.expert_ids, weights, self.w_gate, self.w_up, self.w_down, self.activation,
                              self.checkpoint)
        else:
            self.last_traffic = {}
            out = expert_parallel_experts(flat, routing.expert_ids, weights, self.w_gate, self.w_up, self.w_down,
                                          self.n_experts, self.expert_group, self.activation, self.checkpoint,
                                          traffic=self.last_traffic)
        for expert in self.shared:
            out = out + expert(flat)
        return out.reshape(shape)

    def _check_input(self, x: torch.Tensor) -> None:
        # here, naming x: the router's nn.Linear would otherwise fail with a bare matmul dtype error
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [..., d_model={self.d_model}], got shape {tuple(x.shape)}")
        check_x_dtype(x, self.router.proj.weight.dtype)

    def __getstate__(self):
        # aux_loss is attached to the last forward's graph, which deepcopy (EMA / AveragedModel
        # copies) and pickle cannot copy: copies get its value, detached
        state = super().__getstate__()
        if isinstance(state.get("aux_loss"), torch.Tensor) and state["aux_loss"].grad_fn is not None:
            state = {**state, "aux_loss": state["aux_loss"].detach()}
        return state


class _SharedExpert(nn.Module):
    """A dense SwiGLU FFN every token goes through (DeepSeek-style shared expert)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def reset_parameters(self) -> None:
        self.gate_up.reset_parameters()
        self.down.reset_parameters()

    def forward(self, x):
        a, b = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(a) * b)


#: the routed experts' parameters, which an expert-parallel MoE shards over its group
EXPERT_PARAMETERS = ("w_gate", "w_up", "w_down")


def prepare_ddp(model: nn.Module) -> list[str]:
    """Make `model`'s expert-parallel MoE layers (`expert_group=`) work under
    DistributedDataParallel; call it before wrapping `model`. Returns the qualified names it set.

    Each rank holds different experts, so DDP must leave their shards alone: it would broadcast
    rank 0's experts over the others at construction and average different experts' gradients.
    Their names go on DDP's ignore list (`DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`,
    added to any names already there). Their gradients already sum every rank's tokens (the
    all-to-all's backward); DDP divides the replicated parameters' by the world size, so a hook
    divides the experts' by the group size too: every gradient is then of the ranks' mean loss,
    as one process on the global batch. The expert group must span DDP's ranks (experts
    replicated over several expert groups would need a reduction over the replicas: not supported).
    """
    names = []
    for prefix, module in model.named_modules():
        if not isinstance(module, MoE) or module.expert_group is None:
            continue
        group_size = dist.get_world_size(module.expert_group)
        if group_size != dist.get_world_size():
            raise ValueError(f"prepare_ddp: the MoE {prefix or 'model'!r} shards its experts over {group_size} of "
                             f"{dist.get_world_size()} ranks; its expert_group must span all the ranks DDP runs on "
                             f"(experts replicated over several groups are not supported)")
        for name in EXPERT_PARAMETERS:
            param = getattr(module, name)
            if param is None:
                continue
            names.append(f"{prefix}.{name}" if prefix else name)
            if not getattr(param, "_moeblaze_ddp_scaled", False):  # once, also if called again
                param.register_hook(lambda grad, n=group_size: grad / n)
                param._moeblaze_ddp_scaled = True
    if not names:
        raise ValueError("prepare_ddp: the model has no MoE with expert_group= (a data-parallel MoE needs nothing)")
    ignored = getattr(model, "_ddp_params_and_buffers_to_ignore", ())
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted({*ignored, *names}))
    return names
