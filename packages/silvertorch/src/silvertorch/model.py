"""RetrievalModel: user features and a filter to top-N items in one forward pass.

    model = RetrievalModel.build(user_tower, overarch, value_model, item_embeddings, item_ids,
                                 attributes=(feature_ids, offsets, values), schema={"genre": 1})
    result = model.retrieve(user_features, ["genre:Comedy AND year:{1995,1996}"])

forward(user_features, ops, args, hashes[, value_weights]) runs, with tensor ops only (no
host synchronization, static shapes: `torch.compile` and `torch.export` see one graph; the one
exception, eager on the CPU, cuts the plans to the steps and term slots the batch uses):

    user tower -> u . centroids -> top-nprobe clusters (top-max_nprobe with adaptive probing)
    -> filter plans evaluated on the packed 64-item words covering the probed clusters by one
       custom op, `silvertorch::probed_filter_words` (the Bloom index's kernel on a Triton backend):
       a TERM is the AND of its k row words; EXACT_TERM, the terms under NOT, are packed from the
       stored attributes, for the plans' first max_exact_terms slots only: the parser puts a
       filter's exact terms there -> one bit per probed item
    -> adaptive probing: a cluster beyond the first nprobe is kept only while fewer than
       k_candidates items passed in the clusters ranked before it (with exact_verify, true matches:
       the first VERIFY_POOL x K Bloom passes in probe order verified, `_verified_per_cluster`)
    -> int8 scores of the probed items (exact integer dot products, cluster-major: the batch's probed
       clusters scored once for all its queries) and the fresh items
    -> exact verification of the best 4 x K (VERIFY_POOL) against the stored attributes, top-K
       verified candidates (a Bloom false positive gives its place to the next true match; eager:
       a query short of K true matches verifies a pool 4x larger, until K or every candidate)
    -> bf16 item embeddings -> OverArch task logits -> Value Model -> top-N

Item storage: positions [0, N) are the main index in cluster order (int8 codes, per-item scale,
Bloom bits over the same order); positions [N, N + fresh_capacity) are the fresh index, filled
by `add_items` without a rebuild and scored exactly. Payloads (ids, bf16 embeddings, attribute
terms, liveness) cover both, so a winner from either side is gathered the same way; `delete_items`
clears liveness, so deleted items are never returned. `rebuild()` folds the fresh items in.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import operator
from pathlib import Path

import torch
from torch import nn

from gpukernels_common import tracing
from gpukernels_common.device import to_device
from gpukernels_common.graphs import GraphedCall, padded_batch

from .__about__ import __version__
from .bloom.exact_words import exact_words
from .bloom.hashing import term_hash
from .bloom.index import BloomIndex, _validate_attributes, bloom_disagreement, check_k
from .bloom.parser import EXACT_TERM, NOP, TERM, FilterPlans, FilterSchema, parse_filters
from .bloom.probed import probed_filter_words, probed_keep
from .bloom.verify import verify_plans
from .filtering import derived_from, device_scalar, pack_bits
from .ivf.index import DEFAULT_NPROBE, IVFIndex
from .ivf.probed import probed_positions, probed_scores
from .ivf.probed import rows_of as _rows
from .ivf.quantize import quantize_queries
from .scoring import OverArch, ValueModel, check_value_weights
from .topk import as_integers
from .towers import TOWERS

FORMAT = "silvertorch.RetrievalModel"
# 2: the Bloom index's random k-subset of rows per term (`bloom.hashing.bloom_positions`)
FORMAT_VERSION = 2
OLD_VERSIONS = {1: "version 1 artifacts hold Bloom rows placed by double hashing: build the model again "
                   "(RetrievalModel.build, or `silvertorch build` from the published towers and item table)"}
CONFIG_FILE, TENSORS_FILE = "config.json", "model.safetensors"


@dataclasses.dataclass
class Retrieved:
    ids: torch.Tensor  # [Q, N] int64, -1 where fewer than N items pass
    scores: torch.Tensor  # [Q, N] Value Model output, -inf where missing
    task_probs: torch.Tensor  # [Q, N, T] per-task probabilities from OverArch, 0 where missing
    fresh: torch.Tensor  # [Q, N] bool: the item came from the fresh index
    # [Q] int64: items that passed the filter in the probed clusters and the fresh index, less the
    # Bloom false positives that exact verification found (exact when at most 4 x k_candidates passed)
    found: torch.Tensor


def _int64_words(bits: torch.Tensor) -> torch.Tensor:
    """bool [..., N] -> int64 [..., ceil(N / 64)] (at least one word), bit b of word w = item 64 w + b
    (as the Bloom words): padded to whole int64 words before packing, so the int32 words pair up."""
    n = bits.shape[-1]
    if n % 64 or not n:
        bits = torch.nn.functional.pad(bits, (0, 64 - n % 64))
    return pack_bits(bits).view(torch.int64)


def _finite(x: torch.Tensor) -> torch.Tensor:
    """torch.isfinite(x) in two ops where it takes four (each a launch on a GPU)."""
    return x.abs() < float("inf")


def _batch_extent(ops: torch.Tensor, args: torch.Tensor, hashes: torch.Tensor, max_exact: int):
    """(ops, args, hashes, exact slots) cut to what the batch's plans use: eager on the CPU, where
    the stack machine's small ops cost their dispatch, the steps up to the batch's last real one
    and the leading term slots its steps read (at least 1 hash slot, so shapes stay non-empty; 0
    exact slots when no step reads an exact term, so no stored attribute is looked up). Compiled
    and exported graphs, and GPUs (no host sync), keep the static bounds."""
    if ops.device.type != "cpu" or tracing():
        return ops, args, hashes, max_exact
    real = (ops != NOP).any(0).nonzero()
    last = int(real[-1]) + 1 if real.numel() else 0
    ops, args = ops[:, :last], args[:, :last]

    def slots(codes, bound, least):
        used = args[torch.isin(ops, torch.tensor(codes, dtype=ops.dtype))]
        return max(least, min(bound, int(used.max()) + 1)) if used.numel() else least

    return ops, args, hashes[:, : slots((TERM, EXACT_TERM), hashes.shape[1], 1)], slots((EXACT_TERM,), max_exact, 0)


# exact verification checks the best VERIFY_POOL x k_candidates Bloom-passing items: the results
# are the exact filter's unless more than (VERIFY_POOL - 1) x k_candidates false positives score
# above the K-th true match (a filter whose true matches are rarer than the Bloom false positives)
VERIFY_POOL = 4


def _check_against_spec(features: torch.Tensor, spec: dict) -> torch.Tensor:
    """user_features checked against the tower's `input_spec` ({"dtype", "width", "max"}): a
    [Q, width] batch, and for an int64 tower whole numbers in [0, max] per column (an id out of
    range would fail deep in an embedding, a fraction would be truncated silently)."""
    if features.dim() != 2 or features.shape[1] != spec["width"]:
        raise ValueError(f"user_features must be [num_users, {spec['width']}] for this user tower, got {tuple(features.shape)}")
    if spec.get("dtype") != "int64":
        return features
    if features.dtype.is_floating_point and not torch.equal(features, features.round()):
        raise ValueError("user_features must be whole numbers (ids) for this user tower")
    if features.dtype in (torch.uint16, torch.uint32, torch.uint64):
        # torch compares none of these ("lt_cpu" not implemented): as int64, exactly, but for a uint64
        # past int64, whose int64 view is negative and so refused below as out of range
        features = features.view(torch.int64) if features.dtype == torch.uint64 else features.long()
    high = torch.as_tensor(spec["max"], dtype=torch.int64, device=features.device)  # retrieve() takes device tensors
    # checked before any int64 conversion, which would wrap a huge float around; floats in float64,
    # which holds every bound exactly (bfloat16 rounds a bound of 499 up to 500, letting id 500 through)
    values = features.double() if features.dtype.is_floating_point else features
    bad = (values < 0) | (values > high.to(values.dtype if values.dtype.is_floating_point else torch.int64))
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"user_features[{row}, {col}] = {features[row, col].item():g} is out of range: column {col} takes "
                         f"ids in [0, {int(high[col])}]")
    return features.long()


def _checked_int(name: str, value) -> int:
    """A size option as a Python int (numpy ints too); a float or bool refused by name. A config.json
    edited to 16.0 or true loaded, and then every query failed in topk or a shape (a TypeError)."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an int, got {value!r}")


