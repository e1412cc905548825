"""A second device on a CPU-only machine, with real values, that refuses to mix with the CPU as CUDA does.

Neither ``FakeTensorMode`` nor the meta device can run the search: they carry no values, so
the first data-dependent step (routing, ``argmin``, ``.item()``) stops them; and a fake CUDA
tensor cannot even be indexed without CUDA (PyTorch has no CUDA device guard then). Here
every tensor "on the device" is a wrapper that reports ``device='meta'`` and holds a real CPU
tensor; a dispatch mode runs each op on the held tensors and applies PyTorch's device rule
(the one CUDA enforces): the tensor arguments of an op must all be on one device, except
0-dim CPU tensors (scalars), indices of indexing ops, and the copies that move data. So code
that builds a tensor on the CPU and combines it with device tensors raises here as on a GPU,
and code that is right computes the same values as on the CPU.

``torch.tensor(data, device=...)``, ``torch.as_tensor`` and indexing with a Python list build
a tensor without the dispatcher; inside the mode they build it on the CPU and move it, or
index with the CPU tensor (what they amount to on a GPU). Any other tensor that reaches an op on the real meta device, without
values, is an error rather than silent garbage.

Device -> host transfers (copies to the CPU, ``.item()``/``float()``/``int()`` of device
tensors) are counted in :attr:`PretendDevice.to_host`.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

DEVICE = torch.device("meta")
aten = torch.ops.aten
_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


class OnDevice(torch.Tensor):
    """A tensor on the pretend device: reports ``DEVICE``, holds a real CPU tensor in ``held``."""

    @staticmethod
    def __new__(cls, held: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, held.shape, strides=held.stride(), dtype=held.dtype,
                                                   device=DEVICE, storage_offset=held.storage_offset(),
                                                   requires_grad=held.requires_grad)

    def __init__(self, held: torch.Tensor):
        self.held = held

    __torch_function__ = torch._C._disabled_torch_function_impl

    # indexing with a Python list makes the index tensor outside the dispatcher: hand it over as a CPU tensor
    def __getitem__(self, index):
        return super().__getitem__(_lists_as_tensors(index))

    def __setitem__(self, index, value):
        return super().__setitem__(_lists_as_tensors(index), value)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a pretend-device tensor outside PretendDevice()")


def _lists_as_tensors(index):
    if isinstance(index, list):
        return torch.tensor(index)
    if isinstance(index, tuple):
        return tuple(torch.tensor(i) if isinstance(i, list) else i for i in index)
    return index


def _is_device(value) -> bool:
    return value is not None and torch.device(value) == DEVICE


class PretendDevice(TorchDispatchMode):
    """Inside ``with PretendDevice():`` tensors created with ``device=DEVICE`` and moved there are
    :class:`OnDevice`; mixing them with CPU tensors raises as CUDA would."""

    def __init__(self):
        super().__init__()
        self.to_host = 0
        self._factories = {}

    def __enter__(self):
        for name in ("tensor", "as_tensor"):
            made = self._factories[name] = getattr(torch, name)
            setattr(torch, name, _via_cpu(made))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, made in self._factories.items():
            setattr(torch, name, made)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = [t for t in tensors if isinstance(t, OnDevice)]
        if any(t.device == DEVICE and not isinstance(t, OnDevice) for t in tensors):
            raise RuntimeError(f"{func}: a tensor on {DEVICE} without values reached an op (made outside the dispatcher)")
        if func is aten.copy_.default:  # copy_(dst, src): the result is dst, wherever src is
            wrap = isinstance(args[0], OnDevice)
            self.to_host += isinstance(args[1], OnDevice) and not wrap
        elif func is aten._to_copy.default:
            wrap = _is_device(kwargs["device"]) if "device" in kwargs else isinstance(args[0], OnDevice)
            self.to_host += isinstance(args[0], OnDevice) and not wrap
        else:
            checked = tensors
            if func in _INDEXING:  # CPU index tensors are allowed with a device tensor
                checked = [args[0]] + [t for t in tree_leaves((args[2:], kwargs)) if isinstance(t, torch.Tensor)]
            cpu = [t for t in checked if not isinstance(t, OnDevice) and t.dim() > 0]
            if on_device and cpu:
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                                   f"{DEVICE} and cpu! ({func})")
            wrap = bool(on_device) or _is_device(kwargs.get("device"))
            if func is aten._local_scalar_dense.default and on_device:
                self.to_host += 1

        def unwrap(value):
            if isinstance(value, OnDevice):
                return value.held
            if isinstance(value, torch.device) and value == DEVICE:
                return torch.device("cpu")
            return value

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        held = {id(t.held): t for t in on_device}  # in-place ops return their (wrapped) argument

        def rewrap(value):
            if isinstance(value, torch.Tensor):
                if id(value) in held:
                    return held[id(value)]
                if wrap:
                    return OnDevice(value)
            return value

        return tree_map(rewrap, out)


def _via_cpu(factory):
    def make(data, *args, device=None, **kwargs):
        made = factory(data, *args, **kwargs)
        return made.to(DEVICE) if _is_device(device) else (made if device is None else made.to(device))

    return make


def to_pretend_device(model: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter and buffer of ``model`` to the pretend device (in place)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = torch.nn.Parameter(OnDevice(param.detach()), requires_grad=False)
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = OnDevice(buf)
    return model
