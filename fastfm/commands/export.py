"""``python -m fastfm.export``: build a sampling or likelihood engine from a trained checkpoint.

    python -m fastfm.export --checkpoint runs/default --task sample --solver midpoint --steps 16 \\
        --batch 1 --backend aoti --out engines/sample-b1

Reports each stage as it finishes (``export: traced ... (3.1 s)``) on stderr, then prints the
manifest summary as JSON on stdout; errors are ``error: ...`` on stderr with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys

from fastfm.commands import helpformat
from fastfm.run.checkpoint import load_inference
from fastfm.commands.common import add_sampling_options, add_solve_options, given_settings, read_low_res
from fastfm.export import DTYPES, ENGINE_BACKENDS, TASKS, EngineRequest, export_engine
from fastfm.export.choose import AUTO
from fastfm.run.meta import RunMeta
from fastfm.solve import settings_with


def parser() -> argparse.ArgumentParser:
    p = helpformat.parser("export", __doc__.splitlines()[0])
    what = p.add_argument_group("what to build")
    what.add_argument("--checkpoint", required=True, help="run directory, its ema.safetensors, or a checkpoint.pt")
    what.add_argument("--task", required=True, choices=TASKS,
                      help="sample: noise -> data; likelihood: data -> latent and log p")
    what.add_argument("--out", required=True, help="engine directory to write")
    what.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_solve_options(p)
    engine = p.add_argument_group("engine")
    engine.add_argument("--backend", default=AUTO, choices=(AUTO, *ENGINE_BACKENDS),
                        help=f"how the engine is compiled and run: {ENGINE_BACKENDS.help_text()}; auto: build "
                             "each one this machine offers, check its parity, time it on the probe batch and keep "
                             "the fastest (the times go into the manifest)")
    engine.add_argument("--batch", type=int, default=1, help="static batch of one engine call")
    engine.add_argument("--dtype", default=AUTO, choices=(AUTO, *DTYPES),
                        help="model dtype (the state, log-density and time stay fp32); auto: fp32, and bf16 too "
                             "where the device runs it natively (AVX512-BF16/AMX CPUs, CUDA sm_80+), kept only if "
                             "it times faster")
    engine.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the engine runs there)")
    engine.add_argument("--seed", type=int, default=0, help="seed of the parity probe batch")
    cond = p.add_argument_group("sampling")
    add_sampling_options(cond, "sampling engine of the SDE dX = [v + eps/2 score] dt + sqrt(eps) dW (Gaussian-base "
                               "paths; Euler-Maruyama over --steps, noise (steps, B, ...) as an engine input)")
    cond.add_argument("--log-likelihood", action="store_true", help="sampling engine also returns log p of its samples")
    cond.add_argument("--low-res", default=None,
                      help="super-resolution models: .npy of low-res images for the parity probe batch "
                           "(default: downsampled prior draws); the engine takes low_res as an input")
    return p


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        request = EngineRequest(args.task, settings_with(given_settings(args)), batch=args.batch, backend=args.backend,
                                dtype=args.dtype, log_likelihood=args.log_likelihood)
        low_res = None if args.low_res is None else read_low_res(
            args.low_res, RunMeta.from_json(load_inference(args.checkpoint)[1], str(args.checkpoint)))
        info = export_engine(args.checkpoint, request, args.out, device=args.device, seed=args.seed, low_res=low_res,
                             force=args.force, progress=_progress)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    spec = info.spec.to_json()
    print(json.dumps({"out": args.out, "engine": str(info.engine_file),
                      **{k: spec[k] for k in ("task", "backend", "dtype", "solver", "steps")}, "nfe": info.nfe,
                      **{k: spec[k] for k in ("batch", "diffusion", "divergence")},
                      "inputs": [i.to_json() for i in info.inputs],
                      "selection": info.selection,
                      "parity": {k: {"max_abs": v["max_abs"], "cosine": v["cosine"]}
                                 for k, v in info.parity["outputs"].items()}}))


if __name__ == "__main__":
    main()