def _default_clusters(num_items: int) -> int:
    """build()'s n_clusters when none is given: about sqrt(num_items)."""
    return max(1, int(round(math.sqrt(num_items))))


def _checked_item_ids(item_ids, n: int) -> torch.Tensor:
    """item_ids for n items as int64 (0..n-1 when None): n distinct non-negative integers."""
    ids = torch.arange(n) if item_ids is None else as_integers(item_ids, "item_ids").cpu()
    if ids.shape != (n,) or (ids < 0).any() or torch.unique(ids).numel() != n:
        raise ValueError(f"item_ids must be {n} distinct non-negative ids")
    return ids


def _checked_dense(dense, n: int, width: int | None, name: str) -> torch.Tensor:
    """Dense item features as finite float32 [n, width] (any width >= 1 when None): a NaN row scores
    -inf or NaN and its item silently drops out; extra rows would be dropped, missing ones fail late.
    Checked after the float32 cast, which turns a float64 past its range into inf."""
    t = torch.as_tensor(dense).float()
    shape = f"[num_items={n}, {'F' if width is None else width}]"
    if t.dim() != 2 or t.shape[0] != n or (t.shape[1] != width if width is not None else t.shape[1] < 1):
        raise ValueError(f"{name} must be {shape} (one row per item), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite (float32), row {int((~torch.isfinite(t)).any(1).nonzero()[0])} is not")
    return t


def _module_tensors(**modules: nn.Module) -> dict:
    """The modules' parameters and buffers, named as in the model's state dict (`overarch.mlp.0.weight`)."""
    return {f"{prefix}.{k}": v for prefix, m in modules.items() for k, v in m.state_dict().items()}


