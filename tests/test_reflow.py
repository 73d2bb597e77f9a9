"""Reflow: pairs (x0, X_{0->1}(x0)) of tiny trained teachers (``python -m fastfm.reflow``), against the teacher's
own solve and an engine's outputs; resuming a generation to the same bytes; one error for another request into the
same directory; the ``reflow:DIR`` data set (refusals, its permutation resumed) and a student trained on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fastfm import reflow as reflow_cli
from fastfm.data import DataError, get_dataset
from fastfm.data.pairs import MANIFEST, shard_name
from fastfm.run.checkpoint import EMA_WEIGHTS, META, load_training_state, sha256
from fastfm.run.load import load_run
from fastfm.solve import EagerSampler, settings_with
from fastfm.training import reflow
from fastfm.training import trainer as trainer_mod
from fastfm.training.config import TrainConfig
from fastfm.training.reflow import generate_pairs

from conftest import call, cli_error, last_json

TINY = {"hidden": 16, "depth": 2}
SOLVE = {"n": 50, "shard_size": 16, "solver": "midpoint", "steps": 4, "batch_size": 7, "seed": 3}
"""Odd sizes: shards of 16, 16, 16 and 2 pairs, solved in chunks of 7."""


def quick(out: Path, **kw) -> TrainConfig:
    """A tiny CPU run with a cheap final evaluation."""
    base = dict(batch_size=64, out=str(out), device="cpu", log_every=10, eval_n=10, n_samples=10, eval_steps=2,
                eval_budget=0, model_args=TINY)
    return TrainConfig(**{**base, **kw}).validate()


TEACHERS = {"plain": dict(steps=20), "cond": dict(steps=20, class_cond=True),
            "flowmap": dict(steps=5, objective="meanflow")}
"""Moons teachers: a velocity model, a class-conditional one, a flow map (it samples with its map)."""


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    for name, options in TEACHERS.items():
        trainer_mod.train(quick(root / name, data="moons", **options))
    return {name: root / name for name in TEACHERS}


def solve_of(kind: str) -> dict[str, str | int]:
    """SOLVE's solver and steps, or two jumps of a flow map."""
    return {"solver": "flowmap", "steps": 2} if kind == "flowmap" else {"solver": "midpoint", "steps": 4}


