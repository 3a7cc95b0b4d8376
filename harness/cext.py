"""Builds the harness's small C++ kernels once per machine and loads them with ctypes.

    python -c "from harness import metrics_fused; print(metrics_fused.available())"

A kernel's source, harness/csrc/<name>.cpp with the headers there (exp_f32.h: the float32 exps and the
OpenMP row split; topk.h: the running top-k lists), is compiled with g++ -O3 -fopenmp, `-march=native`
first (AVX-512 where the compiler and CPU have it; softmax_filter also has 8-lane AVX2 paths for CPUs without it),
else portable, into `$HARNESS_HOME/ext/<name>_<hash>.so`.
The hash covers the sources, the flags and the CPU's identity, since `-march=native` code is only valid on
the CPU it was built for. No -ffast-math: the kernels' -inf and NaN masks and compensated sums need IEEE semantics.
Each kernel splits its rows over an OpenMP team of torch.get_num_threads() threads inside one ctypes
call (ctypes drops the GIL): libgomp's threads wait spinning between calls, so a call costs ~5 µs of
threading where a Python thread pool's hand-off cost ~85 µs here.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

from harness import paths

CSRC = Path(__file__).parent / "csrc"  # each kernel's <name>.cpp and the headers they share


def cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor()
    return "".join(line for line in info.splitlines() if line.startswith(("model name", "flags")))[:4096]


def source(name: str) -> str:
    """The text a kernel's build depends on: csrc/<name>.cpp and every header in csrc (each kernel includes them)."""
    return "".join(f.read_text() for f in [CSRC / f"{name}.cpp", *sorted(CSRC.glob("*.h"))])


def build_flags() -> list[list[str]]:
    """The g++ flags to try, in order. HARNESS_CEXT_PORTABLE=1 skips -march=native (the scalar code paths, as a CPU
    without AVX2 runs them); =avx2 builds for AVX2 and FMA without AVX-512 (the 8-lane paths a Zen 2 or 3 runs), on any
    CPU that has those: how the tests reach each path on a machine whose native build takes another."""
    portable = os.environ.get("HARNESS_CEXT_PORTABLE", "")
    if portable == "1":
        return [[]]
    if portable == "avx2":
        return [["-mavx2", "-mfma", "-mno-avx512f"]]
    if portable not in ("", "0"):
        raise RuntimeError(f"HARNESS_CEXT_PORTABLE={portable!r}: expected 1 (scalar builds), avx2 (AVX2 and FMA, no "
                           "AVX-512), or 0 or unset (-march=native)")  # fmt: skip
    return [["-march=native"], []]


def build(name: str) -> ctypes.CDLL:
    """csrc/<name>.cpp built and loaded; RuntimeError where g++ is missing or every build fails."""
    if shutil.which("g++") is None:
        raise RuntimeError(f"the {name} kernel needs g++ on PATH")
    text = source(name)
    errors = []
    for flags in build_flags():
        tag = hashlib.sha256((text + " ".join(flags) + cpu_identity()).encode()).hexdigest()[:16]
        so = paths.home() / "ext" / f"{name}_{tag}.so"
        if not so.exists():
            so.parent.mkdir(parents=True, exist_ok=True)
            tmp = so.with_suffix(f".{os.getpid()}.tmp")
            cmd = ["g++", "-O3", "-fopenmp", *flags, "-shared", "-fPIC", "-I", str(CSRC), str(CSRC / f"{name}.cpp"), "-o", str(tmp)]
            run = subprocess.run(cmd, text=True, capture_output=True)
            if run.returncode:
                errors.append(run.stderr[-2000:])
                continue
            tmp.replace(so)
        return ctypes.CDLL(str(so))
    raise RuntimeError(f"building the {name} kernel failed:\n" + "\n".join(errors))


def why_not(load) -> str | None:
    """None where `load()` (a kernel module's cached loader) builds and loads here, else why not, in a line."""
    try:
        load()
    except (RuntimeError, OSError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None
