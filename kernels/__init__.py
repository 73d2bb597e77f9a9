"""Fused kernels (Triton on CUDA, C++ on CPU), installed as ``fastfm.kernels``.

Filled by the kernels issue; the engine uses the plain PyTorch reference ops until then.
"""
