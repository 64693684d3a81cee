"""A stand-in for a GPU on machines without one, for code that reads values (`.item()`,
`.tolist()`, a bool of a comparison) and so cannot run on the `meta` device.

`on_device(t)` is `t` with its values kept on the host but reporting the `meta` device; with
`device_factories()` active, tensors made or moved onto `meta` (`torch.zeros(..., device=x.device)`,
`t.to(x.device)`) are such tensors too. Operations mixing one with a plain (host) tensor of
one or more dimensions raise, as CUDA does ("Expected all tensors to be on the same device");
0-d host tensors and host index tensors (`x[cpu_indices]`) are allowed, as CUDA allows them.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

STAND_IN = torch.device("meta")

# CUDA takes host index tensors for these (the indices are copied over)
_HOST_INDICES_ALLOWED = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
                         torch.ops.aten._index_put_impl_.default}


class OnDevice(torch.Tensor):
    """Host values reporting the stand-in device (see the module's docs)."""

    @staticmethod
    def __new__(cls, host: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, host.shape, strides=host.stride(), dtype=host.dtype,
                                                   device=STAND_IN, requires_grad=host.requires_grad)

    def __init__(self, host: torch.Tensor):
        self.host = host

    def __repr__(self):
        return f"OnDevice({self.host!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        checked = (args[:1], kwargs) if func in _HOST_INDICES_ALLOWED else (args, kwargs)
        if func in _HOST_INDICES_ALLOWED and len(args) > 2:
            checked = (args[:1] + args[2:], kwargs)  # index_put's values must be on the device
        for t in tree_flatten(checked)[0]:
            if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) and t.dim() > 0:
                raise RuntimeError(f"{func}: Expected all tensors to be on the same device, but found a host tensor "
                                   f"of shape {tuple(t.shape)} beside device tensors")
        if any(isinstance(t, OnDevice) for t in tree_flatten(args[1:2])[0]) and not isinstance(args[0], OnDevice):
            raise RuntimeError(f"{func}: Expected all tensors to be on the same device: host tensor indexed by device indices")
        to_host = func is torch.ops.aten._to_copy.default and _is_host(kwargs.get("device"))
        args = tree_map(_host_of, args)
        kwargs = tree_map(_host_of, kwargs)
        if "device" in kwargs and _is_stand_in(kwargs["device"]):
            kwargs["device"] = torch.device("cpu")
        out = func(*args, **kwargs)
        return out if to_host else tree_map(_wrap, out)


def on_device(t: torch.Tensor) -> OnDevice:
    return t if isinstance(t, OnDevice) else OnDevice(t)


def _wrap(x):
    return on_device(x) if isinstance(x, torch.Tensor) else x


def _host_of(x):
    return x.host if isinstance(x, OnDevice) else x


def _is_stand_in(device) -> bool:
    return isinstance(device, (torch.device, str)) and torch.device(device).type == STAND_IN.type


def _is_host(device) -> bool:
    return isinstance(device, (torch.device, str)) and torch.device(device).type == "cpu"


class _FactoriesOnDevice(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist and isinstance(args[0], OnDevice):  # a copy to the host, as on a GPU
            return args[0].host.tolist()
        if any(isinstance(t, OnDevice) for t in tree_flatten((args, kwargs))[0]):
            return func(*args, **kwargs)  # the tensor's own dispatch handles it
        if _is_stand_in(kwargs.get("device")):  # a factory or as_tensor onto the device
            return tree_map(_wrap, func(*args, **{**kwargs, "device": "cpu"}))
        if func is torch.Tensor.to and any(_is_stand_in(a) for a in list(args[1:]) + list(kwargs.values())):
            return on_device(args[0])
        return func(*args, **kwargs)


@contextlib.contextmanager
def device_factories():
    """Within it, tensors made or moved onto the stand-in device hold values (see the module's docs)."""
    with _FactoriesOnDevice():
        yield
