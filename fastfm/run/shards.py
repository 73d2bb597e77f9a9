"""Sharded checkpoints (``--fsdp``): ``torch.distributed.checkpoint`` (DCP) directories inside a run directory.

Every rank writes its own shards of the model, its EMA and the optimizer into ``shards/.step_NNNNNNN.partial``;
rank 0 renames the finished directory to a name of its own, ``shards/step_NNNNNNN-XXXXXXXX``, and names it, with
the sha256 of each of its files, in the checkpoint.pt that ``commit`` (fastfm.run.checkpoint) then commits. A kill
before that commit leaves the previous unit and its directory, which is removed only once a later unit is committed
(``drop_stale``).

Loading resolves the saved shards onto the model as it is now: FSDP over any number of ranks, or one process
(``dcp.load`` reshards). The DCP metadata file is a pickle: it is read by an unpickler that admits only DCP's own
metadata classes (``SafeReader``); tensors are read by ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from fastfm.run.checkpoint import CheckpointError, sha256

SHARDS = "shards"
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem", "pathlib")


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes, paths, and torch's sizes, dtypes and layouts; refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module in _METADATA_MODULES
                   or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
                   or (module, name) == ("torch.serialization", "_get_layout"))
        if not allowed:
            raise CheckpointError(f"unsafe sharded checkpoint metadata: it references {module}.{name}")
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """DCP's file-system reader with the metadata read by ``_MetadataUnpickler``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
                raise CheckpointError(f"corrupt sharded checkpoint metadata {path}: {e}") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"corrupt sharded checkpoint metadata {path}: not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def save(run_dir: str | Path, step: int, state: dict[str, Any], rank: int) -> Path:
    """All ranks: DCP-save ``state`` (sharded tensors) into ``shards/.step_N.partial`` of ``run_dir``. Returns the
    partial directory; rank 0 then calls ``publish``."""
    partial = Path(run_dir) / SHARDS / f".step_{step:07d}.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # a killed save's leftovers
    if dist.is_initialized():
        dist.barrier()  # before any rank writes into it
    dcp.save(state, storage_writer=dcp.FileSystemWriter(partial, sync_files=True))
    return partial


def publish(run_dir: str | Path, step: int, partial: Path) -> dict[str, Any]:
    """Rank 0, after every rank's ``save``: rename the partial directory into place; the record checkpoint.pt keeps
    ({"dir": relative path, "files": {name: sha256}})."""
    name = f"{SHARDS}/step_{step:07d}-{uuid.uuid4().hex[:8]}"  # never the committed unit's, even at its step
    final = Path(run_dir) / name
    partial.rename(final)
    return {"dir": name, "files": {f.name: sha256(f) for f in sorted(final.iterdir())}}


def verify(run_dir: str | Path, record: dict[str, Any]) -> str | None:
    """Why the shards a checkpoint names cannot be loaded (a missing directory or file, a digest that differs), or
    None."""
    where = Path(run_dir) / record["dir"]
    if not where.is_dir():
        return f"{where} is missing: the checkpoint's shards were removed"
    for name, digest in record["files"].items():
        if not (where / name).exists():
            return f"{where} is missing shard {name}"
        if sha256(where / name) != digest:
            return f"{where / name} does not match its sha256 in the checkpoint: edited or corrupted after it was " \
                   "written"
    return None


def load(run_dir: str | Path, record: dict[str, Any], state: dict[str, Any]) -> None:
    """Read the shards ``record`` names into ``state`` in place (its tensors, sharded or whole, say what each rank
    reads); a state that does not fit the saved one is a ``CheckpointError``."""
    where = Path(run_dir) / record["dir"]
    try:
        dcp.load(state, storage_reader=SafeReader(where), no_dist=not dist.is_initialized())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's is a BaseException wrapping a rank's
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CheckpointError(f"the shards in {where} do not fit this run's model or optimizer: "
                              f"{lines[-1] if lines else type(e).__name__}") from None


def read_whole(run_dir: str | Path, record: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of the shards ``record`` names, whole, in one process: {"model.NAME": ..., "ema.NAME": ...,
    "optimizer.state.NAME.exp_avg": ..., ...} (DCP's flattened keys)."""
    where = Path(run_dir) / record["dir"]
    metadata = SafeReader(where).read_metadata()
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items() if isinstance(meta, TensorStorageMetadata)}
    load(run_dir, record, state)
    return state


def drop_stale(run_dir: str | Path, keep: str | None) -> None:
    """Remove every shard directory of ``run_dir`` but ``keep`` (the committed unit's): older units and the
    partial directories of killed saves."""
    root = Path(run_dir) / SHARDS
    if not root.is_dir():
        return
    for d in root.iterdir():
        if f"{SHARDS}/{d.name}" != keep:
            shutil.rmtree(d, ignore_errors=True)
