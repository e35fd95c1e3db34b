"""Several CPU processes asked of ``accelerate launch`` but one started: said, not trained on silently.

The recipes and ``SaliencyDecorTrainer`` call ``check_cpu_launch()`` before building anything.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["check_cpu_launch"]

# What a launcher of several processes sets in each of them (torchrun / accelerate's GPU launcher, MPI).
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")


def check_cpu_launch(environ: Any = None) -> None:
    """Refuse ``accelerate launch --cpu --num_processes N`` (N > 1) without MPI: it starts one process.

    accelerate's launcher starts several CPU processes only through ``mpirun`` (``accelerate config``
    with an MPI hostfile); otherwise it runs the script once with ``MASTER_ADDR`` set, and the run
    would train alone on the batch of one process without saying so.

    Example:
        >>> check_cpu_launch({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"})
        Traceback (most recent call last):
        ...
        RuntimeError: accelerate launch --cpu --num_processes N started a single process ...
        >>> check_cpu_launch({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"})
    """
    environ = os.environ if environ is None else environ
    on_cpu = str(environ.get("ACCELERATE_USE_CPU", "")).lower() in ("1", "true", "yes")
    if on_cpu and environ.get("MASTER_ADDR") and not any(environ.get(v) for v in _WORLD_SIZE_VARIABLES):
        raise RuntimeError(
            "accelerate launch --cpu --num_processes N started a single process (accelerate starts several CPU "
            "processes only through mpirun: `accelerate config` with an MPI hostfile). To run N CPU processes, "
            "launch with `ACCELERATE_USE_CPU=true torchrun --nproc_per_node N <script> ...`; for one process, "
            "drop --num_processes."
        )
