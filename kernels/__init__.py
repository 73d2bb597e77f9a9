"""Fused kernels, installed as ``fastfm.kernels``: the affine path op and the CFM loss.

``ops`` registers them as torch.library custom ops dispatched by device (Triton on CUDA, the C++
extension on CPU, the plain-PyTorch ``reference`` spec on request); ``rng`` holds the noise state
every backend reads; ``targets`` compiles every Triton launch for a GPU target without a GPU.
"""
