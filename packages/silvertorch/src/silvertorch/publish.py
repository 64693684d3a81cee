"""Publish: trained towers + an item table -> one RetrievalModel artifact directory.

    publish("artifact/", user_tower, overarch, value_model, item_tower=item_tower,
            item_features=features, item_ids=ids, attributes=(fids, offsets, values), schema=schema)

Item embeddings are evaluated by the item tower in batches (or given directly), clustered with
k-means++, quantized to int8, the attributes indexed into a Bloom index, and the model written
as config.json + model.safetensors. `progress=True` shows a bar per step (tqdm when installed).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .__about__ import __version__
from .bloom.parser import FilterSchema
from .model import (
    RetrievalModel,
    _checked_attributes,
    _checked_config,
    _checked_dense,
    _checked_item_ids,
    _from_entry,
    check_weights,
)
from .scoring import OverArch, ValueModel


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # a plain line per step when the [progress] extra is not installed
        print(f"silvertorch: {desc} ...", file=sys.stderr)
        return None
    return tqdm(total=total, desc=desc, unit="items", file=sys.stderr)


def item_embeddings_from_tower(item_tower: nn.Module, item_features: torch.Tensor, batch_size: int = 8192,
                               progress: bool = False) -> torch.Tensor:
    """Evaluate the item tower over the item table in batches, in eval mode (dropout off, batch norm
    on its running statistics: the index must hold what serving computes) and without autograd;
    the tower's training mode is restored afterwards."""
    n = item_features.shape[0]
    bar = _bar(n, "item embeddings", progress)
    out = []
    # each chunk goes to the tower's device (an item table is read onto the CPU, a trained tower may be on a GPU)
    held = next(itertools.chain(item_tower.parameters(), item_tower.buffers()), None)
    device = item_features.device if held is None else held.device
    was_training = item_tower.training
    item_tower.eval()
    try:
        with torch.no_grad():
            for chunk in item_features.split(batch_size):
                out.append(item_tower(chunk.to(device)).float().cpu())
                if bar:
                    bar.update(chunk.shape[0])
    finally:
        item_tower.train(was_training)
    if bar:
        bar.close()
    emb = torch.cat(out)
    if not torch.isfinite(emb).all():
        raise ValueError("the item tower produced NaN or inf embeddings")
    return emb


def publish(out_dir, user_tower: nn.Module, overarch: OverArch, value_model: ValueModel, *, item_embeddings=None,
            item_tower: nn.Module | None = None, item_features=None, item_ids=None, attributes=None, schema=None,
            progress: bool = False, **build_options) -> RetrievalModel:
    """Build the retrieval model from towers and an item table, write it to out_dir, return it."""
    if (item_embeddings is None) == (item_tower is None):
        raise ValueError("pass either item_embeddings or item_tower with item_features")
    # made first: an unwritable out_dir fails now, not after the build's work
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if item_tower is not None:
        if item_features is None:
            raise ValueError("item_tower needs item_features (one row per item)")
        item_embeddings = item_embeddings_from_tower(item_tower, torch.as_tensor(item_features), progress=progress)
    steps = ["clustering (k-means++) and int8 quantization", "Bloom index over item attributes", "assembling the model"]
    bar = _bar(len(steps), "publish", progress)

    def step(name):
        if bar:
            bar.set_postfix_str(name)
            bar.update(1)

    model = RetrievalModel.build(user_tower, overarch, value_model, item_embeddings, item_ids, attributes, schema,
                                 progress=step, **build_options)
    if bar:
        bar.close()
    model.save(Path(out_dir))
    return model


# -- the files `silvertorch build` reads: trained towers and an item table ----------------------
TOWERS_FORMAT, ITEMS_FORMAT = "silvertorch.Towers", "silvertorch.ItemTable"
TOWERS_FORMAT_VERSION = ITEMS_FORMAT_VERSION = 1
TOWERS_CONFIG_FILE = "towers.json"


def save_towers(directory, user_tower: nn.Module, overarch: OverArch, value_model: ValueModel) -> Path:
    """Write trained towers (a built-in user tower, OverArch, Value Model) as towers.json + towers.safetensors."""
    import json

    from safetensors.torch import save_file

    from .towers import TOWERS

    kind = type(user_tower).__name__
    if kind not in TOWERS:
        raise ValueError(f"save_towers writes built-in user towers ({', '.join(TOWERS)}); for {kind} call publish() from Python")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v.detach().contiguous().cpu() for name, m in
               (("user_tower", user_tower), ("overarch", overarch), ("value_model", value_model)) for k, v in m.state_dict().items()}
    config = {"format": TOWERS_FORMAT, "format_version": TOWERS_FORMAT_VERSION, "user_tower": {"type": kind, "config": user_tower.config()},
              "overarch": overarch.config(), "value_model": value_model.config()}
    text = json.dumps(config, indent=1)  # before any file is written
    save_file(tensors, str(directory / "towers.safetensors"))
    (directory / TOWERS_CONFIG_FILE).write_text(text)
    return directory