@pytest.fixture(scope="module")
def pairs(teachers: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SOLVE's pairs of each teacher, generated in one go."""
    root = tmp_path_factory.mktemp("pairs")
    for name, teacher in teachers.items():
        generate_pairs(teacher, root / name, device="cpu", progress=False, **{**SOLVE, **solve_of(name)})
    return {name: root / name for name in teachers}


def argv(teacher: Path, out: Path, **over) -> list[str]:
    opts = {**SOLVE, "device": "cpu", **over}
    return ["--teacher", str(teacher), "--out", str(out),
            *[a for k, v in opts.items() if v is not None for a in (f"--{k.replace('_', '-')}", str(v))]]


def shard_bytes(directory: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(directory.glob("pairs-*.safetensors"))]


@pytest.mark.parametrize("kind", list(TEACHERS))
def test_pairs_are_the_teachers_solution(teachers, pairs, kind, tmp_path) -> None:
    teacher, out, solve = teachers[kind], pairs[kind], solve_of(kind)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["teacher"] == str(teacher.resolve()) and manifest["engine"] is None
    assert manifest["teacher_sha256"] == {name: sha256(teacher / name) for name in (META, EMA_WEIGHTS)}
    assert {k: manifest[k] for k in ("solver", "steps", "nfe", "n", "shard_size", "seed", "batch_size")} == \
        {**solve, "nfe": 2 if kind == "flowmap" else 8, "n": 50, "shard_size": 16, "seed": 3, "batch_size": 7}
    assert manifest["data"]["name"] == "moons" and manifest["shape"] == [2] and len(manifest["shards"]) == 4

    data = get_dataset(f"reflow:{out}")
    run = load_run(teacher)
    plan = EagerSampler.from_run(run, settings_with(solve)).plan("sample")
    with torch.no_grad():
        want = plan.run(run.model, run.path, data.source, y=data.train_labels).x
    torch.testing.assert_close(data.train, want, atol=1e-5, rtol=1e-5)
    assert torch.unique(data.source, dim=0).shape[0] == 50  # every chunk its own prior draw
    if kind == "cond":  # labels cycle through the classes by row
        assert torch.equal(data.train_labels, torch.arange(50) % 2)
    else:
        assert data.train_labels is None and data.test_labels is None and data.num_classes is None

    # a shard is a function of (teacher, solve, seed, k): a shorter generation begins with the same shard
    generate_pairs(teacher, tmp_path, device="cpu", progress=False, **{**SOLVE, **solve, "n": 20})
    assert (tmp_path / shard_name(0)).read_bytes() == (out / shard_name(0)).read_bytes()


def test_the_data_set_is_the_pairs_tested_on_the_teachers_split(pairs) -> None:
    data = get_dataset(f"reflow:{pairs['cond']}", seed=11)
    moons = get_dataset("moons", seed=0)  # the teacher's seed, not the student's
    assert data.paired and (data.shape, data.kind, data.levels, data.num_classes) == ((2,), "vector", None, 2)
    assert torch.equal(data.test, moons.test) and torch.equal(data.test_labels, moons.test_labels)

    gen = torch.Generator().manual_seed(0)
    x0, x1, y = data.sample_pairs(30, gen)
    at = [int(((data.source == row).all(1)).nonzero()) for row in x0]  # each row drawn with its own x1 and label
    assert torch.equal(x1, data.train[at]) and torch.equal(y, data.train_labels[at])
    state, gen_state = data.state_dict(), gen.get_state()
    want = data.sample_pairs(45, gen)  # across the epoch's end
    again = get_dataset(f"reflow:{pairs['cond']}")
    again.load_state_dict(state)
    got = again.sample_pairs(45, torch.Generator().set_state(gen_state))
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_an_interrupted_generation_resumes_to_the_same_shards(teachers, pairs, tmp_path, monkeypatch) -> None:
    teacher, out = teachers["plain"], tmp_path / "pairs"
    calls, solve = [], reflow.solve_shard

    def ctrl_c_in_shard_3(*args, **kw):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return solve(*args, **kw)

    monkeypatch.setattr(reflow, "solve_shard", ctrl_c_in_shard_3)
    with pytest.raises(SystemExit, match="interrupted: the finished shards .* run the same command again"):
        call(reflow_cli.main, argv(teacher, out))
    monkeypatch.undo()
    manifest = json.loads((out / MANIFEST).read_text())
    assert [d is not None for d in manifest["shards"]] == [True, True, False, False]
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, shard_name(0), shard_name(1)])
    # and what a SIGKILL may leave: a torn temporary, a shard edited after it was written
    (out / f".{shard_name(2)}.k1ll3d.tmp").write_bytes(b"torn")
    edited = bytearray((out / shard_name(1)).read_bytes())
    edited[-1] ^= 1
    (out / shard_name(1)).write_bytes(bytes(edited))

    summary = last_json(call(reflow_cli.main, argv(teacher, out)))
    assert (summary["kept"], summary["generated"], summary["shards"]) == (1, 3, 4)
    assert shard_bytes(out) == shard_bytes(pairs["plain"])
    assert json.loads((out / MANIFEST).read_text())["shards"] == json.loads((pairs["plain"] / MANIFEST).read_text())[
        "shards"]
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, *map(shard_name, range(4))])
    assert last_json(call(reflow_cli.main, argv(teacher, out)))["generated"] == 0


def test_another_request_into_the_directory_is_one_error_and_force_replaces(teachers, pairs, tmp_path) -> None:
    teacher, out = teachers["plain"], tmp_path / "pairs"
    shutil.copytree(pairs["plain"], out)
    before = shard_bytes(out)
    assert "holds another reflow generation (steps 4 there, 2 asked): pass --force" in cli_error(
        reflow_cli.main, argv(teacher, out, steps=2))
    assert "(seed 3 there, 4 asked; batch_size 7 there, 5 asked)" in cli_error(
        reflow_cli.main, argv(teacher, out, seed=4, batch_size=5))
    assert "teacher_sha256" in cli_error(reflow_cli.main, argv(teachers["cond"], out))
    assert shard_bytes(out) == before

    summary = last_json(call(reflow_cli.main, [*argv(teacher, out, steps=2, n=20), "--force"]))
    assert (summary["generated"], summary["shards"], summary["steps"]) == (2, 2, 2)
    assert sorted(p.name for p in out.glob("pairs-*")) == [shard_name(0), shard_name(1)]

    (out / MANIFEST).unlink()
    assert "holds pair shards but no reflow.json" in cli_error(reflow_cli.main, argv(teacher, out))
    new = tmp_path / "new"
    assert "--n and --shard-size must be >= 1, got 0 and 16" in cli_error(reflow_cli.main, argv(teacher, new, n=0))
    assert "not a run directory" in cli_error(reflow_cli.main, argv(teacher / EMA_WEIGHTS, new))
    assert not new.exists()


