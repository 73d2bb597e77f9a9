"""fastfm.registry: one mechanism for every named factory (paths, couplings, time samplers, models, data sets,
solvers, divergences), the train flags built on it, and the --*-args that reach the built objects."""

from __future__ import annotations

import argparse
import inspect
import re
from pathlib import Path

import pytest
import torch

from fastfm.training import config as config_mod
from fastfm import train
from fastfm.training.trainer import Trainer
from fastfm.commands.train import build_parser, parse_config
from fastfm.training.config import ConfigError, TrainConfig
from fastfm.training.couplings import COUPLINGS, SinkhornCoupling
from fastfm.data import DATASETS, check_dataset
from fastfm.training.distributed import DistEnv
from fastfm.solve.divergence import DIVERGENCES, EXACT, HUTCHINSON, estimator
from fastfm.models import MODELS, config_for_data
from fastfm.path.affine import PATHS, CondOTScheduler, Requires
from fastfm.registry import Registry
from fastfm.solve import PLAN_KINDS
from fastfm.solve.solvers import SOLVERS
from fastfm.training.timesteps import TIME_SAMPLERS, LogitNormalTime
from fastfm.training.objectives import OBJECTIVES

from conftest import cli_error, train_argv

# ---------------------------------------------------------------------------------------------
# The mechanism
# ---------------------------------------------------------------------------------------------


def _shapes() -> tuple[Registry[str], list[tuple]]:
    calls: list[tuple] = []
    shapes: Registry[str] = Registry("shape", supplied=("seed",))

    def square(side: float, *, seed: int = 0) -> str:
        calls.append(("square", side, seed))
        return f"square {side}"

    shapes.register("square", "four equal sides", square)

    @shapes.register("circle", "round")
    def circle(radius: float = 1.0, filled: bool = False) -> str:
        calls.append(("circle", radius, filled))
        return f"circle {radius}"

    return shapes, calls


def test_names_membership_and_build() -> None:
    shapes, calls = _shapes()
    assert shapes.names == ("square", "circle") == tuple(shapes) and len(shapes) == 2
    assert "circle" in shapes and "hexagon" not in shapes and None not in shapes
    assert shapes.build("circle", radius=2.0) == "circle 2.0" and shapes.build("square", side=1, seed=3) == "square 1"
    assert calls == [("circle", 2.0, False), ("square", 1, 3)]
    assert shapes.entry("circle").help == "round"
    assert shapes.params("circle") == {"radius": 1.0, "filled": False}
    assert shapes.params("square") == {"side": inspect.Parameter.empty}  # seed: supplied by the caller, not listed
    assert shapes.help_text() == "square (side): four equal sides; circle (radius=1.0, filled=False): round"
    with pytest.raises(ValueError, match="shape 'circle' is registered twice"):
        shapes.register("circle", "again", lambda: "")


def test_unknown_name_is_one_clear_error() -> None:
    shapes, _ = _shapes()
    with pytest.raises(ValueError, match=r"^unknown shape 'hexagon'; choose one of square, circle$"):
        shapes.build("hexagon")
    for registry in (PATHS, COUPLINGS, TIME_SAMPLERS, MODELS, DATASETS, SOLVERS, DIVERGENCES, PLAN_KINDS):
        with pytest.raises(ValueError, match=f"unknown {registry.kind} 'nope'; choose one of {', '.join(registry)}"):
            registry.build("nope")


def test_bad_parameters_are_refused_before_the_factory_runs() -> None:
    shapes, calls = _shapes()
    with pytest.raises(ValueError, match=r"bad parameters for shape 'circle': .*'radius_m'.*radius=1\.0, filled=False"):
        shapes.build("circle", radius_m=2.0)
    with pytest.raises(ValueError, match=r"bad parameters for shape 'square': .*missing.*'side'"):
        shapes.build("square")
    assert calls == []
    with pytest.raises(ValueError, match="bad parameters for coupling 'sinkhorn-label': .*'backend'.*reg=0.01"):
        COUPLINGS.build("sinkhorn-label", backend="pot")
    with pytest.raises(ValueError, match="bad parameters for time sampler 'uniform': .*'std'.*no parameters"):
        TIME_SAMPLERS.build("uniform", std=2.0)


def test_a_registry_serves_argparse_choices() -> None:
    shapes, _ = _shapes()
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=shapes)
    assert p.parse_args(["--shape", "circle"]).shape == "circle"
    assert "{square,circle}" in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args(["--shape", "hexagon"])


