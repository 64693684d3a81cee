"""silvertorch: retrieval served as one PyTorch model."""

from .__about__ import __version__

# --- bloom (Bloom index + filter language) ---
from .bloom import BloomFilter, BloomIndex, FilterPlans, FilterSchema, FilterSyntaxError, parse_filters  # noqa: E402

# --- end bloom ---
# --- ivf (IVF / flat / fresh indexes, top-K) ---
from .filtering import DenseMaskFilter, RangeFilter  # noqa: E402
from .ivf import FlatIndex, IVFIndex, SearchResult  # noqa: E402

# --- end ivf ---

# --- model (OverArch, Value Model, RetrievalModel, publish) ---
# --- end model ---

__all__ = ["__version__", "BloomIndex", "BloomFilter", "parse_filters", "FilterPlans", "FilterSchema", "FilterSyntaxError", "IVFIndex", "FlatIndex", "SearchResult", "DenseMaskFilter", "RangeFilter"]
