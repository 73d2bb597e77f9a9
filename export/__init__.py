"""Export layer, installed as ``fastfm.export``: a trained model and a fixed-step solver unrolled
into one engine (AOTInductor, ONNX, TensorRT, or a CUDA-graph runner) for sampling or likelihoods.

    python -m fastfm.export --checkpoint RUN --task sample --solver midpoint --steps 16 --batch 1 \\
        --backend aoti --out engines/sample
    engine = fastfm.export.load("engines/sample")
    result = engine(torch.randn(1, 2))        # EngineResult(x, log_prob, bits_per_dim, nfe)
"""

from .backends import ENGINE_BACKENDS
from .build import export_engine
from .engine import Engine, EngineResult, load
from .manifest import ManifestError
from .sampler import EngineSampler
from .spec import DTYPES, TASKS, EngineRequest, EngineSpec, ExportError

__all__ = ["DTYPES", "ENGINE_BACKENDS", "TASKS", "Engine", "EngineRequest", "EngineResult", "EngineSampler",
           "EngineSpec", "ExportError", "ManifestError", "export_engine", "load"]
