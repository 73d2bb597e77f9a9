"""Shared benchmark helpers: bytes moved per op, so every result also reports GB/s."""

from __future__ import annotations

import platform

import pytest
import torch

from fastfm import hardware


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["processor"] = platform.processor() or platform.machine()
    machine_info["hardware"] = hardware.capabilities("cpu").to_json()


@pytest.fixture
def record_bandwidth(benchmark):
    """After a benchmark ran, store bytes moved and GB/s (from the median time) in its extra_info."""
    def record(nbytes: int, **info: object) -> None:
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(bytes=nbytes, gb_per_s=nbytes / median / 1e9, **info)
    return record
