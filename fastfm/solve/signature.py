"""The fixed input/output signature of a solve: named tensors with static shapes, in graph order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorSlot:
    """One engine input or output: name, static shape and dtype name ('float32', 'int64')."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "int64": torch.int64}[self.dtype]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    def check_rows(self, shape: tuple[int, ...], dim: int = 0, rows: int | None = None) -> None:
        """``shape`` is this slot's with at least one row along ``dim`` (exactly ``rows``, those of another input,
        if given); ValueError saying what is wrong otherwise."""
        ndim = len(self.shape)
        layout = "(" + ", ".join("rows" if i == dim else str(s) for i, s in enumerate(self.shape)) \
            + ("," if ndim == 1 else "") + ")"
        if len(shape) != ndim:
            raise ValueError(f"{self.name!r} must be {ndim}-D {layout}, got {len(shape)}-D {shape}")
        want = self.shape[:dim] + (shape[dim] if rows is None else rows,) + self.shape[dim + 1:]
        if shape[dim] == 0 and rows is None:
            raise ValueError(f"{self.name!r} has 0 rows, shape {shape}: need at least one row {layout}")
        if shape != want:
            raise ValueError(f"{self.name!r} must have shape {want} {layout}, got {shape}")

    @staticmethod
    def from_json(d: dict[str, Any]) -> TensorSlot:
        return TensorSlot(str(d["name"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))