def test_engine_pairs_are_the_engines_outputs(teachers, tmp_path) -> None:
    from fastfm.export import EngineRequest, export_engine, load

    teacher, engine_dir, out = teachers["cond"], tmp_path / "engine", tmp_path / "pairs"
    export_engine(teacher, EngineRequest.of(task="sample", solver="euler", steps=3, batch=8, backend="onnx"),
                  engine_dir, device="cpu")
    assert "conflicts with the engine" in cli_error(reflow_cli.main, [*argv(teacher, out, solver=None, steps=5),
                                                                      "--engine", str(engine_dir)])
    over = dict(solver=None, steps=None, n=21, shard_size=9)
    summary = last_json(call(reflow_cli.main, [*argv(teacher, out, **over), "--engine", str(engine_dir)]))
    assert (summary["solver"], summary["steps"], summary["engine"]) == ("euler", 3, str(engine_dir.resolve()))

    data = get_dataset(f"reflow:{out}")
    got = load(engine_dir)(data.source, y=data.train_labels).x
    torch.testing.assert_close(data.train, got, atol=1e-6, rtol=1e-6)
    run = load_run(teacher)
    plan = EagerSampler.from_run(run, settings_with({"solver": "euler", "steps": 3})).plan("sample")
    with torch.no_grad():
        eager = plan.run(run.model, run.path, data.source, y=data.train_labels).x
    torch.testing.assert_close(data.train, eager, atol=2e-4, rtol=1e-4)


def test_a_student_trains_on_the_pairs_and_resumes_bitwise(teachers, pairs, tmp_path, monkeypatch) -> None:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    forward = trainer_mod.LossStep.forward

    def spy(self, x0, x1, *args):
        seen.append((x0.clone(), x1.clone()))
        return forward(self, x0, x1, *args)

    monkeypatch.setattr(trainer_mod.LossStep, "forward", spy)
    student = dict(data=f"reflow:{pairs['cond']}", time_sampler="u-shaped", loss="pseudo-huber",
                   init=str(teachers["cond"]), class_cond=True, batch_size=16, ckpt_every=10)
    trainer_mod.train(quick(tmp_path / "full", steps=20, **student))
    x0, x1 = seen[0]
    data = get_dataset(f"reflow:{pairs['cond']}")
    rows = [int(((data.source == row).all(1)).nonzero()) for row in x0]
    assert torch.equal(x1, data.train[rows])  # real pairs: each x0 with its own x1

    trainer_mod.train(quick(tmp_path / "half", steps=10, **student))
    trainer_mod.train(quick(tmp_path / "half", steps=20, resume=True, **student))
    full, resumed = (load_training_state(tmp_path / run / "checkpoint.pt") for run in ("full", "half"))
    for part in ("model", "ema"):
        for key, value in full[part].items():
            assert torch.equal(value, resumed[part][key]), f"{part}.{key}"
    assert full["data"]["index"] == resumed["data"]["index"] and torch.equal(full["data"]["perm"],
                                                                             resumed["data"]["perm"])


def test_a_broken_directory_is_refused(pairs, tmp_path) -> None:
    out = tmp_path / "pairs"
    with pytest.raises(DataError, match="no reflow.json: not a reflow data set"):
        get_dataset(f"reflow:{out}")
    shutil.copytree(pairs["plain"], out)
    (out / shard_name(2)).unlink()
    with pytest.raises(DataError, match=f"{shard_name(2)} is missing: .*reflow.json lists it"):
        get_dataset(f"reflow:{out}")
    shutil.copy(pairs["plain"] / shard_name(2), out)
    edited = bytearray((out / shard_name(3)).read_bytes())
    edited[-3] ^= 4
    (out / shard_name(3)).write_bytes(bytes(edited))
    with pytest.raises(DataError, match=f"{shard_name(3)} does not match its sha256"):
        get_dataset(f"reflow:{out}")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["shards"][3] = None
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="not written .* run python -m fastfm.reflow with the same options again"):
        get_dataset(f"reflow:{out}")
