"""Skip marker for tests that run ``torch.compile`` (C++ kernels on the CPU)."""

import os
import shutil
import sysconfig
from pathlib import Path

import pytest


def cpu_compiler_available() -> bool:
    """torch.compile on the CPU builds C++ kernels: it needs a C++ compiler and Python's headers."""
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++")
    headers = Path(sysconfig.get_paths()["include"], "Python.h").exists()
    return bool(compiler) and headers


needs_torch_compile = pytest.mark.skipif(
    not cpu_compiler_available(), reason="torch.compile on the CPU needs a C++ compiler and Python headers"
)
