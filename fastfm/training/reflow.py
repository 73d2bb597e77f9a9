"""Reflow (Liu et al., 2022; 2-rectified flow++, Lee et al., 2024): the couplings (x0, X_{0->1}(x0)) of a trained
flow, the teacher, written as the shards of a ``reflow:DIR`` data set (``fastfm.data.pairs`` gives the layout). A
flow trained on them has straighter paths, so few Euler steps suffice.

Shard k holds rows r = k S .. k S + m - 1 (S = shard_size). Its chunks j of at most ``batch_size`` rows are one
``Sampler.sample`` call each, with seed derive(seed, REFLOW, k, j) (``fastfm.seeding``); the eager sampler and an
engine draw a call's prior points x0 in one ``SolvePlan.draw`` from that seed's sampling stream, which draws them
again here to record them. Row r's label (class-conditional teachers) is r mod C, or an engine's baked class. A
shard is thus a function of the teacher, the solve, batch_size, seed and k alone (bitwise on one device).

Resuming: the manifest is written first and names each shard's sha256 once the shard's file is in place (each
file written atomically); run again with the same request, the shards whose files match are kept, the others
(never written, torn by a kill, edited) generated, so the result is that of an uninterrupted run. A different
request into the same directory is an error naming the fields, unless ``force`` (replace).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor
from tqdm import tqdm

import fastfm
from fastfm import seeding
from fastfm.data.pairs import FORMAT, MANIFEST, digest, shard_count, shard_name
from fastfm.run.checkpoint import EMA_WEIGHTS, META, atomic_write, load_json, read_committed, save_json, sha256
from fastfm.run.load import load_run, resolve_device
from fastfm.run.rundir import RunLock
from fastfm.solve import EagerSampler, Sampler, SolvePlan, settings_with

SHARD_SIZE = 1000
"""Pairs per shard by default: the unit of a resumed generation."""
REQUEST = ("teacher_sha256", "engine", "solver", "steps", "n", "shard_size", "seed", "batch_size")
"""The manifest fields that make two generations the same one (the teacher by its digests, not its path)."""


def labels(plan: SolvePlan, num_classes: int | None, start: int, m: int) -> Tensor | None:
    """Labels of rows start .. start + m - 1: row mod num_classes, or the plan's baked class; None unconditional."""
    if num_classes is None:
        return None
    if plan.class_label is not None:
        return torch.full((m,), plan.class_label, dtype=torch.int64)
    return (start + torch.arange(m)) % num_classes


def solve_shard(sampler: Sampler, k: int, start: int, m: int, seed: int, batch: int, bar: tqdm) -> dict[str, Tensor]:
    """Shard k (rows start .. start + m - 1) as the module doc draws it: x0, x1 (and y)."""
    plan = sampler.plan("sample")
    parts: list[tuple[Tensor, Tensor, Tensor | None]] = []
    for j, i in enumerate(range(0, m, batch)):
        rows = min(batch, m - i)
        chunk_seed = seeding.derive(seed, seeding.REFLOW, k, j)
        y = labels(plan, sampler.meta.num_classes, start + i, rows)
        cond = {} if y is None or plan.class_label is not None else {"y": y}
        x1 = sampler.sample(rows, seed=chunk_seed, cond=cond, progress=False).x
        # the interface returns x1 alone: its x0 drawn again, as the sampler drew it (rows <= its batch: one draw)
        x0 = plan.draw(sampler.path, rows, seeding.generator(chunk_seed, seeding.SAMPLE), "cpu")[plan.x_name]
        if not bool(torch.isfinite(x1).all()):
            raise ValueError(f"shard {k}: the teacher's solve gives NaN/Inf values (its weights or the solver "
                             "settings); the shard is not written")
        parts.append((x0, x1, y))
        bar.update(rows)
    out = {"x0": torch.cat([p[0] for p in parts]).float().contiguous(),
           "x1": torch.cat([p[1] for p in parts]).float().contiguous()}
    if parts[0][2] is not None:
        out["y"] = torch.cat([p[2] for p in parts]).to(torch.int64)
    return out


def request_of(teacher: Path, sampler: Sampler, *, n: int, shard_size: int, seed: int, batch_size: int,
               engine: str | None) -> dict[str, Any]:
    """The manifest (less its shard digests) of a generation; ValueError for a teacher reflow cannot pair."""
    meta, plan = sampler.meta, sampler.plan("sample")
    if plan.diffusion is not None:
        raise ValueError(f"the engine runs the SDE (diffusion {plan.diffusion}): reflow pairs x0 with the ODE's "
                         "solution X_{0->1}(x0); export an ODE engine")
    if meta.superres:
        raise ValueError(f"teacher {teacher} is a super-resolution model: its pairs would need low-resolution "
                         "inputs; reflow pairs unconditional or class-conditional flows")
    if meta.source != "gaussian":
        raise ValueError(f"teacher {teacher} has source {meta.source!r}: reflow pairs flows from a Gaussian source "
                         "(the student trains with --source gaussian)")
    digests = {name: digest(read_committed(teacher / name)) for name in (META, EMA_WEIGHTS)}
    data = meta.to_json()["data"]
    request = {"format": FORMAT, "fastfm_version": fastfm.__version__, "teacher": str(teacher),
               "teacher_sha256": digests, "engine": engine, **plan.describe(), "nfe": plan.nfe, "n": n,
               "shard_size": shard_size, "seed": seed, "batch_size": batch_size, "shape": data["shape"],
               "num_classes": meta.num_classes, "data": {**data, "seed": meta.seed}}
    return json.loads(json.dumps(request))  # as the manifest reads back


