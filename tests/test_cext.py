"""The C++ kernels' portable (scalar) builds, and softmax_filter's AVX2 build, give the same numbers as the references.

The rest of the suite runs the -march=native builds: AVX-512 where the CPU has it; on a CPU with AVX2 and FMA but no
AVX-512, softmax_filter's 8-lane loops and the other kernels' scalar code; without AVX2, the scalar code everywhere.
So each is checked here too, in subprocesses that build only those versions.
"""

import ctypes
import os
import subprocess
import sys

import pytest

from harness import cext

CHECK = r"""
import torch
from harness import bench, metrics, metrics_fused, row_stats, softmax_filter as sf
assert metrics_fused.available() is None and row_stats.available() is None and sf.kernel_isa() == "scalar"
gen = torch.Generator().manual_seed(0)
ref = torch.log_softmax(bench.realistic_logits(6, 151646, seed=1), -1)
cand = torch.log_softmax(ref + 0.05 * torch.randn(ref.shape, generator=gen), -1)
cand[1, 7] = -float("inf")
target = torch.randint(0, 151646, (6,), generator=gen)
got = metrics_fused.fused_position_metrics(ref, cand, target, ks=(1,))
want = metrics.position_metrics(ref, cand, target, ks=(1,))
for key in ("kl", "kl_rev", "js", "tv", "nll_ref", "nll_cand", "entropy_ref", "entropy_cand", "delta_p"):
    torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-12, msg=key)
assert torch.equal(got["top1_agree"], want["top1_agree"]) and torch.equal(got["ref_top_rank"], want["ref_top_rank"])
x = bench.realistic_logits(4, 151936, seed=2)
for flt in ("p>0", "top-k"):
    assert sf.same(sf.snippet(list(x.split(1))), sf.fused_cpu_filter(x, flt, 20), flt, 20, exact=torch.softmax(x.double(), -1)) is None, flt
raw = bench.realistic_logits(5, 151936, seed=3)
want, want_pad, want_lse = row_stats.reference(raw.double(), 151646)
for dtype in (torch.float32, torch.float16):  # float16: the torch fallback of a scalar build
    got, pad, lse, (top_v, top_i) = row_stats.row_stats(raw, 151646, torch.empty(5, 151646, dtype=dtype), top=50)
    assert torch.equal(top_v, raw.topk(50, dim=-1).values) and torch.equal(raw.gather(1, top_i), top_v)
    half = dtype == torch.float16  # one float16 step of rounding either way: 2^-10 relative
    torch.testing.assert_close(got.double(), want, rtol=2.0**-10 if half else 2.0**-22, atol=4e-6)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=0)
    torch.testing.assert_close(pad.double(), want_pad, rtol=1e-5, atol=1e-12)
print("portable ok")
"""


def test_portable_builds_match_the_references(tmp_path):
    env = {**os.environ, "HARNESS_CEXT_PORTABLE": "1", "HARNESS_HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "portable ok" in run.stdout
    assert len(list((tmp_path / "ext").glob("*.so"))) == 3  # built here, portable only


def test_portable_fused_metrics_pass_the_full_suite(tmp_path):
    """The scalar build of the fused metrics kernel (machines without AVX-512) held to every test of the vector one,
    and to test_independent's checks of the fused path against scipy and float64."""
    env = {**os.environ, "HARNESS_CEXT_PORTABLE": "1", "HARNESS_HOME": str(tmp_path)}
    here = os.path.dirname(__file__)
    files = [os.path.join(here, name) for name in ("test_metrics_fused.py", "test_independent.py")]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "fused", *files],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def test_portable_softmax_filter_passes_its_tests(tmp_path):
    """The scalar build of the fused softmax/filter kernel held to test_bench's fused-cpu tests (the row split and
    the in-place packing are shared by both builds)."""
    env = {**os.environ, "HARNESS_CEXT_PORTABLE": "1", "HARNESS_HOME": str(tmp_path)}
    here = os.path.dirname(__file__)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "fused", os.path.join(here, "test_bench.py")],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def _cpu_has(*flags: str) -> bool:
    return set(flags) <= set(cext.cpu_identity().split())


@pytest.mark.skipif(not _cpu_has("avx2", "fma"), reason="the CPU has no AVX2 and FMA")
def test_avx2_softmax_filter_passes_its_tests(tmp_path):
    """The 8-lane AVX2 build of the fused softmax/filter kernel (what a CPU with AVX2 and FMA but no AVX-512 runs, a
    Zen 2 or 3), built so on any CPU that has AVX2 (HARNESS_CEXT_PORTABLE=avx2), held to test_bench's fused-cpu tests."""
    env = {**os.environ, "HARNESS_CEXT_PORTABLE": "avx2", "HARNESS_HOME": str(tmp_path)}
    isa = subprocess.run([sys.executable, "-c", "from harness import softmax_filter as sf; print(sf.kernel_isa())"], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert isa.stdout.strip() == "avx2", isa.stderr[-3000:]
    here = os.path.dirname(__file__)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "fused", os.path.join(here, "test_bench.py")],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def test_an_unknown_portable_value_is_an_error(monkeypatch):
    monkeypatch.setenv("HARNESS_CEXT_PORTABLE", "yes")
    with pytest.raises(RuntimeError, match="HARNESS_CEXT_PORTABLE='yes': expected 1"):
        cext.build_flags()
    for value, want in (("1", [[]]), ("avx2", [["-mavx2", "-mfma", "-mno-avx512f"]]), ("0", [["-march=native"], []])):
        monkeypatch.setenv("HARNESS_CEXT_PORTABLE", value)
        assert cext.build_flags() == want


def test_a_header_edit_rebuilds_the_kernels_that_include_it(tmp_path, monkeypatch):
    """A kernel's build is keyed by its .cpp and the headers beside it: editing a header must not load a stale .so.
    A compile error is a RuntimeError naming the kernel, with g++'s message."""
    src = tmp_path / "csrc"
    src.mkdir()
    monkeypatch.setattr(cext, "CSRC", src)
    monkeypatch.setenv("HARNESS_HOME", str(tmp_path / "home"))
    (src / "k.cpp").write_text('#include "h.h"\nextern "C" int value() { return VALUE; }\n')
    values = []
    for v in (1, 2):
        (src / "h.h").write_text(f"#pragma once\n#define VALUE {v}\n")
        lib = cext.build("k")
        lib.value.restype = ctypes.c_int
        values.append(lib.value())
    assert values == [1, 2]
    (src / "k.cpp").write_text('extern "C" int value() { return undefined_name; }\n')
    try:
        cext.build("k")
    except RuntimeError as e:
        assert "building the k kernel failed" in str(e) and "undefined_name" in str(e)
    else:
        raise AssertionError("a kernel that does not compile was loaded")
