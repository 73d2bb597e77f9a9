"""A loaded engine: one callable with the same signature for every backend.

    engine(x, y=None, low_res=None, probes=None, noise=None, progress=None)
        -> EngineResult(x, log_prob, bits_per_dim, nfe)

x is the noise x0 (sampling engines) or the data x1 (likelihood engines), any number N >= 1 of rows;
probes have shape (k, N, *shape). The engine's batch is static, so rows run in ``calls(N)`` chunks of
that batch (``progress(1)`` after each) and the last chunk is padded by repeating its last row (rows are
independent). Loading checks the manifest against the engine file's own stamp of what it computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from fastfm.run.checkpoint import inference_file

from . import manifest
from .backends import Runner, backend
from .quiet import quiet
from .spec import ExportError


@dataclass
class EngineResult:
    """x(1) for sampling, the latent x(0) for likelihoods; log p_1 in nats and bits/dim where computed."""

    x: Tensor
    log_prob: Tensor | None
    bits_per_dim: Tensor | None
    nfe: int


def _pad(t: Tensor, dim: int, size: int) -> Tensor:
    """``t`` padded along ``dim`` to ``size`` by repeating its last slice."""
    m = t.shape[dim]
    if m == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - m
    return torch.cat([t, t.narrow(dim, m - 1, 1).expand(shape)], dim)


class Engine:
    """An engine directory loaded on the device it was built for (see :func:`load`)."""

    def __init__(self, directory: Path, info: manifest.Manifest, runner: Runner) -> None:
        self.directory, self.info, self._run = directory, info, runner
        self.spec, self.meta, self.device = info.spec, info.meta, info.device
        self.batch, self.nfe = info.spec.batch, info.nfe
        self.input_names = [i.name for i in info.inputs]
        self._row_dims = [1 if name in ("probes", "noise") else 0 for name in self.input_names]
        self._outputs = [o.name for o in info.outputs]

    def _prepare(self, x: Tensor, given: dict[str, Tensor | None]) -> list[Tensor]:
        """Check names and per-row shapes against the manifest; tensors on the engine device, in order."""
        unexpected = [k for k, v in given.items() if v is not None and k not in self.input_names]
        if unexpected:
            raise ExportError(f"this engine takes no {', '.join(unexpected)} (its inputs: {self.input_names})")
        rows = None
        out = []
        for spec, dim, t in zip(self.info.inputs, self._row_dims, [x, *map(given.get, self.input_names[1:])]):
            if t is None:
                raise ExportError(f"this engine needs {spec.name!r} (shape {spec.shape}, {spec.dtype})")
            try:
                spec.check_rows(tuple(t.shape), dim, rows)
            except ValueError as e:
                raise ExportError(str(e)) from None
            rows = t.shape[dim]  # every input has the rows of x
            self._check_values(spec.name, t, spec.torch_dtype)
            out.append(t.to(self.device, spec.torch_dtype).contiguous())
        return out

    def _check_values(self, name: str, t: Tensor, dtype: torch.dtype) -> None:
        """Floating inputs finite; labels integers in 0..C-1 (an engine indexes its class embedding unchecked)."""
        if dtype.is_floating_point:
            if t.is_complex():
                raise ExportError(f"{name!r} must be a real tensor, got {t.dtype}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ExportError(f"{name!r} contains NaN or Inf")
            return
        classes = self.meta.num_classes
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ExportError(f"{name!r} must hold integer class labels, got {t.dtype}")
        lo, hi = int(t.min()), int(t.max())
        if classes is not None and (lo < 0 or hi >= classes):
            raise ExportError(f"{name!r} must hold class labels in 0..{classes - 1}, got values in {lo}..{hi}")

    def calls(self, rows: int) -> int:
        """Engine calls that ``rows`` rows take (chunks of the static batch)."""
        return -(-rows // self.batch)

    def __call__(self, x: Tensor, y: Tensor | None = None, low_res: Tensor | None = None,
                 probes: Tensor | None = None, noise: Tensor | None = None,
                 progress: Callable[[int], Any] | None = None) -> EngineResult:
        inputs = self._prepare(x, {"y": y, "low_res": low_res, "probes": probes, "noise": noise})
        n, b = x.shape[0], self.batch
        done = progress or (lambda calls: None)
        if n == b:  # one call, no copies
            outputs = self._run(inputs)
            done(1)
        else:
            chunks = []
            for start in range(0, n, b):
                m = min(b, n - start)
                # contiguous: a slice along dim 1 (probes, noise) is a strided view, and the compiled
                # runners read their inputs as dense buffers
                call = [_pad(t.narrow(d, start, m), d, b).contiguous() for t, d in zip(inputs, self._row_dims)]
                chunks.append([o[:m] for o in self._run(call)])
                done(1)
            outputs = [torch.cat(parts) for parts in zip(*chunks)]
        values = dict(zip(self._outputs, outputs))
        return EngineResult(values["x"], values.get("log_prob"), values.get("bits_per_dim"), self.nfe)


def load(directory: str | Path, checkpoint: str | Path | None = None) -> Engine:
    """Load an engine directory written by ``python -m fastfm.export``; with ``checkpoint``, also check
    that the engine was built from those weights. Raises ManifestError (an ExportError) otherwise."""
    directory = Path(directory)
    info = manifest.read(directory)
    if checkpoint is not None:
        weights = inference_file(checkpoint)
        if not weights.is_file():
            raise ExportError(f"no checkpoint at {weights}")
        got = manifest.sha256(weights)
        if got != info.checkpoint_sha256:
            raise manifest.ManifestError(f"engine {directory} was built from other weights than {checkpoint} "
                                         f"(sha256 {info.checkpoint_sha256[:12]}..., checkpoint {got[:12]}...)")
    with quiet():
        loaded = backend(info.spec.backend).load(info.engine_file, info.inputs, info.outputs, info.device)
    manifest.check_stamp(info, loaded.stamp)
    return Engine(directory, info, loaded.run)
