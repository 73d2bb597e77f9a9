"""Figure: ODE and SDE samples of one trained model for several diffusions eps(t), beside the data.

    .venv/bin/python benchmarks/figures/sde_vs_ode.py [--checkpoint runs/default] [--out docs/figures/sde_vs_ode.png]

The checkpoint defaults to ``make train``'s run (checkerboard, CondOT). Every panel holds the same number of
points from the same prior draws: the ODE (midpoint, 32 steps) and the SDE dX = [v + eps/2 score] dt +
sqrt(eps) dW (Euler-Maruyama, 200 steps, then the denoising jump) for each eps, each titled with its energy
distance to the held-out data (``fastfm.evaluation.metrics``; 0 for equal laws). The numbers go beside the PNG as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fastfm.evaluation.metrics import energy_distance  # noqa: E402
from fastfm.run.load import dataset_of, load_run  # noqa: E402
from fastfm.solve import EagerSampler, InferenceSettings  # noqa: E402

DIFFUSIONS = ("0.2", "1", "sin2:3")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/default")
    p.add_argument("--out", type=Path, default=Path("docs/figures/sde_vs_ode.png"))
    p.add_argument("--n", type=int, default=2000)
    args = p.parse_args()
    run = load_run(args.checkpoint)
    data = dataset_of(run.meta).test[: args.n]
    panels = [("data (held out)", data, None, 0.0)]
    started = time.perf_counter()
    ode = EagerSampler.from_run(run, InferenceSettings(solver="midpoint", steps=32)).sample(len(data), progress=False)
    panels.append(("ODE, midpoint x 32", ode.x, ode.nfe, time.perf_counter() - started))
    for text in DIFFUSIONS:
        started = time.perf_counter()
        sde = EagerSampler.from_run(run, InferenceSettings(steps=200, diffusion=text))
        res = sde.sample(len(data), progress=False)
        panels.append((f"SDE, eps = {text}, EM x 200", res.x, res.nfe, time.perf_counter() - started))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.8))
    record = {"checkpoint": args.checkpoint, "n": len(data), "panels": []}
    for ax, (title, x, nfe, seconds) in zip(axes, panels):
        ed = float(energy_distance(x, data)) if nfe is not None else 0.0
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5)
        ax.set_title(f"{title}\nenergy dist {ed:.4f}" if nfe is not None else title, fontsize=8)
        ax.set_xlim(-4.5, 4.5)
        ax.set_ylim(-4.5, 4.5)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        record["panels"].append({"title": title, "nfe": nfe, "energy_distance": ed, "seconds": seconds})
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
