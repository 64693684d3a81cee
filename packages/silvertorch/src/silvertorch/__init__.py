"""silvertorch: retrieval served as one PyTorch model."""

from .__about__ import __version__
from .bloom import BloomFilter, BloomIndex, FilterPlans, FilterSchema, FilterSyntaxError, parse_filters
from .filtering import DenseMaskFilter, RangeFilter
from .ivf import FlatIndex, IVFIndex, SearchResult
from .model import CapturedRetrieval, RetrievalModel, Retrieved
from .publish import ItemTable, load_item_table, load_towers, publish, save_item_table, save_towers
from .scoring import OverArch, ValueModel
from .topk import select_topk
from .towers import EmbeddingTower

__all__ = [
    "__version__",
    # filters
    "BloomIndex", "BloomFilter", "parse_filters", "FilterPlans", "FilterSchema", "FilterSyntaxError", "DenseMaskFilter", "RangeFilter",
    # indexes
    "IVFIndex", "FlatIndex", "SearchResult", "select_topk",
    # the model and its artifact
    "RetrievalModel", "Retrieved", "CapturedRetrieval", "OverArch", "ValueModel", "EmbeddingTower",
    "publish", "save_towers", "load_towers", "save_item_table", "load_item_table", "ItemTable",
]