def check_weights(tensors: dict, where: str = "") -> None:
    """Tensors named as in the model's state dict: every floating one finite, and the Value Model's
    fixed weights within `check_value_weights`' bound; one pass at build and at load. A NaN or an
    overflow would make every score non-finite: every query would answer ids -1, the server a 200."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{where}{name} has NaN or inf values")
    if (w := tensors.get("value_model.weights")) is not None:
        try:
            check_value_weights(w, w.shape[-1], "value_model.weights")
        except ValueError as err:
            raise ValueError(f"{where}{err}") from None


def _checked_attributes(attributes, n: int):
    """Jagged (feature_ids, offsets, values) for n items as int64 CPU tensors, checked as the
    Bloom index checks them (integers, offsets [n + 1] from 0, non-decreasing, ending at the
    pair count); None means no attributes."""
    if attributes is None:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(n + 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    fids, offsets, vals = (torch.as_tensor(t).cpu() for t in attributes)
    if offsets.shape != (n + 1,):
        raise ValueError(f"attribute offsets must be [num_items + 1 = {n + 1}], got {tuple(offsets.shape)}")
    try:
        _validate_attributes(fids, offsets, vals)
    except ValueError as err:
        raise ValueError(f"attributes: {err}") from None
    return fids.long(), offsets.long(), vals.long()


def _pad_jagged(feature_ids, offsets, values, width: int | None = None):
    """Jagged (feature_id, value) pairs -> padded [N, A] fids, values and counts."""
    feature_ids, offsets, values = (torch.as_tensor(t).long() for t in (feature_ids, offsets, values))
    counts = offsets.diff()
    n = counts.numel()
    a = int(counts.max()) if n else 0
    width = max(a, 1) if width is None else width
    if a > width:
        raise ValueError(f"an item has {a} attribute terms; this model stores at most {width} per item")
    slot = torch.arange(values.numel()) - torch.repeat_interleave(offsets[:-1], counts)
    row = torch.repeat_interleave(torch.arange(n), counts)
    fids = torch.zeros(n, width, dtype=torch.int64)
    vals = torch.zeros(n, width, dtype=torch.int64)
    fids[row, slot], vals[row, slot] = feature_ids, values
    return fids, vals, counts


def _unpad_jagged(fids, vals, counts):
    keep = torch.arange(fids.shape[1]) < counts.unsqueeze(1)
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    return fids[keep], offsets, vals[keep]


def aoti_unsupported() -> str | None:
    """Why this torch cannot write AOTInductor packages (`RetrievalModel.package`), or None."""
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 6):
        return f"RetrievalModel.package needs torch >= 2.6 (AOTInductor packages), found {torch.__version__}"
    return None


class RetrievalModel(nn.Module):
    def __init__(self, user_tower: nn.Module, overarch: OverArch, value_model: ValueModel, tensors: dict, *,
                 nprobe: int, k_candidates: int, num_results: int, bloom_k: int, bloom_multiplier: float,
                 schema: dict | None = None, max_ops: int = 32, max_terms: int = 16, exact_verify: bool = True,
                 fresh_used: int = 0, max_nprobe: int | None = None, max_exact_terms: int = 8):
        super().__init__()
        self.user_tower, self.overarch, self.value_model = user_tower, overarch, value_model
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.num_main = self.codes.shape[0]
        self.fresh_capacity = self.item_ids.shape[0] - self.num_main
        nprobe, k_candidates, num_results, max_ops, max_terms, fresh_used, max_exact_terms = (
            _checked_int(name, value) for name, value in (
                ("nprobe", nprobe), ("k_candidates", k_candidates), ("num_results", num_results), ("max_ops", max_ops),
                ("max_terms", max_terms), ("fresh_used", fresh_used), ("max_exact_terms", max_exact_terms)))
        if max_nprobe is not None:
            max_nprobe = _checked_int("max_nprobe", max_nprobe)
        # a NaN read from config.json failed the Bloom check at load with "cannot convert float NaN to integer"
        if isinstance(bloom_multiplier, bool) or not isinstance(bloom_multiplier, numbers.Real):
            raise TypeError(f"bloom_multiplier must be a number, got {bloom_multiplier!r}")
        if not (math.isfinite(bloom_multiplier) and bloom_multiplier > 1):
            raise ValueError(f"bloom_multiplier must be a finite number > 1 (the Bloom index's b_multiplier), got {bloom_multiplier!r}")
        if not 0 <= fresh_used <= self.fresh_capacity:
            raise ValueError(f"fresh_used must be in [0, fresh capacity={self.fresh_capacity}], got {fresh_used}")
        self.fresh_used = fresh_used
        self.dim = self.codes.shape[1]
        n_clusters, max_cluster = self.cluster_positions.shape
        if not 1 <= nprobe <= n_clusters:
            raise ValueError(f"nprobe must be in [1, n_clusters={n_clusters}], got {nprobe}")
        max_nprobe = nprobe if max_nprobe is None else max_nprobe
        if not nprobe <= max_nprobe <= n_clusters:
            raise ValueError(f"max_nprobe must be in [nprobe={nprobe}, n_clusters={n_clusters}], got {max_nprobe}")
        if not 1 <= k_candidates <= max_nprobe * max_cluster + self.fresh_capacity:
            raise ValueError(f"k_candidates must be in [1, max_nprobe x largest cluster + fresh capacity = "
                             f"{max_nprobe * max_cluster + self.fresh_capacity}], got {k_candidates}")
        if not 1 <= num_results <= k_candidates:
            raise ValueError(f"num_results must be in [1, k_candidates={k_candidates}], got {num_results}")
        dense_dim = self.item_dense.shape[1] if hasattr(self, "item_dense") else 0
        if overarch.dense_dim != dense_dim:  # otherwise every forward would fail, after the build
            raise ValueError(f"the OverArch reads {overarch.dense_dim} dense item features, the items have {dense_dim}; "
                             f"pass item_dense [num_items, {overarch.dense_dim}]" if overarch.dense_dim else
                             f"the items have {dense_dim} dense features, the OverArch reads none (dense_dim=0)")
        tower_dim = getattr(user_tower, "dim", None)  # EmbeddingTower's output width (a custom tower is checked per forward)
        if isinstance(tower_dim, int) and not isinstance(tower_dim, bool) and tower_dim != self.dim:
            raise ValueError(f"the user tower returns {tower_dim}-dimensional vectors, the items are {self.dim}-dimensional: "
                             f"every query would fail")
        if overarch.dim != self.dim or overarch.num_tasks != value_model.num_tasks:
            raise ValueError(f"overarch (dim {overarch.dim}, {overarch.num_tasks} tasks) does not fit the items (dim {self.dim}) "
                             f"and the value model ({value_model.num_tasks} tasks)")
        self.nprobe, self.max_nprobe, self.k_candidates, self.num_results = nprobe, max_nprobe, k_candidates, num_results
        # a cluster of max_cluster items starting anywhere in a word spans at most this many words
        self.words_per_cluster = (max_cluster + 62) // 64 + 1
        check_k(bloom_k, "bloom_k")  # at build and at load: an edited config.json would read every Bloom word wrongly
        self.bloom_k, self.bloom_multiplier = int(bloom_k), bloom_multiplier  # (a numpy int would fail the JSON config)
        # checked (names a filter can write, int64 ids) and with Python int ids (numpy ones would fail the JSON config)
        self._filter_schema = schema if isinstance(schema, FilterSchema) else FilterSchema(dict(schema or {}))
        if not 1 <= max_exact_terms <= max_terms:
            raise ValueError(f"max_exact_terms must be in [1, max_terms={max_terms}], got {max_exact_terms}")
        if not isinstance(exact_verify, bool):  # "no" read from an edited config.json was taken as True
            raise TypeError(f"exact_verify must be True or False, got {exact_verify!r}")
        self.max_ops, self.max_terms, self.exact_verify = max_ops, max_terms, exact_verify
        self.max_exact_terms = max_exact_terms
        # where each cluster's items start and end in storage: the fused scoring kernels' ranges
        sizes = self.cluster_valid.sum(1)
        self.register_buffer("cluster_offsets", torch.cat([sizes.new_zeros(1), sizes.cumsum(0)]), persistent=False)
        # per-model tables the forward would otherwise derive per call (each a launch on a GPU): each
        # cluster's first item, size and the packed 64-item words covering it; the fresh positions
        self.register_buffer("cluster_starts", self.cluster_positions[:, 0].contiguous(), persistent=False)
        self.register_buffer("cluster_sizes", sizes, persistent=False)
        word_steps = torch.arange(self.words_per_cluster, device=sizes.device)
        self.register_buffer("cluster_words", ((self.cluster_starts >> 6).unsqueeze(1) + word_steps).clamp(max=(self.num_main - 1) // 64),
                             persistent=False)
        self.register_buffer("fresh_positions", torch.arange(self.num_main, self.item_ids.shape[0], device=sizes.device),
                             persistent=False)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def build(cls, user_tower: nn.Module, overarch: OverArch, value_model: ValueModel, item_embeddings: torch.Tensor,
              item_ids=None, attributes=None, schema: dict | None = None, *, n_clusters: int | None = None, nprobe: int | None = None,
              k_candidates: int = 256, num_results: int = 10, fresh_capacity: int = 1024, bloom_k: int = 3,
              bloom_multiplier: float = 5.0, max_attributes: int | None = None, item_dense=None, max_ops: int = 32,
              max_terms: int = 16, exact_verify: bool = True, kmeans_iters: int = 20, seed: int = 0,
              progress=None, max_nprobe: int | None = None, max_exact_terms: int = 8, _fit: tuple = ()) -> RetrievalModel:
        """Quantize and cluster the item embeddings, index their attributes, assemble the model.

        attributes: jagged (feature_ids, offsets, values) per item, in item_embeddings' row order.
        max_nprobe: adaptive probing; the forward probes up to max_nprobe clusters (best centroid
        first) and keeps the smallest prefix of at least nprobe clusters in which k_candidates
        items pass the filter (default nprobe: fixed probing).
        max_exact_terms: how many terms under NOT one filter may have (they are evaluated exactly;
        the probed-cluster filter's exact-attribute cost grows with this bound, not with max_terms).
        `progress(step_name)` is called before each build step (the CLI shows a progress bar).
        `_fit` (rebuild): the names of k_candidates / num_results when carried over, not passed: they
        shrink to what the new clusters can hold.
        """
        step = progress or (lambda name: None)
        check_k(bloom_k, "bloom_k")
        check_weights(_module_tensors(user_tower=user_tower, overarch=overarch, value_model=value_model))
        emb = torch.as_tensor(item_embeddings).detach().float().cpu()
        if emb.dim() != 2 or emb.shape[0] < 1:
            raise ValueError(f"item_embeddings must be [num_items >= 1, dim], got {tuple(emb.shape)}")
        n, d = emb.shape
        ids = _checked_item_ids(item_ids, n)
        fids, offsets, vals = _checked_attributes(attributes, n)
        dense = None if item_dense is None else _checked_dense(item_dense, n, None, "item_dense")
        step("clustering (k-means++) and int8 quantization")
        n_clusters = n_clusters or _default_clusters(n)
        nprobe = min(DEFAULT_NPROBE, n_clusters) if nprobe is None else nprobe  # a small corpus has fewer clusters
        ivf = IVFIndex.build(emb, ids, n_clusters=n_clusters, iters=kmeans_iters, seed=seed)
        order = ivf.order
        step("Bloom index over item attributes")
        pf, pv, pc = _pad_jagged(fids, offsets, vals)
        width = max(max_attributes or 0, pf.shape[1])
        pf, pv, pc = _pad_jagged(fids, offsets, vals, width)
        pf, pv, pc = pf[order], pv[order], pc[order]
        bloom = BloomIndex.build(*_unpad_jagged(pf, pv, pc), k=bloom_k, b_multiplier=bloom_multiplier)
        step("assembling the model")
        sizes = ivf.offsets.diff()
        max_cluster = max(int(sizes.max()), 1)
        if "k_candidates" in _fit:  # known only now: fewer live items make smaller clusters
            k_candidates = min(k_candidates, (nprobe if max_nprobe is None else max_nprobe) * max_cluster + fresh_capacity)
            if "num_results" in _fit:
                num_results = min(num_results, k_candidates)
        slot = torch.arange(max_cluster)
        cluster_positions = (ivf.offsets[:-1].unsqueeze(1) + slot).clamp(max=n - 1)
        cluster_valid = slot < sizes.unsqueeze(1)
        f = fresh_capacity
        dense = None if dense is None else dense[order]
        tensors = {
            "centroids": ivf.centroids.float(), "cluster_positions": cluster_positions, "cluster_valid": cluster_valid,
            "codes": ivf.codes, "scales": ivf.scales.float(),
            "bloom_bits": bloom.bits, "bloom_row_offsets": bloom.row_offsets, "bloom_widths": bloom.widths,
            "item_ids": torch.cat([ivf.ids, torch.full((f,), -1, dtype=torch.int64)]),
            "item_embeddings": torch.cat([emb[order], torch.zeros(f, d)]).to(torch.bfloat16),
            "attr_feature_ids": torch.cat([pf, torch.zeros(f, width, dtype=torch.int64)]),
            "attr_values": torch.cat([pv, torch.zeros(f, width, dtype=torch.int64)]),
            "attr_counts": torch.cat([pc, torch.zeros(f, dtype=torch.int64)]),
            "alive": torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(f, dtype=torch.bool)]),
        }
        if dense is not None:
            tensors["item_dense"] = torch.cat([dense, torch.zeros(f, dense.shape[1])])
        tensors["attr_terms"] = term_hash(tensors["attr_feature_ids"], tensors["attr_values"])
        return cls(user_tower, overarch, value_model, tensors, nprobe=nprobe, k_candidates=k_candidates, num_results=num_results,
                   bloom_k=bloom_k, bloom_multiplier=bloom_multiplier, schema=schema, max_ops=max_ops, max_terms=max_terms,
                   exact_verify=exact_verify, max_nprobe=max_nprobe, max_exact_terms=max_exact_terms).eval()

    @property
    def schema(self) -> dict:
        """Feature name -> id of the filter language (the checked schema's, ids as Python ints)."""
        return self._filter_schema.features

    # -- filters -----------------------------------------------------------------------------
    def prepare_filters(self, expressions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compile filter expressions to (ops, args, hashes) padded to the model's fixed plan shape."""
        plans = parse_filters(expressions, self._filter_schema if self.schema else None, max_terms=self.max_terms)
        return self.pad_plans(plans)

    def pad_plans(self, plans: FilterPlans):
        q, length = plans.ops.shape
        if length > self.max_ops:
            raise ValueError(f"a filter compiles to {length} operations; this model accepts at most max_ops={self.max_ops}")
        if plans.hashes.shape[1] > self.max_terms:
            raise ValueError(f"a filter has {plans.hashes.shape[1]} terms; this model accepts at most max_terms={self.max_terms}")
        exact = plans.exact_terms_per_query()
        if (exact > self.max_exact_terms).any():
            i = int(exact.argmax())
            raise ValueError(f"filter {plans.expressions[i]!r} has {int(exact[i])} terms under NOT (evaluated exactly); this model "
                             f"accepts at most max_exact_terms={self.max_exact_terms} (RetrievalModel.build(max_exact_terms=...))")
        ops = torch.zeros(q, self.max_ops, dtype=torch.int32)
        args = torch.zeros(q, self.max_ops, dtype=torch.int32)
        hashes = torch.zeros(q, self.max_terms, dtype=torch.int64)
        ops[:, :length], args[:, :length] = plans.ops, plans.args
        hashes[:, : plans.hashes.shape[1]] = plans.hashes
        return to_device((ops, args, hashes), self.codes.device)  # one copy, no host synchronisation

    def _verified(self, positions, ops, args, hashes):
        """[Q, M] bool: item at positions[q, m] passes the plan of q on its stored attributes (one
        custom op: one kernel on a Triton backend)."""
        return verify_plans(self.attr_terms, self.attr_counts, positions, ops, args, hashes)

    def _derived(self, slot: str, tensor: torch.Tensor, make) -> torch.Tensor:
        """`derived_from` eagerly; made afresh while a graph is traced or captured, where a kept value
        would go stale in a CUDA graph replayed after add_items or delete_items."""
        return make(tensor) if tracing() else derived_from(self, slot, tensor, make)

    def _fresh_embeddings(self) -> torch.Tensor:
        """The fresh items' embeddings in float32, converted again only after `item_embeddings` changed (`add_items`)."""
        return self._derived("_fresh_float", self.item_embeddings, lambda embeddings: embeddings[self.num_main:].float())

    def _alive_words(self) -> torch.Tensor:
        """The main index's alive bits as int64 words, packed again only after `alive` changed."""
        return self._derived("_alive_packed", self.alive, lambda alive: _int64_words(alive[: self.num_main]))

    def _exact_words(self, words, hashes, ops, args):
        """int64 [Q, E, M], E = max_exact_terms: bit b of [q, t, m] set when main-index item
        64 * words[q, m] + b really has term hashes[q, t] (bits past the main index describe its last
        item and must be masked). Only the first E slots: the plans keep their EXACT_TERM terms there;
        only the slots an EXACT_TERM step reads (`exact_words`: one kernel on a Triton backend)."""
        q, m = words.shape
        hashes = hashes[:, : self.max_exact_terms]
        if not tracing() and words.device.type == "cpu":  # (torch.unique would wait for a GPU)
            distinct, which = torch.unique(hashes, return_inverse=True)
            if distinct.numel() * self.num_main <= q * m * 64:
                # few distinct terms in the batch (queries sharing a filter): each term's words over
                # the whole main index once, then every query reads its words from them
                has = torch.zeros(distinct.numel(), self.num_main, dtype=torch.bool, device=words.device)
                terms, counts = self.attr_terms[: self.num_main], self.attr_counts[: self.num_main]
                for a in range(terms.shape[1]):
                    has |= (terms[:, a] == distinct.unsqueeze(1)) & (counts > a)
                return _int64_words(has)[which.unsqueeze(-1), words.unsqueeze(1)]
        return exact_words(self.attr_terms, self.attr_counts, words, hashes.contiguous(), ops, args, self.num_main - 1)

    def _probed_passing(self, clusters, ops, args, hashes, exact_slots: int | None = None):
        """bool [Q, P, S]: item slot s of probed cluster clusters[q, p] exists, is alive and passes the
        filter, evaluated once per packed word covering the cluster, not once per item."""
        q, p = clusters.shape
        n_words = self.words_per_cluster
        # the words covering each probed cluster: word start // 64 of its first item and the next ones
        words = _rows(self.cluster_words, clusters).reshape(q, p * n_words)
        exact_slots = self.max_exact_terms if exact_slots is None else exact_slots
        exact = (self._exact_words(words, hashes[:, :exact_slots], ops, args) if exact_slots
                 else words.new_zeros(q, 1, words.shape[1]))  # no plan reads an exact term: nothing to look up
        passing = probed_filter_words(self.bloom_bits, self.bloom_row_offsets, self.bloom_widths, words, ops, args, hashes,
                                      exact, self.bloom_k)
        # the words ANDed with the alive bits, aligned to the clusters' slots, cut at their ends and
        # unpacked: word-sized work in one custom op (one kernel on a Triton backend); a traced or
        # captured graph packs the alive bits itself on every call (`_derived`)
        return probed_keep(passing, words, self._alive_words(), clusters, self.cluster_starts, self.cluster_sizes,
                           self.cluster_positions.shape[1])

    def _verified_per_cluster(self, keep, clusters, ops, args, hashes):
        """int64 [Q, P]: per probed cluster, the true matches among the first VERIFY_POOL x K items
        that pass the Bloom filter, in probe order (static shapes: one pool, verified as the
        candidates are). The adaptive choice counts these, not the Bloom passes, whose false
        positives would stop the widening short of K results. Exact for every cluster whose
        predecessors hold at most VERIFY_POOL x K Bloom passes; past that a lower bound, so
        probing goes on (wider, never short) while the pool held fewer than K true matches."""
        q, p, s = keep.shape
        flat = keep.reshape(q, p * s)
        pool = min(p * s, VERIFY_POOL * self.k_candidates)
        # the first `pool` passing slots: passing slots ranked by slot order, the others last
        rank = torch.arange(p * s, 0, -1, device=keep.device)
        first = torch.topk(torch.where(flat, rank, torch.zeros_like(rank)), pool, dim=1).indices
        cand = probed_positions(first, clusters, self.cluster_starts, s, self.num_main)
        true = flat.gather(1, first) & self._verified(cand, ops, args, hashes)
        return torch.zeros(q, p, dtype=torch.int64, device=keep.device).scatter_add_(1, first // s, true.long())

    def _pool(self, scores, clusters, pool, ops, args, hashes):
        """The best `pool` slots of each query: (scores, storage positions, finite: a real candidate,
        verified: finite and, with exact_verify, passing the filter on the stored attributes: no
        Bloom false positive)."""
        top, j = torch.topk(scores, pool, dim=1)
        # storage positions of the pool only: slot j of the main part is item j % S of probed
        # cluster j // S (clamped as cluster_positions is); fresh slot f is item num_main + f
        cand = probed_positions(j, clusters, self.cluster_starts, self.cluster_positions.shape[1], self.num_main)
        finite = _finite(top)
        verified = finite
        if self.exact_verify:  # Bloom false positives out: every term checked against the stored attributes
            verified = finite & self._verified(cand, ops, args, hashes)
        return top, cand, finite, verified

    # -- the forward pass ----------------------------------------------------------------------
    def forward(self, user_features, ops, args, hashes, value_weights=None):
        """Returns (ids [Q, N], scores [Q, N], task_probs [Q, N, T], fresh [Q, N], found [Q]); a slot left
        empty (fewer than N items passed) holds id -1, score -inf, task_probs 0 and fresh False.
        ops, args, hashes: plans from prepare_filters / pad_plans, which check them against the model's bounds."""
        u = self.user_tower(user_features).float()
        if u.dim() != 2 or u.shape[1] != self.dim:  # static shapes: no check at run time in a traced graph
            raise ValueError(f"the user tower returned {tuple(u.shape)}; this model's items need [num_users, {self.dim}]")
        q = u.shape[0]
        clusters = torch.topk(u @ self.centroids.T, self.max_nprobe, dim=1).indices  # best centroid first
        ops, args, hashes, exact_slots = _batch_extent(ops, args, hashes, self.max_exact_terms)
        keep = self._probed_passing(clusters, ops, args, hashes, exact_slots)  # [Q, P, S]
        fresh_found = None  # no fresh index: nothing to add
        if self.fresh_capacity:
            fkeep = self.alive[self.num_main:] & self._verified(self.fresh_positions.expand(q, -1), ops, args, hashes)
            fresh_found = fkeep.sum(1)
        if self.max_nprobe > self.nprobe:  # adaptive: probe cluster p only while fewer than K items passed before it
            per_cluster = self._verified_per_cluster(keep, clusters, ops, args, hashes) if self.exact_verify else keep.sum(2)
            before = per_cluster.cumsum(1) - per_cluster
            if fresh_found is not None:
                before = before + fresh_found.unsqueeze(1)
            probe = (torch.arange(self.max_nprobe, device=u.device) < self.nprobe) | (before < self.k_candidates)
            keep = keep & probe.unsqueeze(-1)
        found = keep.sum((1, 2))
        if fresh_found is not None:
            found = found + fresh_found
        q_codes, q_scales = quantize_queries(u)  # one kernel on a Triton backend, eagerly
        # int8 scores of the probed slots, -inf where keep is off: one custom op (the fused IVF kernels
        # on a Triton backend, in eager, compiled and exported graphs alike)
        main = probed_scores(self.codes, self.scales, self.cluster_positions, self.cluster_offsets, clusters, keep, q_codes, q_scales)
        scores = main
        if self.fresh_capacity:
            fscores = u @ self._fresh_embeddings().T
            scores = torch.cat([main, torch.where(fkeep, fscores, device_scalar(float("-inf"), fscores))], 1)
        # with exact verification, a pool of the best VERIFY_POOL x K is checked, so that a Bloom
        # false positive gives its place to the next true match instead of leaving it empty
        pool = min(scores.shape[1], VERIFY_POOL * self.k_candidates) if self.exact_verify else self.k_candidates
        while True:
            top, cand, finite, verified = self._pool(scores, clusters, pool, ops, args, hashes)
            if not self.exact_verify:
                break
            true_matches = verified.sum(1)
            # eager only (a traced graph keeps its static pool): a query whose pool holds fewer than K
            # true matches while more candidates lie past it verifies a pool VERIFY_POOL x larger
            if (pool == scores.shape[1] or tracing()
                    or not bool(((true_matches < self.k_candidates) & finite[:, -1]).any())):
                break
            pool = min(scores.shape[1], VERIFY_POOL * pool)
        if self.exact_verify:
            # less the pool's Bloom false positives (its finite candidates not verified; verified ones are
            # finite): exact whenever found <= pool
            found = found - (finite.sum(1) - true_matches)
            # the K best verified (top is sorted, so these are the first K verified of the pool)
            first = torch.topk(torch.where(verified, top, device_scalar(float("-inf"), top)), self.k_candidates, dim=1).indices
            cand, verified = cand.gather(1, first), verified.gather(1, first)
        items = _rows(self.item_embeddings, cand)  # bf16: OverArch converts them as it goes
        dense = _rows(self.item_dense, cand) if hasattr(self, "item_dense") else None
        logits = self.overarch(u, items, dense)
        task_probs = torch.sigmoid(logits.float())  # the Value Model's input, and the returned task_probs
        value = self.value_model.value_of(task_probs, value_weights)
        value = torch.where(verified, value, device_scalar(float("-inf"), value))
        best, k = torch.topk(value, self.num_results, dim=1)
        winners = cand.gather(1, k)
        ok = _finite(best)
        ids = torch.where(ok, _rows(self.item_ids, winners), device_scalar(-1, self.item_ids))
        probs = task_probs.gather(1, k.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        # an empty slot gathered some unverified candidate's probabilities: 0 there, as its id is -1
        probs = torch.where(ok.unsqueeze(-1), probs, device_scalar(0.0, probs))
        return ids, best, probs, ok & (winners >= self.num_main), found

    def check_user_features(self, user_features) -> torch.Tensor:
        """A batch of user features as the tower takes them, or a ValueError naming what is wrong:
        [Q >= 1, ...], real (not bool), finite, and what the tower's `input_spec` says (width; whole numbers
        in each column's id range for an id tower, returned as int64); float features for a tower
        without one in its floating dtype, still finite. retrieve() and the server call it."""
        user_features = torch.as_tensor(user_features)
        if user_features.dim() < 1 or user_features.shape[0] < 1:
            raise ValueError(f"user_features must be a batch [Q >= 1, ...], got {tuple(user_features.shape)}")
        if user_features.dtype == torch.bool or user_features.dtype.is_complex:  # True would be user 1
            raise ValueError(f"user_features must be real numbers, got {user_features.dtype}")
        if user_features.dtype.is_floating_point and not torch.isfinite(user_features).all():
            raise ValueError("user_features contain NaN or inf")
        spec = getattr(self.user_tower, "input_spec", None)
        if spec:
            return _check_against_spec(user_features, spec)
        tower_dtype = next((p.dtype for p in self.user_tower.parameters() if p.is_floating_point()), torch.float32)
        if user_features.dtype.is_floating_point and user_features.dtype != tower_dtype:
            # float features in the tower's dtype, float32 for a tower without weights (float64 into a
            # float32 tower fails in its matmul); checked after the cast, which turns a number past
            # the dtype's range into inf
            user_features = user_features.to(tower_dtype)
            if not torch.isfinite(user_features).all():
                raise ValueError(f"user_features: a number is out of range (the user tower takes {tower_dtype})")
        return user_features

    def _checked_request(self, user_features, filters) -> tuple[torch.Tensor, list[str]]:
        """(user features, filters) of a `retrieve` call, checked: one expression per user, "" each by default."""
        user_features = self.check_user_features(user_features)
        q = user_features.shape[0]
        filters = [""] * q if filters is None else filters
        if isinstance(filters, str) or len(filters) != q:
            raise ValueError(f"filters must be a list of {q} expressions (one per user), got {filters!r:.80}")
        return user_features, filters

    def retrieve(self, user_features: torch.Tensor, filters: list[str] | None = None, value_weights=None) -> Retrieved:
        """Validate, compile the filters, run one forward."""
        user_features, filters = self._checked_request(user_features, filters)
        q = user_features.shape[0]
        if value_weights is not None:
            value_weights = self.value_model.check_request_weights(value_weights, q).to(self.codes.device)
        with torch.no_grad():
            out = self(user_features.to(self.codes.device), *self.prepare_filters(filters), value_weights)
        return Retrieved(*out)

    # -- freshness -------------------------------------------------------------------------------
    def add_items(self, embeddings, ids, attributes=None, dense=None) -> torch.Tensor:
        """Append items to the fresh index (no rebuild); returns their storage positions."""
        emb = torch.as_tensor(embeddings).float()
        ids = as_integers(ids, "ids").reshape(-1)
        n = ids.numel()
        if emb.shape != (n, self.dim) or not torch.isfinite(emb).all():
            raise ValueError(f"embeddings must be finite [{n}, {self.dim}], got {tuple(emb.shape)}")
        if (ids < 0).any() or torch.unique(ids).numel() != n:
            raise ValueError("ids must be distinct and non-negative")
        live_ids = self.item_ids[self.alive]
        if torch.isin(ids.to(live_ids.device), live_ids).any():
            raise ValueError("some ids are already live in the model; delete them first to replace them")
        if self.fresh_used + n > self.fresh_capacity:
            raise ValueError(f"the fresh index holds {self.fresh_capacity} items and {self.fresh_used} are used; "
                             f"call rebuild() to fold them into the main index")
        fids, vals, counts = _pad_jagged(*_checked_attributes(attributes, n), width=self.attr_terms.shape[1])
        if hasattr(self, "item_dense") and dense is None:
            raise ValueError(f"this model has dense item features; pass dense [{n}, {self.item_dense.shape[1]}]")
        if dense is not None and not hasattr(self, "item_dense"):
            raise ValueError("this model has no dense item features (built without item_dense); leave dense out")
        if dense is not None:
            dense = _checked_dense(dense, n, self.item_dense.shape[1], "dense")
        at = torch.arange(self.num_main + self.fresh_used, self.num_main + self.fresh_used + n, device=self.codes.device)
        dev = self.codes.device
        self.item_embeddings[at] = emb.to(dev, torch.bfloat16)
        self.item_ids[at] = ids.to(dev)
        self.attr_feature_ids[at], self.attr_values[at], self.attr_counts[at] = fids.to(dev), vals.to(dev), counts.to(dev)
        self.attr_terms[at] = term_hash(fids, vals).to(dev)
        if dense is not None:
            self.item_dense[at] = dense.to(dev)
        self.alive[at] = True
        self.fresh_used += n
        return at

    def delete_items(self, ids) -> int:
        """Never return these ids again (main or fresh); returns how many live items were deleted."""
        # refused as add_items refuses them: [2.7] would delete id 2, a bool mask ids 0 and 1
        hit = torch.isin(self.item_ids, as_integers(ids, "ids").to(self.item_ids.device)) & self.alive
        self.alive &= ~hit
        return int(hit.sum())

    def rebuild(self, **overrides) -> RetrievalModel:
        """A new model over every live item (main and fresh), with an empty fresh index.
        `overrides`: build() options; the others carry over (bounds shrunk to fit the live items),
        and None asks for build()'s default (n_clusters about sqrt(live items), nprobe min(8, n_clusters))."""
        live = self.alive.nonzero().squeeze(1)
        counts = self.attr_counts[live].cpu()
        attributes = _unpad_jagged(self.attr_feature_ids[live].cpu(), self.attr_values[live].cpu(), counts)
        options = {"n_clusters": self.centroids.shape[0], "nprobe": self.nprobe, "max_nprobe": self.max_nprobe,
                   "k_candidates": self.k_candidates, "num_results": self.num_results, "fresh_capacity": self.fresh_capacity,
                   "bloom_k": self.bloom_k, "bloom_multiplier": self.bloom_multiplier, "max_attributes": self.attr_terms.shape[1],
                   "max_ops": self.max_ops, "max_terms": self.max_terms, "exact_verify": self.exact_verify,
                   "max_exact_terms": self.max_exact_terms}
        if live.numel() == 0:
            raise ValueError("rebuild: every item is deleted; a model needs at least one live item")
        # the carried-over bounds shrink to fit fewer live items (after deletions) and the
        # overrides; an explicit override is passed on as given, so build() refuses it by name
        # instead of its being capped silently (rebuild(num_results=50) with 16 candidates)
        def carried(name, value):
            if name in overrides:
                return overrides[name]
            options[name] = value
            return value

        # None asks for build()'s default; resolved here, as the bounds below derive from it
        if "n_clusters" in overrides and overrides["n_clusters"] is None:
            overrides["n_clusters"] = _default_clusters(live.numel())
        n_clusters = carried("n_clusters", min(options["n_clusters"], live.numel()))
        k_candidates = carried("k_candidates", min(options["k_candidates"], live.numel()))
        carried("num_results", min(options["num_results"], k_candidates))
        if "nprobe" in overrides and overrides["nprobe"] is None:
            overrides["nprobe"] = min(DEFAULT_NPROBE, n_clusters)
        nprobe = carried("nprobe", min(options["nprobe"], n_clusters))
        carried("max_nprobe", min(max(options["max_nprobe"], nprobe), n_clusters))
        options.update(overrides)
        # the candidates also have to fit max_nprobe x the largest new cluster (+ the fresh capacity),
        # which only the build knows: after many deletions without fresh capacity rebuild() failed
        options["_fit"] = tuple(name for name in ("k_candidates", "num_results") if name not in overrides)
        dense = self.item_dense[live].cpu() if hasattr(self, "item_dense") else None
        # build() makes its tensors on the CPU; the towers are shared and stay where they are
        return RetrievalModel.build(self.user_tower, self.overarch, self.value_model, self.item_embeddings[live].float().cpu(),
                                    self.item_ids[live].cpu(), attributes, self._filter_schema, item_dense=dense,
                                    **options).to(self.codes.device)

    # -- artifact ----------------------------------------------------------------------------------
    def config(self) -> dict:
        tower = type(self.user_tower).__name__
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "silvertorch_version": __version__,
            "dim": self.dim, "num_main": self.num_main, "fresh_capacity": self.fresh_capacity, "fresh_used": self.fresh_used,
            "nprobe": self.nprobe, "max_nprobe": self.max_nprobe, "k_candidates": self.k_candidates, "num_results": self.num_results,
            "bloom_k": self.bloom_k, "bloom_multiplier": self.bloom_multiplier, "schema": self.schema,
            "max_ops": self.max_ops, "max_terms": self.max_terms, "exact_verify": self.exact_verify,
            "max_exact_terms": self.max_exact_terms,
            "user_tower": {"type": tower if tower in TOWERS else "custom",
                           "config": self.user_tower.config() if tower in TOWERS else None,
                           "input": getattr(self.user_tower, "input_spec", None)},
            "overarch": self.overarch.config(), "value_model": self.value_model.config(),
        }

    def package(self, path, user_features: torch.Tensor, filters: list[str] | None = None, max_batch: int = 1024) -> Path:
        """Compile the forward ahead of time into one AOTInductor package (a `.pt2` file): the graph
        and this model's tensors, compiled to C++ on the CPU (Triton on a GPU). It runs without
        Python code of ours: `torch._inductor.aoti_load_package(path)` in Python (torch alone),
        or `torch::inductor::AOTIModelPackageLoader` in C++, called as
        `runner(user_features, *model.prepare_filters(filters))` for 1 to `max_batch` users and
        returning forward's (ids, scores, task_probs, fresh, found) with the Value Model's fixed
        weights. `user_features` and `filters`: an example batch to trace with.

        The custom ops are traced through their references (`gpukernels_common.inline_references`),
        so Inductor compiles their tensor ops in place of the hand-written kernels. The package is a
        snapshot: items added or deleted afterwards are not in it. Needs a C++ compiler on the CPU."""
        from gpukernels_common import inline_references

        if (reason := aoti_unsupported()) is not None:
            raise RuntimeError(reason)
        path = Path(path)
        if path.suffix != ".pt2":
            raise ValueError(f"path must end in .pt2 (an AOTInductor package), got {str(path)!r}")
        if not isinstance(max_batch, int) or max_batch < 2:
            raise ValueError(f"max_batch must be an int >= 2, got {max_batch!r}")
        # checked as retrieve() checks them: an out-of-range id would be traced, and the compile take minutes
        user_features = self.check_user_features(user_features).to(self.codes.device)
        if not user_features.shape[0] <= max_batch:
            raise ValueError(f"user_features must be an example batch [1..max_batch={max_batch}, ...], got "
                             f"{tuple(user_features.shape)}")
        q = user_features.shape[0]
        filters = [""] * q if filters is None else list(filters)
        if len(filters) != q:
            raise ValueError(f"filters must be a list of {q} expressions (one per user), got {len(filters)}")
        if q == 1:  # a batch dimension traced at size 1 would be specialised to 1
            user_features, filters = torch.cat([user_features, user_features]), filters * 2
        # contiguous: the compiled code assumes the example's strides (an expanded batch would read row 0 only)
        inputs = (user_features.contiguous(), *self.prepare_filters(filters))
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        with torch.no_grad(), inline_references():
            program = torch.export.export(self, inputs, dynamic_shapes=tuple({0: batch} for _ in inputs))
        path.parent.mkdir(parents=True, exist_ok=True)
        return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(path)))

    def capture(self, user_features: torch.Tensor, batch_sizes=None) -> CapturedRetrieval:
        """The forward recorded as CUDA graphs (`gpukernels_common.graphs.GraphedCall`), one per
        batch size in `batch_sizes` (an int or a sequence; default: the example's batch size): a
        call replays every kernel with one launch, where an eager forward launches each (about
        540; the forward is bound by that host work at small batches). A batch of q users runs
        the smallest captured size >= q, padded; the graphs share one memory pool (they never replay
        at once). `user_features`: an example batch (its dtype and width; any values the tower
        accepts). The graphs hold this model's tensors as they are:
        items added or deleted afterwards are seen (same tensors), a rebuild or `.to()` needs a
        new capture. The Value Model's fixed weights only. Needs a CUDA device."""
        if self.codes.device.type != "cuda":
            raise RuntimeError(f"capture needs the model on a CUDA device (CUDA graphs), it is on {self.codes.device}")
        user_features = self.check_user_features(user_features).to(self.codes.device)
        sizes = [user_features.shape[0]] if batch_sizes is None else [batch_sizes] if isinstance(batch_sizes, int) else list(batch_sizes)
        if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
            raise ValueError(f"batch_sizes must be an int >= 1 or a non-empty sequence of them, got {batch_sizes!r}")
        graphs, pool = {}, torch.cuda.graph_pool_handle()  # one pool: the sizes never replay at once, so they share their intermediates
        with torch.no_grad():
            for size in sorted(set(sizes), reverse=True):  # the largest first: the smaller captures reuse its memory
                graphs[size] = GraphedCall(self, padded_batch(user_features[:size], size), *self.prepare_filters([""] * size),
                                           pool=pool)
        return CapturedRetrieval(self, graphs)

    def save(self, directory) -> Path:
        """Write config.json (format version, shapes) and model.safetensors (every tensor); no pickle."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        config = self.config()
        config["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()}
        text = json.dumps(config, indent=1)  # before any file is written: a config that cannot be written leaves no half artifact
        save_file(tensors, str(directory / TENSORS_FILE), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        (directory / CONFIG_FILE).write_text(text)
        return directory

    @classmethod
    def load(cls, directory, user_tower: nn.Module | None = None, device="cpu") -> RetrievalModel:
        """Load an artifact; versions and every tensor's shape and dtype are checked first."""
        from safetensors import SafetensorError, safe_open

        directory = Path(directory)
        config = _checked_config(directory, CONFIG_FILE, FORMAT, FORMAT_VERSION, OLD_VERSIONS)
        try:
            with safe_open(str(directory / TENSORS_FILE), framework="pt", device=str(device)) as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{directory}: {TENSORS_FILE} is not readable ({err})") from err
        expected = config.get("tensors")
        if not isinstance(expected, dict):
            raise ValueError(f"{directory}: {CONFIG_FILE} has no tensor table ('tensors')")
        if set(expected) != set(tensors):
            raise ValueError(f"{directory}: tensors differ from the config: missing {sorted(set(expected) - set(tensors))[:5]}, "
                             f"unexpected {sorted(set(tensors) - set(expected))[:5]}")
        for name, spec in expected.items():
            t = tensors[name]
            spec = spec if isinstance(spec, dict) else {}  # an entry that is no object: refused below, not a TypeError
            if list(t.shape) != spec.get("shape") or str(t.dtype).removeprefix("torch.") != spec.get("dtype"):
                raise ValueError(f"{directory}: tensor {name} is {str(t.dtype)} {list(t.shape)}, the config says "
                                 f"{spec.get('dtype')} {spec.get('shape')}")
        check_weights(tensors, f"{directory}: {TENSORS_FILE}: ")
        try:
            model = cls._from_config(directory, config, tensors, user_tower).to(device).eval()
        except (KeyError, TypeError, AttributeError) as err:  # a hand-edited or truncated config
            raise ValueError(f"{directory}: {CONFIG_FILE} is missing an entry or has one of the wrong type "
                             f"({type(err).__name__}: {err})") from err
        if (problem := model._bloom_disagreement()) is not None:
            raise ValueError(f"{directory}: the Bloom index does not match the items' attributes: {problem}")
        return model

    def _bloom_disagreement(self) -> str | None:
        """`bloom_disagreement` on the main items (the fresh ones are verified exactly, outside the Bloom index)."""
        counts = self.attr_counts[: self.num_main]
        present = torch.arange(self.attr_terms.shape[1], device=counts.device) < counts.unsqueeze(1)
        items = torch.arange(self.num_main, device=counts.device).unsqueeze(1).expand_as(present)[present]
        return bloom_disagreement(self.bloom_bits, self.bloom_row_offsets, self.bloom_widths, counts, items,
                                  self.attr_terms[: self.num_main][present], self.bloom_k, self.bloom_multiplier)

    @classmethod
    def _from_config(cls, directory, config: dict, tensors: dict, user_tower: nn.Module | None) -> RetrievalModel:
        tower_spec = config["user_tower"]
        # the modules are made on the meta device and take the file's tensors as their weights: a
        # config that disagrees with the weights (say a tampered table size) fails on the shapes
        # without allocating what the config claims
        made_tower = user_tower is None
        with torch.device("meta"):
            if made_tower:
                if tower_spec["type"] not in TOWERS:
                    raise ValueError(f"{directory}: the user tower is a custom module; pass user_tower= a module of the same architecture")
                user_tower = _from_entry(directory, CONFIG_FILE, "user_tower", TOWERS[tower_spec["type"]], tower_spec["config"])
            overarch = _from_entry(directory, CONFIG_FILE, "overarch", OverArch, config["overarch"])
        value_model = _from_entry(directory, CONFIG_FILE, "value_model", ValueModel, config["value_model"])  # small; load checked its weights
        modules = {"user_tower": user_tower, "overarch": overarch, "value_model": value_model}
        for prefix, module in modules.items():
            state = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            try:
                # assign: the modules made here take the file's tensors as they are, dtype included (a bf16
                # OverArch or Value Model stays bf16); a tower passed in keeps its own parameters
                module.load_state_dict(state, strict=True, assign=prefix != "user_tower" or made_tower)
            except RuntimeError as err:
                raise ValueError(f"{directory}: the {prefix} weights do not fit the module: {err}") from err
        buffers = {k: v for k, v in tensors.items() if k.split(".")[0] not in modules}
        return cls(user_tower, overarch, value_model, buffers, nprobe=config["nprobe"], k_candidates=config["k_candidates"],
                   num_results=config["num_results"], bloom_k=config["bloom_k"], bloom_multiplier=config["bloom_multiplier"],
                   # as saved: an artifact from before the schema checks loads and answers as it did (with a warning)
                   schema=FilterSchema._saved(config["schema"], f"{directory}: {CONFIG_FILE}"), max_ops=config["max_ops"], max_terms=config["max_terms"],
                   exact_verify=config["exact_verify"], fresh_used=config["fresh_used"],
                   # absent in artifacts written before adaptive probing / the exact-term bound
                   max_nprobe=config.get("max_nprobe"), max_exact_terms=config.get("max_exact_terms", config["max_terms"]))


def _checked_config(directory: Path, config_file: str, expected_format: str, supported_version: int,
                    old_versions: dict[int, str] | None = None) -> dict:
    """directory/config_file read as a JSON object of `expected_format` at `supported_version`; the
    one check of every saved directory (an artifact, saved towers), so that all refuse alike.
    `old_versions`: what to do with a file of an older version this one cannot convert."""
    try:
        config = json.loads((directory / config_file).read_text())
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise ValueError(f"{directory}: no readable {config_file} ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{directory}: {config_file} must hold a JSON object, got {type(config).__name__}")
    if config.get("format") != expected_format:
        raise ValueError(f"{directory}: {config_file} has format {config.get('format')!r}, expected {expected_format!r}")
    version = config.get("format_version")
    if type(version) is not int or version != supported_version:  # 1.0, "1" and True are not version 1
        known = (old_versions or {}).get(version) if type(version) is int else None  # (a list is unhashable)
        raise ValueError(f"{directory}: {config_file}: format version {version!r} ({type(version).__name__}) is not "
                         f"supported by silvertorch {__version__}, which reads {expected_format} version "
                         f"{supported_version} (an int); {known or 'save it again with this version'}")
    return config


def _from_entry(directory, config_file: str, entry: str, make, options: dict):
    """make(**options) from `entry` of the directory's `config_file`, its refusal of an edited value named so."""
    try:
        return make(**options)
    except (ValueError, RuntimeError) as err:  # RuntimeError: what torch says of a size it cannot make
        raise ValueError(f"{directory}: {config_file} entry {entry!r} is not valid ({err})") from err


class CapturedRetrieval:
    """A RetrievalModel's forward as CUDA graphs, one per captured batch size
    (`RetrievalModel.capture`): called like the model, `captured(user_features, ops, args,
    hashes)`, or like `retrieve`, `captured.retrieve(user_features, filters)`, for 1 to
    `batch_size` (the largest captured) users. A batch runs the smallest captured size that
    holds it, padded with copies of its last user (and plan), and the outputs are cut back.
    `graphs`: {batch size: a callable replaying the forward for exactly that many users}."""

    def __init__(self, model: RetrievalModel, graphs: dict):
        self.model, self.graphs = model, dict(graphs)
        self.batch_sizes = sorted(self.graphs)
        self.batch_size = self.batch_sizes[-1]

    def __call__(self, user_features, ops, args, hashes):
        q = user_features.shape[0]
        if not 1 <= q <= self.batch_size:
            raise ValueError(f"user_features must hold 1 to batch_size={self.batch_size} users (as captured), got {q}")
        for name, t in (("ops", ops), ("args", args), ("hashes", hashes)):
            if t.shape[0] != q:
                raise ValueError(f"{name} must have one row per user ({q}), got {tuple(t.shape)}")
        size = next(b for b in self.batch_sizes if b >= q)
        device = self.model.codes.device
        inputs = [padded_batch(t.to(device), size) for t in (user_features, ops, args, hashes)]
        return tuple(t[:q] for t in self.graphs[size](*inputs))

    def retrieve(self, user_features, filters: list[str] | None = None) -> Retrieved:
        """As `RetrievalModel.retrieve` (checks, filters compiled), through the graph."""
        user_features, filters = self.model._checked_request(user_features, filters)
        return Retrieved(*self(user_features, *self.model.prepare_filters(filters)))

