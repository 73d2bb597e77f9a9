"""Learned (Fourier) interpolants: end conditions, closed-form derivatives, the max-min objective, the trainer's
--path learned (its --path-args, checkpoint, resume, rebuild from model.json, an older run's options) and its shorter
transport on GMM -> moons."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import call, cli_error, run_training

from fastfm import evaluate, train
from fastfm.training.config import TrainConfig, from_dict, upgrade
from fastfm.run.load import load_run
from fastfm.run.checkpoint import CHECKPOINT, load_training_state
from fastfm.path.interpolants import interpolant_objective
from fastfm.path.affine import FourierInterpolant, LearnedScheduler, get_path

F64 = torch.float64


def random_interpolant(modes: int = 3, seed: int = 0) -> FourierInterpolant:
    g = torch.Generator().manual_seed(seed)
    return FourierInterpolant(modes, (0.3 * torch.randn(modes, generator=g)).tolist(),
                              (0.3 * torch.randn(modes, generator=g)).tolist())


def test_end_conditions_hold_for_any_coefficients():
    s = random_interpolant()(torch.tensor([0.0, 1.0], dtype=F64))
    assert s.sigma_t.tolist() == pytest.approx([1.0, 0.0], abs=1e-12)
    assert s.alpha_t.tolist() == pytest.approx([0.0, 1.0], abs=1e-12)
    path = get_path("learned", **random_interpolant().args())
    assert (path.ends.alpha_0, path.ends.sigma_0, path.ends.alpha_1, path.ends.sigma_1) == (0.0, 1.0, 1.0, 0.0)


def test_derivatives_match_finite_differences():
    interp, h = random_interpolant(5).double(), 1e-6
    t = torch.linspace(0.01, 0.99, 41, dtype=F64)
    s, up, down = interp(t), interp(t + h), interp(t - h)
    assert torch.allclose(s.d_alpha_t, (up.alpha_t - down.alpha_t) / (2 * h), atol=1e-7)
    assert torch.allclose(s.d_sigma_t, (up.sigma_t - down.sigma_t) / (2 * h), atol=1e-7)
    # and a planted error would be seen: the derivative is not that of another schedule
    assert not torch.allclose(s.d_alpha_t, random_interpolant(5, seed=1).double()(t).d_alpha_t, atol=1e-3)


def test_untrained_is_the_linear_interpolant_and_the_scheduler_is_detached():
    t = torch.rand(16)
    learned, linear = get_path("learned").scheduler(t), get_path("linear").scheduler(t)
    for a, b in zip((learned.alpha_t, learned.sigma_t, learned.d_alpha_t, learned.d_sigma_t),
                    (linear.alpha_t, linear.sigma_t, linear.d_alpha_t, linear.d_sigma_t)):
        assert torch.allclose(a, b, atol=1e-6) and not a.requires_grad


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="modes must be an integer"):
        FourierInterpolant(0)
    with pytest.raises(ValueError, match="3 finite numbers"):
        FourierInterpolant(3, sigma_coef=[0.0, 1.0])
    with pytest.raises(ValueError, match="bad parameters for path 'learned'"):
        get_path("learned", sigma_min=0.1)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        get_path("learned", lr=0)
    with pytest.raises(ValueError, match="every .* must be an integer >= 1"):
        get_path("learned", every=0)


def test_learned_path_is_built_without_the_training_module():
    """fastfm.path.affine owns the learned scheduler: building it imports no fastfm.path.interpolants (no import cycle)."""
    code = ("import sys; from fastfm.path.affine import get_path; p = get_path('learned', modes=2, lr=0.01, every=3); "
            "print(type(p.scheduler).__name__, p.scheduler.every, 'fastfm.path.interpolants' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["LearnedScheduler", "3", "False"]


def test_objective_is_cfm_loss_less_a_constant_and_minimised_by_the_target():
    """G(v) = E|v - d_t I|^2 - E|d_t I|^2; at v = d_t I (the per-sample optimum) G = -E|d_t I|^2."""
    interp = random_interpolant()
    g = torch.Generator().manual_seed(2)
    x0, x1, t = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g) + 2, torch.rand(64, generator=g)
    s = interp(t)
    d_i = (s.d_sigma_t[:, None] * x0 + s.d_alpha_t[:, None] * x1).detach()
    v_fixed = torch.randn(64, 2, generator=g)
    g_val = interpolant_objective(lambda x, tt: v_fixed, interp, x0, x1, t)
    assert g_val.item() == pytest.approx(float(((v_fixed - d_i) ** 2).sum(1).mean() - (d_i ** 2).sum(1).mean()),
                                         rel=1e-5)
    g_opt = interpolant_objective(lambda x, tt: d_i, interp, x0, x1, t)
    assert g_opt.item() == pytest.approx(-float((d_i ** 2).sum(1).mean()), rel=1e-5)
    (grad,) = torch.autograd.grad(g_val, [interp.alpha_coef])  # flows into the interpolant's parameters
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="one shape"):
        interpolant_objective(lambda x, tt: x, interp, x0, x1[:3], t)


def test_config_checks(tmp_path, capsys):
    """The learned path's requirements, declared by its scheduler, and its --path-args, checked by its factory."""
    why = "its max-min objective trains the velocity over t ~ U[0, 1]"
    for flags, msg in [(["--target", "x1"], f"path 'learned' needs --target velocity, not 'x1': {why}"),
                       (["--time-sampler", "logit-normal"], "path 'learned' needs --time-sampler uniform"),
                       (["--path-args", "modes=0"], "interpolant modes must be an integer in [1, 64]"),
                       (["--path-args", "lr=0"], "lr must be a positive number"),
                       (["--path-args", "every=1.5"], "must be an integer >= 1"),
                       (["--path-args", "sigma_min=0.1"], "bad parameters for path 'learned'")]:
        assert msg in cli_error(train.main, ["--path", "learned", "--out", str(tmp_path / "x"), *flags])
    with pytest.raises(SystemExit):  # its parameters are path args, not options of their own
        call(train.main, ["--path", "learned", "--interp-lr", "0.01", "--out", str(tmp_path / "x")])
    assert "unrecognized arguments: --interp-lr" in capsys.readouterr().err
    assert TrainConfig(path="learned", path_args={"modes": 3, "lr": 0.05, "every": 2}).validate()


