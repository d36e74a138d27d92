"""Timing and peak-memory helpers shared by the benchmark scripts."""

import resource
import time

import torch


def synchronize(device: str):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn, repeats: int, device: str = "cpu", warmup: bool = True) -> float:
    """Best wall time of `repeats` calls of `fn`, after one warm-up call (`warmup`)."""
    if warmup:
        fn()
        synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def peak_memory_baseline(device: str) -> int:
    """Start a peak-memory measurement: CUDA peak stats are reset; on CPU the peak resident set so far is returned."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_since(device: str, baseline: int) -> int:
    """Bytes of peak memory above `baseline` (CPU: growth of the peak resident set, so measure in a fresh process)."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() - baseline
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline


def write_results(path: str, payload: dict):
    """Write a benchmark's results as JSON (with the torch version) and say where."""
    import json
    import os

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({**payload, "torch": torch.__version__}, f, indent=2)
    print(f"wrote {path}")
