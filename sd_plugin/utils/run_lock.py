"""One training run per output folder: a lock file that a second run on the same folder is refused by.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> import json, os
    >>> with output_dir_lock(folder):  # the lock file names the run holding it
    ...     sorted(json.loads(open(os.path.join(folder, LOCK_FILE)).read()))
    ['host', 'pid']
    >>> os.path.exists(os.path.join(folder, LOCK_FILE))  # released at the end of the run
    False

Another live process holding the folder's lock gets ``OutputDirInUseError``; the same process
may take it again (a recipe holds it around its data loading and the loop).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_FILE", "OutputDirInUseError", "output_dir_lock"]

LOCK_FILE = ".sd_plugin_run.lock"


class OutputDirInUseError(RuntimeError):
    """Another live run writes to this output folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _holder(lock: Path) -> dict | None:
    """The live run holding ``lock``, or None when the lock is stale (its process ended, or unreadable)."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
        return None
    return holder


@contextlib.contextmanager
def output_dir_lock(directory: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold ``directory/.sd_plugin_run.lock`` for the duration (a stale lock of an ended run is taken over)."""
    if not enabled:
        yield
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_FILE
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder == json.loads(record):  # this process holds it already (a recipe around its loop)
                yield
                return
            if holder is not None:
                raise OutputDirInUseError(
                    f"--output_dir {directory} is in use by another run (pid {holder.get('pid')} on "
                    f"{holder.get('host')}): two runs in one folder would overwrite each other's checkpoints and "
                    f"model. Use another --output_dir, or delete {lock} if no run uses it."
                ) from None
            lock.unlink(missing_ok=True)  # stale: its run ended without removing it
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(record)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
