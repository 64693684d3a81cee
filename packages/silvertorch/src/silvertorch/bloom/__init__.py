from .index import BloomFilter, BloomIndex
from .parser import FilterPlans, FilterSchema, FilterSyntaxError, parse_filters

__all__ = ["BloomIndex", "BloomFilter", "parse_filters", "FilterPlans", "FilterSchema", "FilterSyntaxError"]
