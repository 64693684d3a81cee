"""freescale: load-balanced, overlap-scheduled distributed training for sequence recommenders."""

from .__about__ import __version__
from .balance import BalancePlan, BatchBalancer
from .bubbles import BubbleMeter, bubble_reduction
from .comm import CommScheduler
from .cost import CostModel
from .embeddings import ShardedEmbeddings
from .jagged import KeyedJagged
from .longseq import Windows, cap_lengths
from .model import HSTURecommender
from .partition import Partition, oversized, partition
from .pipeline import TrainPipeline
from .simulate import SimResult, simulate

__all__ = [
    "__version__",
    "KeyedJagged",
    "CostModel",
    "partition",
    "Partition",
    "oversized",
    "cap_lengths",
    "Windows",
    "BatchBalancer",
    "BalancePlan",
    "ShardedEmbeddings",
    "CommScheduler",
    "TrainPipeline",
    "BubbleMeter",
    "bubble_reduction",
    "simulate",
    "SimResult",
    "HSTURecommender",
]