# ---------------------------------------------------------------------------------------------
# train's flags come from the registries
# ---------------------------------------------------------------------------------------------


def test_train_help_lists_every_registered_name() -> None:
    helps = {a.dest: a.help for a in build_parser()._actions}
    for dest, registry in (("path", PATHS), ("coupling", COUPLINGS), ("time_sampler", TIME_SAMPLERS),
                           ("model", MODELS), ("data", DATASETS), ("eval_solver", SOLVERS),
                           ("eval_divergence", DIVERGENCES), ("objective", OBJECTIVES)):
        assert registry.help_text().replace("%", "%%") in helps[dest], dest
    for dest in ("coupling_args", "time_sampler_args", "data_args", "path_args", "model_args", "objective_args"):
        assert "KEY=VALUE" in helps[dest], dest


def test_validate_asks_the_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=f"unknown path 'nope'; choose one of {', '.join(PATHS)}"):
        TrainConfig(path="nope").validate()
    custom: Registry[object] = Registry("coupling")
    custom.register("mine", "a coupling of one's own", lambda strength=1.0: None)
    monkeypatch.setattr(config_mod, "COUPLINGS", custom)
    TrainConfig(coupling="mine", coupling_args={"strength": 2.0}).validate()
    with pytest.raises(ConfigError, match="unknown coupling 'independent'; choose one of mine"):
        TrainConfig().validate()


def test_validate_checks_what_every_path_requires(monkeypatch: pytest.MonkeyPatch) -> None:
    """A path declares what it needs of its run (``Scheduler.requires``); config checks it for any path, by no name."""
    class Picky(CondOTScheduler):
        requires = Requires({"target": "x1", "time_sampler": "uniform"}, "a path of one's own")

    custom: Registry[object] = Registry("path")
    custom.register("picky", "a path that needs x1 prediction", Picky)
    monkeypatch.setattr(config_mod, "PATHS", custom)
    TrainConfig(path="picky", target="x1").validate()
    with pytest.raises(ConfigError, match="path 'picky' needs --target x1, not 'velocity': a path of one's own"):
        TrainConfig(path="picky").validate()
    with pytest.raises(ConfigError, match="path 'picky' needs --time-sampler uniform, not 'logit-normal'"):
        TrainConfig(path="picky", target="x1", time_sampler="logit-normal").validate()