def load_towers(directory) -> tuple[nn.Module, OverArch, ValueModel]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .towers import TOWERS

    directory = Path(directory)
    config = _checked_config(directory, TOWERS_CONFIG_FILE, TOWERS_FORMAT, TOWERS_FORMAT_VERSION)
    try:
        tensors = load_file(str(directory / "towers.safetensors"))
    except (SafetensorError, OSError, ValueError) as err:  # SafetensorError: not a safetensors file (empty, cut short)
        raise ValueError(f"{directory}: no readable towers.safetensors ({err})") from err
    check_weights(tensors, f"{directory}: towers.safetensors: ")
    try:
        spec = config["user_tower"]
        if spec["type"] not in TOWERS:
            raise ValueError(f"{directory}: unknown user tower type {spec['type']!r}")
        modules = {"user_tower": _from_entry(directory, TOWERS_CONFIG_FILE, "user_tower", TOWERS[spec["type"]], spec["config"]),
                   "overarch": _from_entry(directory, TOWERS_CONFIG_FILE, "overarch", OverArch, config["overarch"]),
                   "value_model": _from_entry(directory, TOWERS_CONFIG_FILE, "value_model", ValueModel, config["value_model"])}
        for prefix, module in modules.items():
            # assign: the file's tensors as they are, dtype included (bf16 towers stay bf16, as RetrievalModel.load keeps them)
            module.load_state_dict({k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}, assign=True)
    except (KeyError, TypeError, RuntimeError) as err:  # a missing section, a changed config, mismatched tensors
        raise ValueError(f"{directory}: towers.json and towers.safetensors do not describe the towers "
                         f"({type(err).__name__}: {err})") from err
    return modules["user_tower"], modules["overarch"], modules["value_model"]


class ItemTable(NamedTuple):
    """What `load_item_table` returns: the arguments `publish` / `RetrievalModel.build` take."""

    embeddings: torch.Tensor  # [N, D]
    ids: torch.Tensor  # [N]
    attributes: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # jagged (feature_ids, offsets, values)
    schema: dict
    dense: torch.Tensor | None  # [N, F] dense item features for an OverArch with dense_dim=F, or None


def save_item_table(path, embeddings, ids, attributes, schema: dict | None = None, dense=None) -> Path:
    """Items for `silvertorch build`: embeddings [N, D], ids [N], jagged attributes (None: none),
    filter schema, and the dense item features [N, F] when the OverArch reads some (dense_dim=F).
    ids, attributes and dense are checked as `RetrievalModel.build` checks them (a fractional id
    or attribute value would be truncated on the way to int64)."""
    import json

    from safetensors.torch import save_file

    embeddings = torch.as_tensor(embeddings).float()
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [num_items, dim], got {tuple(embeddings.shape)}")
    n = embeddings.shape[0]
    fids, offsets, values = _checked_attributes(attributes, n)
    tensors = {"embeddings": embeddings, "ids": _checked_item_ids(ids, n),
               "attr_feature_ids": fids, "attr_offsets": offsets, "attr_values": values}
    if dense is not None:
        tensors["dense"] = _checked_dense(dense, n, None, "dense")
    # checked as the model checks it, numpy ids as ints
    schema = (schema if isinstance(schema, FilterSchema) else FilterSchema(dict(schema or {}))).features
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": ITEMS_FORMAT, "format_version": str(ITEMS_FORMAT_VERSION), "schema": json.dumps(schema)})
    return Path(path)


def load_item_table(path) -> ItemTable:
    import json

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta, t = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors item table ({err})") from err
    if meta.get("format") != ITEMS_FORMAT:
        raise ValueError(f"{path}: not a {ITEMS_FORMAT} file (format={meta.get('format')!r})")
    # a table from another version (say a later one) was read silently as this version's layout
    if meta.get("format_version") != str(ITEMS_FORMAT_VERSION):
        raise ValueError(f"{path}: {ITEMS_FORMAT} format version {meta.get('format_version')!r} is not supported by "
                         f"silvertorch {__version__}, which reads version {ITEMS_FORMAT_VERSION}; save it again with this version")
    missing = {"embeddings", "ids", "attr_feature_ids", "attr_offsets", "attr_values"} - set(t)
    if missing:
        raise ValueError(f"{path}: missing tensors {sorted(missing)}")
    return ItemTable(t["embeddings"], t["ids"], (t["attr_feature_ids"], t["attr_offsets"], t["attr_values"]),
                     json.loads(meta.get("schema", "{}")), t.get("dense"))
