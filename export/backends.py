"""Backends: build an engine file from the traced program, and load it back as a runner.

A runner maps the engine's inputs (tensors in signature order, on the engine's device) to its
outputs. Every backend gets the same simplified ExportedProgram and lowers it its own way, and stores a
stamp (what the engine computes, as JSON: ``manifest.identity``) in the engine file under ``STAMP``:

    aoti       torch._inductor.aoti_compile_and_package -> .pt2, aoti_load_package (CPU and CUDA);
               stamp: the package metadata (inductor config aot_inductor.metadata, get_metadata())
    onnx       torch.onnx.export(dynamo=True, opset 18, static shapes) -> .onnx, onnxruntime
               (IO binding on the tensors' memory; CUDA execution provider for CUDA engines);
               stamp: the model's metadata_props (onnxruntime: get_modelmeta().custom_metadata_map)
    tensorrt   torch_tensorrt.dynamo.compile + torch_tensorrt.save -> .ep (needs torch-tensorrt, CUDA)
    cudagraph  torch.export.save -> .pt2; at load torch.compile of the program, captured once in a
               torch.cuda.CUDAGraph and replayed (CUDA only; no extra dependency)
               (both: stamp in an extra file of the torch.export archive)

onnxruntime logs errors only (no console warnings such as unused initializers).
"""

from __future__ import annotations

import importlib
import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
from torch import Tensor

from fastfm import compat
from fastfm.registry import Registry

from .spec import ExportError, TensorSlot

Runner = Callable[[list[Tensor]], list[Tensor]]
ONNX_OPSET = 18
ORT_LOG_ERRORS = 3  # onnxruntime's log severity: 3 = errors and fatal only
STAMP = "fastfm.engine"
"""The key (ONNX metadata, AOTInductor package metadata, torch.export extra file) of an engine file's stamp."""
# CPU: weights frozen as constants (prepacked for oneDNN), and batch-1 GEMVs as inductor-generated
# reductions (multi-threaded) rather than single-threaded BLAS calls; larger batches keep BLAS GEMMs.
AOTI_CPU_CONFIGS = {"freezing": True, "post_grad_fusion_options": {"decompose_mm_pass": {}}}


def _require(backend: str, modules: tuple[str, ...], hint: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"backend {backend!r} needs {hint}; missing: {', '.join(missing)}")


def check_available(name: str, device: torch.device, dtype: str = "fp32") -> None:
    """Raise ExportError naming an unknown backend, the missing package or device, before anything is built."""
    backend(name)
    if name == "onnx":
        _require("onnx", ("onnx", "onnxscript", "onnxruntime"),
                 "the onnx, onnxscript and onnxruntime packages (pip install 'fastfm[export]')")
        if dtype == "bf16" and device.type == "cpu":
            raise ExportError("onnxruntime's CPU execution provider has no bf16 kernels (Gemm, Conv): build bf16 "
                              "ONNX engines on a CUDA device, or use --backend aoti on CPU")
    if name == "tensorrt":
        _require("tensorrt", ("torch_tensorrt",),
                 "the torch-tensorrt package (pip install torch-tensorrt) and a CUDA GPU")
    if name in ("tensorrt", "cudagraph") and device.type != "cuda":
        raise ExportError(f"backend {name!r} needs a CUDA GPU (the engine device is {device})")


@contextmanager
def _loading(loader: str, path: Path) -> Iterator[None]:
    """Any failure of ``loader`` to read the engine file ``path`` (a corrupt or incompatible engine) as one
    ExportError line naming it."""
    try:
        yield
    except Exception as e:  # each loader raises its own exception types
        lines = str(e).strip().splitlines()
        reason = lines[0] if lines else type(e).__name__
        raise ExportError(f"{loader} cannot load the engine file {path}: {reason}") from None


class Loaded(NamedTuple):
    """A loaded engine file: its runner and the stamp it carries (None: none)."""

    run: Runner
    stamp: str | None


def _build_aoti(ep: torch.export.ExportedProgram, example: list[Tensor], path: Path, names: list[str],
                stamp: str) -> None:
    configs = AOTI_CPU_CONFIGS if example[0].device.type == "cpu" else {}
    compat.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=configs, metadata={STAMP: stamp})


def _load_aoti(path: Path, inputs: list[TensorSlot], outputs: list[TensorSlot], device: torch.device) -> Loaded:
    with _loading("AOTInductor", path):
        module = compat.aoti_load_package(str(path), device_index=-1 if device.index is None else device.index)
    return Loaded(lambda xs: list(module(*xs)), module.get_metadata().get(STAMP))


def _build_onnx(ep: torch.export.ExportedProgram, example: list[Tensor], path: Path, names: list[str],
                stamp: str) -> None:
    """ONNX with the engine's input and output names; onnxruntime optimises the graph when it loads it
    (onnxscript's optimizer takes tens of minutes on graphs of a few 10k nodes)."""
    program = torch.onnx.export(ep, tuple(example), dynamo=True, opset_version=ONNX_OPSET, optimize=False,
                                input_names=names[:len(example)], output_names=names[len(example):], verbose=False)
    program.model.metadata_props[STAMP] = stamp
    program.save(str(path))


