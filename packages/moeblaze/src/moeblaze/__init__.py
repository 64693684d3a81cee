"""moeblaze: memory-efficient Mixture-of-Experts training."""

from .__about__ import __version__
from .dispatch import Dispatch, dispatch
from .experts import moe_experts
from .layer import MoE, prepare_ddp
from .naive import moe_reference
from .parallel import expert_parallel_experts
from .router import Router, Routing, route

__all__ = ["__version__", "MoE", "moe_experts", "dispatch", "Dispatch", "route", "Router", "Routing", "moe_reference",
           "expert_parallel_experts", "prepare_ddp"]
