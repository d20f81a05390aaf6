"""Running the model on fake tensors (torch's FakeTensorMode: shapes and dtypes, no memory), as `wam plan`
traces a training step and the policy server traces its batched forward."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# The devices layout constants can be computed on for real: the CPU, and the GPU where one exists.
_REAL_DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


class LayoutConstants(TorchDispatchMode):
    """Index tensors the model derives from its token layout (which token is in which span, the mask's
    metadata) are computed for real, as small CPU tensors: their sizes depend on their values
    (repeat_interleave, nonzero), which fake tensors do not have. Everything touching model data stays fake."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._constant(func, args, kwargs):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def _constant(func, args, kwargs) -> bool:
        tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        device = kwargs.get("device")
        if (any(isinstance(t, FakeTensor) for t in tensors) or func.namespace in ("c10d", "_c10d_functional")
                or (device is not None and torch.device(device).type not in _REAL_DEVICES)
                or any(t.device.type not in _REAL_DEVICES for t in tensors)):
            return False
        if tensors:
            return all(not t.is_floating_point() for t in tensors) or sum(t.numel() for t in tensors) < 1 << 16
        if not any(a.name == "device" for a in func._schema.arguments):
            return False
        with unset_fake_temporarily():
            out = func(*args, **{**kwargs, "device": "meta"})
        return isinstance(out, torch.Tensor) and not out.is_floating_point() and out.numel() < 1 << 26
