"""multibalance: multi-task gradient balancing on the shared representation."""

from .__about__ import __version__
from .base import Balancer, TaskScales
from .baselines import (
    DBMTL,
    FAMO,
    MGDA,
    EqualWeights,
    GradNorm,
    MetaBalance,
    PCGrad,
    UncertaintyWeighting,
    min_norm_weights,
)
from .metrics import BinaryTaskMetrics, MultiTaskMetrics, auc
from .multibalance import MultiBalance

__all__ = [
    "__version__",
    "Balancer",
    "TaskScales",
    "MultiBalance",
    "EqualWeights",
    "UncertaintyWeighting",
    "GradNorm",
    "PCGrad",
    "MGDA",
    "DBMTL",
    "FAMO",
    "MetaBalance",
    "min_norm_weights",
    "BinaryTaskMetrics",
    "MultiTaskMetrics",
    "auc",
]