def _load_onnx(path: Path, inputs: list[TensorSlot], outputs: list[TensorSlot], device: torch.device) -> Loaded:
    import numpy as np
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ExportError("this ONNX engine was built for CUDA, but onnxruntime has no CUDAExecutionProvider "
                              "(pip install onnxruntime-gpu)")
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    options = ort.SessionOptions()
    options.log_severity_level = ORT_LOG_ERRORS
    with _loading("onnxruntime", path):
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    in_names = [i.name for i in session.get_inputs()]
    out_names = [o.name for o in session.get_outputs()]
    np_dtype = {torch.float32: np.float32, torch.int64: np.int64}
    dev_type, dev_id = device.type, device.index or 0

    def run(xs: list[Tensor]) -> list[Tensor]:
        binding = session.io_binding()
        xs = [x.contiguous() for x in xs]
        for name, x in zip(in_names, xs):
            binding.bind_input(name, dev_type, dev_id, np_dtype[x.dtype], list(x.shape), x.data_ptr())
        ys = [torch.empty(o.shape, dtype=torch.float32, device=device) for o in outputs]
        for name, y in zip(out_names, ys):
            binding.bind_output(name, dev_type, dev_id, np.float32, list(y.shape), y.data_ptr())
        session.run_with_iobinding(binding)
        return ys

    return Loaded(run, session.get_modelmeta().custom_metadata_map.get(STAMP))


def _build_tensorrt(ep: torch.export.ExportedProgram, example: list[Tensor], path: Path, names: list[str],
                    stamp: str) -> None:
    import torch_tensorrt

    module = torch_tensorrt.dynamo.compile(ep, arg_inputs=example)
    # extra_files: a keyword of recent Torch-TensorRT releases' save (not run here: no TensorRT on these machines);
    # an older release rejects the keyword at build, or ignores it and loading then refuses the unstamped engine
    torch_tensorrt.save(module, str(path), output_format="exported_program", arg_inputs=example,
                        extra_files={STAMP: stamp})


def _load_exported(path: Path) -> tuple[torch.nn.Module, str | None]:
    """The program of a torch.export archive as a module, and its stamp."""
    extra = {STAMP: ""}
    with _loading("torch.export", path):
        module = torch.export.load(str(path), extra_files=extra).module()
    return module, extra[STAMP] or None


def _load_tensorrt(path: Path, inputs: list[TensorSlot], outputs: list[TensorSlot], device: torch.device) -> Loaded:
    check_available("tensorrt", device)
    importlib.import_module("torch_tensorrt")  # registers the TensorRT engine ops the saved program calls
    module, stamp = _load_exported(path)
    return Loaded(lambda xs: list(module(*xs)), stamp)


def _build_exported(ep: torch.export.ExportedProgram, example: list[Tensor], path: Path, names: list[str],
                    stamp: str) -> None:
    torch.export.save(ep, str(path), extra_files={STAMP: stamp})


def _load_cudagraph(path: Path, inputs: list[TensorSlot], outputs: list[TensorSlot], device: torch.device) -> Loaded:
    """Compile the program, capture one call in a CUDA graph; a call copies into the static inputs
    and replays it."""
    check_available("cudagraph", device)
    module, stamp = _load_exported(path)
    fn = torch.compile(module, fullgraph=True, dynamic=False)
    static = [torch.zeros(i.shape, dtype=i.torch_dtype, device=device) for i in inputs]
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up (compilation, autotuning) outside the capture
        for _ in range(3):
            fn(*static)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = list(fn(*static))

    def run(xs: list[Tensor]) -> list[Tensor]:
        for s, x in zip(static, xs):
            s.copy_(x)
        graph.replay()
        return [y.clone() for y in static_out]

    return Loaded(run, stamp)


@dataclass(frozen=True)
class Backend:
    """How one backend writes its engine file (with a stamp) and loads it back."""

    name: str
    filename: str
    build: Callable[[torch.export.ExportedProgram, list[Tensor], Path, list[str], str], None]  # names: in, out
    load: Callable[[Path, list[TensorSlot], list[TensorSlot], torch.device], Loaded]


ENGINE_BACKENDS: Registry[Backend] = Registry("backend")
for _backend, _help in [
        (Backend("aoti", "engine.pt2", _build_aoti, _load_aoti), "AOTInductor package (CPU and CUDA)"),
        (Backend("onnx", "engine.onnx", _build_onnx, _load_onnx), "ONNX opset 18 run by onnxruntime (CPU, CUDA)"),
        (Backend("tensorrt", "engine.ep", _build_tensorrt, _load_tensorrt), "torch-tensorrt engine (CUDA)"),
        (Backend("cudagraph", "program.pt2", _build_exported, _load_cudagraph),
         "torch.compile of the exported program captured in one CUDA graph (CUDA)")]:
    ENGINE_BACKENDS.register(_backend.name, _help, lambda b=_backend: b)


def backend(name: str) -> Backend:
    """The registered engine backend ``name``; ExportError naming the known ones otherwise."""
    try:
        return ENGINE_BACKENDS.build(name)
    except ValueError as e:
        raise ExportError(str(e)) from None


def versions(backend: str) -> dict[str, str]:
    """Versions of torch and of the backend's packages, for the manifest."""
    names = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "tensorrt": ("torch_tensorrt", "tensorrt")}
    out = {"torch": torch.__version__}
    for name in names.get(backend, ()):
        module = __import__(name)
        out[name] = getattr(module, "__version__", "unknown")
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out
