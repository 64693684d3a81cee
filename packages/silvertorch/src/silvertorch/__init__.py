"""silvertorch: retrieval served as one PyTorch model."""

from .__about__ import __version__

# --- bloom (Bloom index + filter language) ---
# --- end bloom ---

# --- ivf (IVF / flat / fresh indexes, top-K) ---
# --- end ivf ---

# --- model (OverArch, Value Model, RetrievalModel, publish) ---
# --- end model ---

__all__ = ["__version__"]  # each block above extends __all__
