"""Builds the harness's small C++ kernels once per machine and loads them with ctypes.

    python -c "from harness import metrics_fused; print(metrics_fused.available())"

A kernel's source is compiled with g++ -O3, `-march=native` first (AVX-512 where the compiler and
CPU have it), else portable, into `$HARNESS_HOME/ext/<name>_<hash>.so`. The hash covers the source,
the flags and the CPU's identity, since `-march=native` code is only valid on the CPU it was built
for. No -ffast-math: the kernels' -inf and NaN masks and compensated sums need IEEE semantics.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess

from harness import paths


def cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor()
    return "".join(line for line in info.splitlines() if line.startswith(("model name", "flags")))[:4096]


def build(name: str, source: str) -> ctypes.CDLL:
    """The loaded library; RuntimeError where g++ is missing or every build fails."""
    if shutil.which("g++") is None:
        raise RuntimeError(f"the {name} kernel needs g++ on PATH")
    errors = []
    # HARNESS_CEXT_PORTABLE=1 skips -march=native: how the tests reach the scalar code paths
    portable = os.environ.get("HARNESS_CEXT_PORTABLE") == "1"
    for flags in ([],) if portable else (["-march=native"], []):
        tag = hashlib.sha256((source + " ".join(flags) + cpu_identity()).encode()).hexdigest()[:16]
        so = paths.home() / "ext" / f"{name}_{tag}.so"
        if not so.exists():
            so.parent.mkdir(parents=True, exist_ok=True)
            tmp = so.with_suffix(f".{os.getpid()}.tmp")
            cmd = ["g++", "-O3", *flags, "-shared", "-fPIC", "-x", "c++", "-", "-o", str(tmp)]
            run = subprocess.run(cmd, input=source, text=True, capture_output=True)
            if run.returncode:
                errors.append(run.stderr[-2000:])
                continue
            tmp.replace(so)
        return ctypes.CDLL(str(so))
    raise RuntimeError(f"building the {name} kernel failed:\n" + "\n".join(errors))
