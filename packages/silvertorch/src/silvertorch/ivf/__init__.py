from .index import FlatIndex, IVFIndex, SearchResult
from .kmeans import kmeans
from .quantize import quantize_rows

__all__ = ["IVFIndex", "FlatIndex", "SearchResult", "kmeans", "quantize_rows"]
