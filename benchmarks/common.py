"""Shared timing helpers for the benchmarks: warm-up, repeated runs, median, device sync."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` (device-synchronised), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(fn: Callable[[], object], device: torch.device, resident_bytes: int = 0) -> float:
    """Peak allocated memory (bytes) during one call of ``fn``.

    CUDA: the allocator's peak, which counts what was resident before the call. CPU: the
    peak of the running sum of the allocations and frees that the PyTorch profiler records
    during the call, plus ``resident_bytes`` (what was allocated before: weights, optimizer
    state, the batch), so both devices measure the same quantity.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return float(resident_bytes + peak)


def tensor_bytes(*collections: object) -> int:
    """Bytes of the distinct tensors found in (nested) lists, tuples, dicts and modules."""
    seen: dict[int, int] = {}

    def visit(item: object) -> None:
        if isinstance(item, torch.Tensor):
            seen[item.data_ptr()] = item.numel() * item.element_size()
        elif isinstance(item, torch.nn.Module):
            for tensor in [*item.parameters(), *item.buffers()]:
                visit(tensor)
        elif isinstance(item, dict):
            for value in item.values():
                visit(value)
        elif isinstance(item, list | tuple):
            for value in item:
                visit(value)

    for collection in collections:
        visit(collection)
    return sum(seen.values())


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{name}; torch {torch.__version__}"
