"""Fused kernels, installed as ``fastfm.kernels``: the affine path op and the CFM loss.

``ops`` registers them as torch.library custom ops dispatched by device (``triton_kernels`` on CUDA, the
C++ extension through ``cpu`` on CPU, the plain-PyTorch ``reference`` spec on request or where those are
missing) and owns their argument checks for every backend (``KernelArgumentError``); ``rng`` holds the
noise state every backend reads and normalises seeds; ``targets`` compiles every Triton launch for a GPU
target without a GPU. The bottom layer: nothing here imports the rest of fastfm (only its own
extension, ``fastfm._C``, built from csrc/).
"""
