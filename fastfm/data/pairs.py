"""Reflow data sets (``reflow:DIR``): couplings (x0, X_{0->1}(x0)) of a trained flow, as ``python -m fastfm.reflow``
(``fastfm.training.reflow``) writes them.

A directory holds

    reflow.json               the manifest, written before the first shard: the teacher (path, sha256 of its
                              model.json and ema.safetensors, its data set: name, args, seed, kind, levels), the solve
                              (solver, steps, NFE, engine), n, shard_size, seed, batch_size, shape, num_classes, and
                              ``shards``: the sha256 of each shard's file, null until it is written
    pairs-00000.safetensors   shard k: rows k S .. k S + m - 1 (S = shard_size): x0 and x1 float32 of shape
    pairs-00001.safetensors   (m, *shape), labels y int64 of shape (m,) for a class-conditional teacher
    ...

``PairDataset`` trains on the x1 rows, each with its own source point x0 (``paired``: the pairs are the coupling);
its test set is the teacher's data set's test split, so an evaluation compares the student with real data. The
x1 rows are continuous model-space points: never dequantised, though ``levels`` (the teacher data's) still sets the
bits/dim and the sample images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from fastfm.data.dataset import DataError, Dataset, FiniteDataset

MANIFEST = "reflow.json"
FORMAT = 1
"""The manifest's layout version (its ``format``)."""
FIELDS: dict[str, type | tuple[type, ...]] = {"format": int, "n": int, "shard_size": int, "shape": list,
                                               "num_classes": (int, type(None)), "data": dict, "shards": list}
"""The manifest fields a reader needs, with their JSON types."""


def shard_name(k: int) -> str:
    return f"pairs-{k:05d}.safetensors"


def shard_count(n: int, shard_size: int) -> int:
    """Shards of n rows: ceil(n / shard_size) (the last one holds the rest)."""
    return -(-n // shard_size)


def digest(data: bytes) -> str:
    """The sha256 of a shard's bytes, as the manifest records it."""
    return hashlib.sha256(data).hexdigest()


def read_manifest(directory: Path) -> dict[str, Any]:
    """``directory``'s reflow.json, checked for the fields a reader needs; DataError naming what is wrong."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"reflow:{directory}: no {MANIFEST}: not a reflow data set (python -m fastfm.reflow writes "
                        "one)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"corrupt {path}: {e}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"corrupt {path}: not a JSON object")
    for key, kind in FIELDS.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise DataError(f"corrupt {path}: field {key!r} missing or of the wrong type")
    data = manifest["data"]
    if not (isinstance(data.get("name"), str) and isinstance(data.get("args"), dict)
            and isinstance(data.get("seed"), int)):
        raise DataError(f"corrupt {path}: field 'data' lacks the teacher's data set (name, args, seed)")
    if manifest["format"] != FORMAT:
        raise DataError(f"{path}: format {manifest['format']}, this fastfm reads format {FORMAT}")
    if manifest["n"] < 1 or manifest["shard_size"] < 1 or \
            len(manifest["shards"]) != shard_count(manifest["n"], manifest["shard_size"]):
        raise DataError(f"corrupt {path}: {len(manifest['shards'])} shard digests for n {manifest['n']} in shards "
                        f"of {manifest['shard_size']}")
    return manifest


def read_shard(directory: Path, manifest: dict[str, Any], k: int) -> dict[str, torch.Tensor]:
    """Shard k's tensors (x0, x1 and y where the pairs have labels), checked against the manifest's sha256 and
    shapes; DataError for a shard never written, missing or corrupt."""
    path = directory / shard_name(k)
    want = manifest["shards"][k]
    if want is None:
        raise DataError(f"{path}: not written (the generation was interrupted): run python -m fastfm.reflow with the "
                        "same options again to finish it")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} is missing: {directory / MANIFEST} lists it") from None
    if digest(data) != want:
        raise DataError(f"{path} does not match its sha256 in {directory / MANIFEST}: the file was edited or "
                        "corrupted after it was written")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as e:
        raise DataError(f"corrupt shard {path}: {e}") from None
    m = min(manifest["shard_size"], manifest["n"] - k * manifest["shard_size"])
    want_shapes = {"x0": (m, *manifest["shape"]), "x1": (m, *manifest["shape"])}
    if manifest["num_classes"] is not None:
        want_shapes["y"] = (m,)
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    if got != want_shapes:
        raise DataError(f"{path}: holds {got}, {directory / MANIFEST} describes {want_shapes}")
    return tensors


@dataclass(kw_only=True, eq=False)
class PairDataset(FiniteDataset):
    """Pairs (x0, x1): ``train`` holds x1 (float32, never dequantised), ``source`` the x0 of the same rows; both are
    served in the epoch permutation ``FiniteDataset`` walks (its ``state_dict`` resumes them)."""

    source: torch.Tensor = field(repr=False)

    @property
    def paired(self) -> bool:
        return True

    def sample_pairs(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                        torch.Tensor | None]:
        idx = self._next_indices(n, generator)
        return self.source[idx], self.train[idx], None if self.train_labels is None else self.train_labels[idx]

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        _, x1, labels = self.sample_pairs(n, generator)
        return x1, labels


def pair_dataset(directory: str | Path, load: Callable[..., Dataset]) -> PairDataset:
    """The pairs in ``directory`` (every shard read and checked), with the test split of the teacher's data set,
    which ``load(name, seed=, **args)`` (``fastfm.data.get_dataset``) rebuilds from the manifest. DataError for a
    missing manifest or a shard not written, missing or corrupt."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    shards = [read_shard(directory, manifest, k) for k in range(len(manifest["shards"]))]
    data = manifest["data"]
    teacher = load(data["name"], seed=data["seed"], **data["args"])
    shape = tuple(manifest["shape"])
    if tuple(teacher.shape) != shape:
        raise DataError(f"reflow:{directory}: the pairs have shape {shape}, the teacher's data set {data['name']!r} "
                        f"{tuple(teacher.shape)}")
    rows = {key: torch.cat([s[key] for s in shards]) for key in shards[0]}
    return PairDataset(name=f"reflow:{directory}", shape=shape, kind=teacher.kind, test=teacher.test,
                       test_labels=teacher.test_labels if "y" in rows else None, num_classes=manifest["num_classes"],
                       levels=teacher.levels, train=rows["x1"], train_labels=rows.get("y"),
                       test_raw=getattr(teacher, "test_raw", None), source=rows["x0"])
