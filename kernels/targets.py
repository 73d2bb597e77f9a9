"""Compile every Triton kernel variant the ops launch for a GPU target, on any machine (no GPU needed).

    python -m fastfm.kernels.targets [--arch 90] [--json report.json]

The launches are recorded, not run: the public kernels (``triton_kernels.affine_path``, ``cfm_loss``,
``cfm_loss_grad``) are called on ``meta`` tensors (shapes and dtypes, no data) for every dtype, with
x0 given and drawn, with and without the target, at row sizes that pick every loss block size, with
``_launch`` swapped for a recorder. Each recorded launch gives the kernel, its argument types and its
constexprs; every distinct variant is compiled by Triton for ``GPUTarget("cuda", arch, 32)`` to PTX
and a cubin, whose resource usage (registers, spills) Triton's bundled cuobjdump reads. This checks
without a GPU that

* every scalar a launch passes is int32-sized and the same for any seed and offset (those reach the
  kernel inside the ``rng`` tensor): on torch 2.11, inductor's code generation for user-defined
  Triton kernels failed on a Python-int seed above 2^31 ('int' object has no attribute 'xreplace');
* Triton's compiler, stricter about types than its interpreter, accepts every variant for the target;
* no variant spills registers to local memory.

It must run without ``TRITON_INTERPRET`` (the interpreter replaces the kernels); tests run it in a
subprocess.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import triton
from torch import Tensor
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastfm.kernels import triton_kernels as tk
from fastfm.kernels.rng import philox_state

_POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64"}
INT32 = range(-(2**31), 2**31)


@dataclass(frozen=True)
class Launch:
    """One recorded launch: kernel name, Triton signature (argument name -> type) and constexprs."""

    kernel: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    scalars: tuple[tuple[str, Any], ...]  # the non-tensor runtime arguments, by name
    options: tuple[tuple[str, Any], ...] = ()  # launch options (num_warps)


def _type_of(name: str, value: Any) -> str:
    """Triton's type of a runtime argument; an int outside int32 is refused (see the module doc)."""
    if isinstance(value, Tensor):
        return _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        if value not in INT32:
            raise ValueError(f"launch argument {name} = {value} does not fit in int32: a scalar kernel argument "
                             f"must be shape-derived (seeds and offsets go in the rng tensor)")
        return "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"launch argument {name} has unsupported type {type(value).__name__}")


def record(fn: Callable[[], Any]) -> list[Launch]:
    """The launches ``fn`` makes through ``triton_kernels._launch``, recorded instead of run."""
    launches: list[Launch] = []

    def recorder(kernel, grid, *args, **kwargs) -> None:
        names = kernel.arg_names
        constexpr = {names[p.num] for p in kernel.params if p.is_constexpr}
        bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        runtime = {k: v for k, v in bound.items() if k not in constexpr}
        launches.append(Launch(
            kernel.__name__,
            tuple((k, "constexpr" if k in constexpr else _type_of(k, bound[k])) for k in names),
            tuple(sorted((k, v) for k, v in bound.items() if k in constexpr)),
            tuple((k, v) for k, v in runtime.items() if not isinstance(v, Tensor)),
            tuple(sorted((k, v) for k, v in kwargs.items() if k not in names))))

    real = tk._launch
    tk._launch = recorder
    try:
        fn()
    finally:
        tk._launch = real
    return launches


def _variants(seed: int, offset: int) -> Callable[[], None]:
    """Every kind of call the ops make, on meta tensors, with the noise state (seed, offset)."""

    def run() -> None:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for d in (2, 17, 3072, 12288):  # tiles of many rows, a few, and one row in several column blocks
                x1 = torch.empty(5, d, dtype=dtype, device="meta")
                coef = torch.empty(5, device="meta")
                rng = philox_state(seed, offset, "meta")
                for x0, state in ((None, rng), (torch.empty_like(x1), None)):
                    for write_target in (True, False):
                        tk.affine_path(x1, coef, coef, coef, coef, x0, state, 0.5, write_target)
                    tk.cfm_loss(x1, x1, coef, coef, x0, state, 0.5)
                    tk.cfm_loss_grad(coef, x1, x1, coef, coef, x0, state, 0.5)

    return run