def test_an_older_runs_interp_options_become_path_args():
    """A config file or checkpoint of a run from before --path-args took the learned path's parameters (it saved
    every option, --interp-* included) still loads and resumes: those off their defaults become path args."""
    old = {"path": "learned", "path_args": {}, "interp_modes": 3, "interp_lr": 0.05, "interp_every": 1}
    assert upgrade(old) == {"path": "learned", "path_args": {"modes": 3, "lr": 0.05}}
    assert upgrade({"path": "condot", "path_args": {}, "interp_modes": 4}) == {"path": "condot", "path_args": {}}
    assert from_dict(old).validate().path_args == {"modes": 3, "lr": 0.05}


def test_learned_run_saves_resumes_and_rebuilds(tmp_path):
    out = tmp_path / "run"
    flags = ["--data", "moons", "--source", "gmm", "--path", "learned", "--path-args", "modes=3", "lr=0.05",
             "--ckpt-every", "2"]
    run = run_training(out, *flags, steps=4)
    state = load_training_state(out / CHECKPOINT)
    trained = state["interpolant"]["alpha_coef"]
    assert float(trained.abs().sum()) > 0  # the ascent moved the coefficients
    meta = json.loads((out / "model.json").read_text())["path"]
    assert meta["name"] == "learned" and meta["args"]["alpha_coef"] == pytest.approx(trained.tolist())
    assert (meta["args"]["modes"], meta["args"]["lr"], meta["args"]["every"]) == (3, 0.05, 1)
    loaded = load_run(out)
    assert isinstance(loaded.path.scheduler, LearnedScheduler)
    assert loaded.path.config["alpha_coef"] == pytest.approx(trained.tolist())
    assert "interp_kinetic" in run.summary["last"] and "transport" in run.summary
    res = json.loads(call(evaluate.main, ["--checkpoint", str(out), "--n", "10", "--n-samples", "30", "--steps", "2",
                                          "--device", "cpu"]))
    assert res["path"]["name"] == "learned" and res["transport"]["n"] == 30
    run_training(out, *flags, "--resume", steps=6)  # restores the interpolant and its optimizer, then moves on
    resumed = load_training_state(out / CHECKPOINT)
    assert resumed["step"] == 6 and not torch.equal(resumed["interpolant"]["alpha_coef"], trained)


def test_learned_interpolant_shortens_transport_gmm_to_moons(tmp_path):
    """Same steps, seed and model: the learned interpolant's flow has less kinetic energy than the linear one's,
    closer to POT's exact W2^2 between the prior and the data (the least any flow can have)."""
    common = ["--data", "moons", "--source", "gmm", "--batch-size", "256", "--eval-steps", "16", "--eval-budget", "0",
              "--n-samples", "1000", "--eval-n", "20", "--log-every", "100", "--seed", "1"]
    model = ["--model-args", "hidden=64", "depth=3"]
    lin = run_training(tmp_path / "linear", *common, "--path", "linear", model=model, steps=300).summary["transport"]
    learned = run_training(tmp_path / "learned", *common, "--path", "learned", model=model,
                           steps=300).summary["transport"]
    print(f"kinetic linear {lin['kinetic_energy']:.3f}, learned {learned['kinetic_energy']:.3f}, "
          f"W2^2 {lin['w2_sq_pot']:.3f} (n {lin['w2_n']})")
    assert learned["kinetic_energy"] < lin["kinetic_energy"] - 5 * (lin["kinetic_energy_stderr"]
                                                                     + learned["kinetic_energy_stderr"])
    assert abs(learned["kinetic_energy"] - lin["w2_sq_pot"]) < abs(lin["kinetic_energy"] - lin["w2_sq_pot"])
