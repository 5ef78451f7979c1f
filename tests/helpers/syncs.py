"""Count host reads of tensors on the CPU: what would be a host-device sync on a GPU.

    with HostReads() as reads:
        runner.run(own_loss, [(x,)], step)
    assert not reads.sites, reads.report()

While active, `Tensor.item`, `tolist`, `cpu`, `numpy`, `__bool__` (`if t:`, `assert t`), `__int__`,
`__float__`, `__index__` and `__format__` count once per call, and so do the aten ops whose output
size depends on the data (nonzero, boolean-mask indexing, unique, bincount, ...: CUDA reads the size
back), and `torch.tensor(..., device=...)` (a host-to-device copy that CUDA makes synchronous). Each read records the innermost tokenmill frame that made it ("pipeline/training/loop.py:145
step_metrics"), so a failure names the line. Shapes are not reads: `t.shape[0]` stays uncounted.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tokenmill.models

ROOT = str(Path(tokenmill.models.__file__).resolve().parent.parent)  # the checkout: models/, pipeline/ ...
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "__format__",
         "new_tensor")  # new_tensor: a copy from host memory onto the tensor's device (CUDA waits for it)
# aten ops whose output shape is data-dependent: on CUDA they copy a size back to the host.
SIZE_READING_OPS = ("nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim", "bincount",
                    "unique_consecutive", "repeat_interleave", "histc", "_local_scalar_dense")


def _site() -> str:
    """The innermost frame in tokenmill's own code (not torch, not this file, not the test)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = str(Path(frame.filename).resolve())
        if path.startswith(ROOT) and "/tests/" not in path and "/.venv/" not in path:
            return f"{Path(path).relative_to(ROOT)}:{frame.lineno} {frame.name}: {frame.line}"
    return "outside tokenmill: " + "".join(traceback.format_stack(limit=6)[:-2])


class _SizeReads(TorchDispatchMode):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        # _local_scalar_dense is what item()/bool() call: counted once, at the Python method.
        if name in SIZE_READING_OPS and not (name == "_local_scalar_dense" and self.record.inside):
            self.record(f"aten.{name}")
        if name == "index" and any(t is not None and t.dtype == torch.bool for t in args[1]):
            self.record("aten.index with a boolean mask")
        return func(*args, **(kwargs or {}))


class HostReads:
    def __init__(self) -> None:
        self.sites: list[str] = []
        self.inside = 0  # depth of patched methods being run: nested reads count once
        self._saved: dict[str, object] = {}

    def __call__(self, what: str) -> None:
        self.sites.append(f"{what} at {_site()}")

    def _wrap(self, name: str, original):
        counter = self

        def read(tensor, *args, **kwargs):
            if not counter.inside:
                counter(f"Tensor.{name}")
            counter.inside += 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                counter.inside -= 1

        return read

    def __enter__(self) -> HostReads:
        for name in READS:
            self._saved[name] = torch.Tensor.__dict__.get(name)  # None: inherited from TensorBase
            setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        self._saved_tensor = torch.tensor
        torch.tensor = self._tensor_to_device
        self._mode = _SizeReads(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        torch.tensor = self._saved_tensor
        for name, original in self._saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)

    def _tensor_to_device(self, data, *args, **kwargs):
        if kwargs.get("device") is not None:
            self("torch.tensor(..., device=...)")
        return self._saved_tensor(data, *args, **kwargs)

    def report(self) -> str:
        return f"{len(self.sites)} host read(s):\n  " + "\n  ".join(self.sites)
