"""Figure: flows of the linear and the learned interpolant, GMM -> moons, with their kinetic energies and W2^2.

    .venv/bin/python benchmarks/figures/learned_interpolant.py [--steps 12000] [--out docs/figures/learned_interpolant.png]

Trains both runs (same seed, model, steps; CPU: 9 min for both at 12,000 steps on a busy 2-core cpu-avx2
machine), then plots ODE trajectories of
the EMA models from prior draws (midpoint, 32 steps), the learned sigma(t), alpha(t) against the linear ones,
and writes the measured numbers (kinetic energy, straightness, POT W2^2, wall times) beside the PNG as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from fastfm.run.load import load_run  # noqa: E402
from fastfm.training.config import TrainConfig  # noqa: E402
from fastfm.solve.ode import draw_prior, ode_sample  # noqa: E402
from fastfm.training.trainer import train  # noqa: E402


def run(path: str, out: Path, steps: int) -> dict:
    cfg = TrainConfig(data="moons", source="gmm", path=path, steps=steps, batch_size=256, seed=1,
                      model_args={"hidden": 64, "depth": 3}, eval_steps=32, eval_n=200, n_samples=2000,
                      eval_budget=0.0, log_every=steps, ckpt_every=steps, device="cpu", out=str(out), force=True)
    start = time.perf_counter()
    summary = train(cfg.validate())
    return {"transport": summary["transport"], "quality": summary["quality"], "wall_s": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--out", default="docs/figures/learned_interpolant.png")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results, runs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("linear", "learned"):
            results[name] = run(name, Path(tmp) / name, args.steps)
            runs[name] = load_run(Path(tmp) / name)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    w2 = results["linear"]["transport"]["w2_sq_pot"]
    for ax, name in zip(axes[:2], ("linear", "learned")):
        r = runs[name]
        x0 = draw_prior(r.path, 300, r.shape, torch.Generator().manual_seed(0))
        traj = ode_sample(r.model, r.path, x0, steps=32, return_intermediates=True).intermediates
        for i in range(traj.shape[1]):
            ax.plot(traj[:, i, 0], traj[:, i, 1], lw=0.4, alpha=0.35, color="tab:gray")
        ax.scatter(traj[0, :, 0], traj[0, :, 1], s=3, color="tab:blue", label="prior (GMM)")
        ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=3, color="tab:red", label="samples (moons)")
        tr = results[name]["transport"]
        ax.set_title(f"{name} interpolant: K = {tr['kinetic_energy']:.2f}, S = {tr['straightness']:.2f}")
        ax.set_aspect("equal")
        ax.legend(loc="lower left", fontsize=8)
    ax = axes[2]
    t = torch.linspace(0, 1, 101)
    lin, learned = runs["linear"].path.scheduler(t), runs["learned"].path.scheduler(t)
    ax.plot(t, lin.sigma_t, "--", color="tab:blue", label="sigma(t), linear")
    ax.plot(t, lin.alpha_t, "--", color="tab:red", label="alpha(t), linear")
    ax.plot(t, learned.sigma_t, color="tab:blue", label="sigma(t), learned")
    ax.plot(t, learned.alpha_t, color="tab:red", label="alpha(t), learned")
    ax.set_xlabel("t")
    ax.set_title(f"x_t = sigma(t) x0 + alpha(t) x1;  exact OT: W2^2 = {w2:.2f}")
    ax.legend(fontsize=8)
    fig.suptitle(f"GMM -> moons, {args.steps} steps each: kinetic energy K = int E|v|^2 dt vs POT W2^2 = {w2:.2f} "
                 f"(n = {results['linear']['transport']['w2_n']})")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    results["learned_path"] = runs["learned"].path.config
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