def launches() -> list[Launch]:
    """The distinct launches of every variant; raises if any scalar argument depends on the seed or offset."""
    first = record(_variants(seed=3, offset=0))
    second = record(_variants(seed=2**63 + 12345, offset=2**31 - 4096))
    if first != second:
        diff = next((a, b) for a, b in zip(first, second) if a != b)
        raise ValueError(f"a launch changes with the seed or offset (a recompile per step under torch.compile): "
                         f"{diff[0]} vs {diff[1]}")
    return list(dict.fromkeys(first))


_KERNELS = {k.__name__: k for k in (tk._affine_path_kernel, tk._cfm_loss_partial_kernel, tk._cfm_loss_grad_kernel)}


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL (bytes of local memory: spills) of the cubin's kernel, from cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
    return {k: int(fields[k]) for k in ("REG", "STACK", "SHARED", "LOCAL")}


def _specialised(launch: Launch) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int, ...], list]]:
    """(signature, constexprs, attrs) as Triton's launcher specialises a real launch: 16-byte aligned
    pointers (torch's allocations), integers divisible by 16 marked so, integers equal to 1 made constexpr."""
    signature, constexprs = dict(launch.signature), dict(launch.constexprs)
    scalars = dict(launch.scalars)
    attrs: dict[tuple[int, ...], list] = {}
    for i, (name, kind) in enumerate(launch.signature):
        value = scalars.get(name)
        if kind == "i32" and value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        elif kind.startswith("*") or (kind == "i32" and value % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


_WIDTH = re.compile(r"\b(ld|st)\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")


def memory_accesses(ptx: str) -> dict[str, dict[int, int]]:
    """Global loads and stores of a PTX text by width in bits (vector lanes x element bits): 128 is a
    full 16-byte vector access."""
    out: dict[str, dict[int, int]] = {"ld": {}, "st": {}}
    for op, lanes, bits in _WIDTH.findall(ptx):
        width = int(lanes or 1) * int(bits)
        out[op][width] = out[op].get(width, 0) + 1
    return out


def compile_launch(launch: Launch, arch: int = 90) -> dict[str, Any]:
    """Compile one variant for ``GPUTarget("cuda", arch, 32)`` as its launch specialises it; its metadata,
    PTX instruction count, global access widths and resource usage."""
    signature, constexprs, attrs = _specialised(launch)
    src = ASTSource(_KERNELS[launch.kernel], signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    ptx = compiled.asm["ptx"]
    instructions = sum(1 for ln in ptx.splitlines()
                       if ln.strip().endswith(";") and not ln.strip().startswith((".", "//")))
    return {"kernel": launch.kernel, "signature": dict(launch.signature), "constexprs": dict(launch.constexprs),
            "scalars": dict(launch.scalars), "num_warps": compiled.metadata.num_warps, "ptx_bytes": len(ptx),
            "ptx_instructions": instructions, "global_access_bits": memory_accesses(ptx),
            **_resource_usage(compiled.asm["cubin"])}


def report(arch: int = 90) -> dict[str, Any]:
    """Every variant compiled for the target, with versions."""
    return {"target": f"cuda sm_{arch}", "torch": torch.__version__, "triton": triton.__version__,
            "variants": [compile_launch(launch, arch) for launch in launches()]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="compile every Triton kernel variant the ops launch for a GPU target")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200)")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    args = p.parse_args(argv)
    if tk.interpret_mode():
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles")
    result = report(args.arch)
    for v in result["variants"]:
        dtype = v["signature"].get("x1_ptr", "")[1:]
        print(f"{v['kernel']:26s} {dtype:5s} D={v['scalars']['D']:<6d} {json.dumps(v['constexprs']):62s} "
              f"regs {v['REG']:3d} local {v['LOCAL']} smem {v['SHARED']:5d} instr {v['ptx_instructions']:5d} "
              f"ld {v['global_access_bits']['ld']} st {v['global_access_bits']['st']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
