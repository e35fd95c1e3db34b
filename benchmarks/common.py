"""Shared helpers of the benchmarks: timing (warm-up, median, device sync), peak memory, host syncs, the
commands a results folder was grown by."""

from __future__ import annotations

import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


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


# Operators that make the host wait for the device on CUDA (seen on any device, so a CPU
# run can count them): reading a value, data-dependent output sizes, linear-algebra error
# checks, and tensors built from host data (a blocking host-to-device copy on a GPU).
HOST_SYNC_OPS = {
    "aten::_local_scalar_dense": ".item() / bool() / float() of a tensor",
    "aten::is_nonzero": "bool() of a tensor",
    "aten::equal": "torch.equal",
    "aten::nonzero": "data-dependent size (nonzero, boolean indexing)",
    "aten::masked_select": "data-dependent size",
    "aten::_unique2": "data-dependent size",
    "aten::unique_dim": "data-dependent size",
    "aten::unique_consecutive": "data-dependent size",
    "aten::_linalg_eigh": "eigh checks its error flag on the host",
    "aten::_linalg_svd": "svd checks its error flag on the host",
    "aten::linalg_inv_ex": "inverse error flag",
    "aten::lift_fresh": "torch.tensor(host data): a blocking host-to-device copy on GPU",
    "aten::lift_fresh_copy": "torch.tensor(host data): a blocking host-to-device copy on GPU",
}


class HostSyncAudit(TorchDispatchMode):
    """Count the operators of ``HOST_SYNC_OPS`` that run inside the context (backward too).

    Example:
        >>> with HostSyncAudit() as audit:
        ...     _ = float(torch.ones(2).sum())
        >>> dict(audit.calls)
        {'aten::_local_scalar_dense': 1}
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in HOST_SYNC_OPS:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def commands_run(meta: dict, command: str) -> list[str]:
    """Every command that added runs to a results folder, oldest first (a folder grows run by run).

    Example:
        >>> commands_run({"command": "a"}, "b"), commands_run({"commands": ["a", "b"]}, "b")
        (['a', 'b'], ['a', 'b'])
    """
    commands = list(meta.get("commands", [meta["command"]] if "command" in meta else []))
    return commands if commands and commands[-1] == command else [*commands, command]
