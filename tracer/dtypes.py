"""The floating-point types, declared once: their names, their bytes per element, and which of
them the runtime computes in.

The bottom layer: nothing here imports torch until a torch dtype is asked for, so that config.json's
arithmetic ("7B x 2 bytes = 14 GB") needs no torch. Everything that names a dtype takes the name
from here: the config's ``torch_dtype`` check, the memory table, ``tracer.load(dtype=...)``, the
CLI's ``--dtype`` choices and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    """One floating-point type: its name (torch's and config.json's), bytes per element, and
    whether the runtime computes in it (float64 is only counted: a config may name it)."""

    name: str
    bytes: int
    computes: bool

    def as_torch(self) -> torch.dtype:
        """The torch dtype of this name (torch imported here, on first use)."""
        import torch

        return getattr(torch, self.name)


FLOAT32 = DType("float32", 4, computes=True)
FLOAT16 = DType("float16", 2, computes=True)
BFLOAT16 = DType("bfloat16", 2, computes=True)
FLOAT64 = DType("float64", 8, computes=False)

ALL = (FLOAT32, FLOAT16, BFLOAT16, FLOAT64)
BY_NAME = {d.name: d for d in ALL}
# The dtypes a model can be loaded and run in, the reference first (tracer.load(dtype=...), --dtype).
RUNTIME = tuple(d.name for d in ALL if d.computes)
AUTO = "auto"  # tracer.load's and the CLI's default: the rule in tracer.api.pick_dtype


def name_of(dtype: object) -> str:
    """The name of a dtype given by name or as a torch dtype (``torch.float16`` -> "float16")."""
    return str(dtype).replace("torch.", "")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a runtime dtype's name ("bfloat16" -> ``torch.bfloat16``)."""
    return BY_NAME[name].as_torch()