def prepare(out: Path, request: dict[str, Any], force: bool) -> list[str | None]:
    """The digests of the shards already in ``out`` that this request keeps (None: to generate), with the
    manifest written; a different generation in ``out`` is a ValueError unless ``force`` (removed)."""
    path = out / MANIFEST
    found = sorted(out.glob("pairs-*.safetensors"))
    count = shard_count(request["n"], request["shard_size"])
    old: dict[str, Any] | None = None
    if path.exists() and not force:
        try:
            old = load_json(path, ValueError, f"no {path}")
        except ValueError as e:
            raise ValueError(f"{e}; --force replaces it") from None
        if not isinstance(old, dict):
            raise ValueError(f"corrupt {path}: not a JSON object; --force replaces it")
        diff = [f"{key} {old.get(key)!r} there, {request[key]!r} asked" for key in REQUEST
                if old.get(key) != request[key]]
        if diff:
            raise ValueError(f"{out} holds another reflow generation ({'; '.join(diff)}): pass --force to replace "
                             "it, or choose another --out")
    elif found and not force:
        raise ValueError(f"{out} holds pair shards but no {MANIFEST}: pass --force to replace them, or choose another "
                         "--out")
    for stale in [*out.glob(f".{MANIFEST}.*.tmp"), *out.glob(".pairs-*.safetensors.*.tmp"),
                  *([path, *found] if old is None else [])]:
        stale.unlink(missing_ok=True)
    recorded = None if old is None else old.get("shards")
    if not (isinstance(recorded, list) and len(recorded) == count):
        recorded = [None] * count
    shards = [want if want is not None and (out / shard_name(k)).is_file() and sha256(out / shard_name(k)) == want
              else None for k, want in enumerate(recorded)]
    save_json({**request, "shards": shards}, path)
    return shards


def generate_pairs(teacher: str | Path, out: str | Path, *, n: int, shard_size: int = SHARD_SIZE, seed: int = 0,
                   solver: str | None = None, steps: int | None = None, batch_size: int | None = None,
                   device: str = "auto", engine: Sampler | None = None, force: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Write n pairs (x0, X_{0->1}(x0)) of the run in ``teacher`` (a run directory; a flow map samples with its map)
    into ``out`` as the module doc says, or finish a generation there; returns a summary.

    The solve is ``solver`` x ``steps`` (None: the defaults of ``fastfm.solve``) on the teacher's EMA model on
    ``device``, or ``engine``: an engine's sampler of this teacher (``python -m fastfm.reflow --engine`` opens it
    with ``fastfm.commands.common.open_sampler``), which fixes the solver and steps. ValueError (one line) for bad
    input, before any file is written.
    """
    teacher, out = Path(teacher).resolve(), Path(out)
    if n < 1 or shard_size < 1:
        raise ValueError(f"--n and --shard-size must be >= 1, got {n} and {shard_size}")
    if not teacher.is_dir():
        raise ValueError(f"teacher {teacher}: not a run directory (it holds ema.safetensors and model.json)")
    if engine is not None and (solver is not None or steps is not None):
        raise ValueError("an engine fixes its solver and steps: give neither with it")
    settings = settings_with({"solver": solver, "steps": steps, "batch_size": batch_size})
    sampler = engine or EagerSampler.from_run(load_run(teacher, resolve_device(device)), settings)
    engine_dir = None if engine is None else str(Path(engine.describe()["engine"]).resolve())
    request = request_of(teacher, sampler, n=n, shard_size=shard_size, seed=seed, batch_size=settings.batch_size,
                         engine=engine_dir)
    started, lock = time.perf_counter(), RunLock(out)
    lock.acquire(f"python -m fastfm.reflow --teacher {teacher} --out {out}")
    try:
        shards = prepare(out, request, force)
        todo = [k for k, want in enumerate(shards) if want is None]
        rows = [min(shard_size, n - k * shard_size) for k in range(len(shards))]
        with tqdm(total=n, initial=n - sum(rows[k] for k in todo), desc="reflow", unit="pair",
                  disable=not progress) as bar:
            for k in todo:
                tensors = solve_shard(sampler, k, k * shard_size, rows[k], seed, settings.batch_size, bar)
                data = save_safetensors(tensors)
                atomic_write(out / shard_name(k), lambda tmp: Path(tmp).write_bytes(data))
                shards[k] = digest(data)
                save_json({**request, "shards": shards}, out / MANIFEST)
                bar.set_postfix(shards=f"{sum(d is not None for d in shards)}/{len(shards)}")
    finally:
        lock.release()
    return {"out": str(out), "n": n, "shards": len(shards), "generated": len(todo), "kept": len(shards) - len(todo),
            **{key: request[key] for key in ("solver", "steps", "nfe", "engine", "seed")},
            "seconds": round(time.perf_counter() - started, 3)}