@pytest.mark.parametrize("opts, needles", [
    ({"coupling": "sinkhorn", "coupling_args": {"regularisation": 0.1}},
     ["bad parameters for coupling 'sinkhorn'", "'regularisation'", "reg=0.01, n_iters=100"]),
    ({"coupling_args": {"reg": 0.1}}, ["bad parameters for coupling 'independent'", "'reg'", "no parameters"]),
    ({"time_sampler": "logit-normal", "time_sampler_args": {"sd": 2}},
     ["bad parameters for time sampler 'logit-normal'", "'sd'", "mean=0.0, std=1.0"]),
    ({"data": "gmm", "data_args": {"components": 3}}, ["bad parameters for dataset 'gmm'", "'components'",
                                                       "n_components=8"]),
    ({"data_args": {"seed": 3}}, ["--data-args cannot set seed", "--seed"]),
    ({"path": "vp", "path_args": {"sigma_min": 0.1}}, ["bad parameters for path 'vp'", "beta_min=0.1"]),
    ({"path": "learned", "path_args": {"modes": 2, "every": 0}}, ["the learned path's every", "integer >= 1"]),
    ({"path": "learned", "path_args": {"sigma_min": 0.1}}, ["bad parameters for path 'learned'", "modes=4"]),
    ({"model": "transformer"}, ["unknown model 'transformer'; choose one of mlp, unet"]),
    ({"eval_divergence": "trace"}, ["unknown divergence 'trace'; choose one of auto, exact, hutchinson"]),
])
def test_bad_args_are_one_config_error(opts: dict, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        TrainConfig(**opts).validate()
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_bad_args_fail_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "run"
    msg = cli_error(train.main, train_argv(out, "--coupling", "sinkhorn", "--coupling-args", "eps=0.1"))
    assert "bad parameters for coupling 'sinkhorn'" in msg and "eps" in msg
    assert not out.exists()


def test_data_set_names_and_prefixes_are_checked_without_loading(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.npy"
    assert check_dataset(f"npy:{missing}") == "array"  # the file is read only when the data set is built
    with pytest.raises(ValueError, match="needs a path"):
        check_dataset("folder")
    with pytest.raises(ValueError, match="bad parameters for dataset 'array'.*'n_test'"):
        check_dataset(f"npz:{missing}", n_test=5)


# ---------------------------------------------------------------------------------------------
# --coupling-args, --time-sampler-args, --data-args reach the objects
# ---------------------------------------------------------------------------------------------


def test_args_reach_the_trainer(tmp_path: Path) -> None:
    cfg = parse_config(train_argv(tmp_path / "run", "--data", "gmm", "--data-args", "n_components=3", "n_test=40",
                                  "--coupling", "sinkhorn", "--coupling-args", "reg=0.05", "n_iters=7",
                                  "--time-sampler", "logit-normal", "--time-sampler-args", "mean=-0.5", "std=0.7"))
    assert cfg.data_args == {"n_components": 3, "n_test": 40}
    trainer = Trainer(cfg, DistEnv())
    assert trainer.data.num_classes == 3 and trainer.data.test.shape == (40, 2)
    assert isinstance(trainer.coupling, SinkhornCoupling)
    assert (trainer.coupling.reg, trainer.coupling.n_iters) == (0.05, 7)
    assert isinstance(trainer.times, LogitNormalTime) and (trainer.times.mean, trainer.times.std) == (-0.5, 0.7)


# ---------------------------------------------------------------------------------------------
# Owners of a policy: divergence probes, model defaults
# ---------------------------------------------------------------------------------------------


def test_divergences_carry_their_estimator_and_probe_rule() -> None:
    gen = torch.Generator().manual_seed(0)
    assert estimator("exact", 100) is EXACT and estimator("auto", 16) is EXACT
    assert estimator("auto", 17) is HUTCHINSON and estimator("hutchinson", 2) is HUTCHINSON
    assert EXACT.draw(3, (2, 100), gen, "cpu") is None and EXACT.jvps(100, 3) == 100
    p = HUTCHINSON.draw(3, (2, 17), gen, "cpu")
    assert p is not None and p.shape == (3, 2, 17) and set(p.unique().tolist()) == {-1.0, 1.0}
    assert HUTCHINSON.jvps(17, 3) == 3
    with pytest.raises(ValueError, match="unknown divergence 'trace'"):
        estimator("trace", 2)


def test_model_defaults_for_data() -> None:
    mlp = config_for_data("auto", data="moons", kind="vector", shape=(2,), num_classes=2, class_cond=True,
                          overrides={"hidden": 8})
    assert mlp == {"name": "mlp", "dim": 2, "num_classes": 2, "hidden": 8}
    big = config_for_data("auto", data="cifar10", kind="image", shape=(3, 32, 32), num_classes=10, superres=2)
    assert big == {"name": "unet", "in_channels": 3, "image_size": 32, "num_classes": None, "low_res_channels": 3,
                   "model_channels": 32, "channel_mult": [1, 2, 2]}
    small = config_for_data("unet", data="digits", kind="image", shape=(1, 8, 8), num_classes=10)
    assert small["channel_mult"] == [1, 2] and small["low_res_channels"] is None
    for name, kind, shape, kw, msg in [
        ("mlp", "image", (1, 8, 8), {}, "the mlp model takes vector data without superres; 'd' is image data"),
        ("mlp", "vector", (2,), {"superres": 2}, "the mlp model takes vector data without superres"),
        ("unet", "vector", (2,), {}, "the unet model takes image data; 'd' is vector data"),
        ("unet", "image", (1, 8, 8), {"superres": 3}, "superres factor 3 does not divide the image size 8"),
        ("auto", "vector", (2,), {"class_cond": True}, "--class-cond needs a labelled data set; 'd' has no labels"),
        ("dit", "image", (1, 8, 8), {}, "unknown model 'dit'; choose one of mlp, unet"),
    ]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            config_for_data(name, data="d", kind=kind, shape=shape, num_classes=None, **kw)


def test_a_runs_data_args_rebuild_its_data_set():
    """--data-args are recorded in model.json and used again where sample/evaluate rebuild the test split."""
    from fastfm.run.load import dataset_of
    from fastfm.run.meta import DataMeta, RunMeta

    meta = RunMeta(model={}, path="condot", source="gaussian", target="velocity", seed=3,
                   data=DataMeta(name="gmm", shape=(2,), kind="vector", args={"n_components": 3, "n_test": 50}))
    data = dataset_of(meta)
    assert data.num_classes == 3 and len(data.test) == 50
    assert torch.equal(data.test, dataset_of(meta).test)
