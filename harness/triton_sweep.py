"""Times triton_filter's launch settings on a CUDA device, against the read ceiling measured in the same run.

    python3 -m harness.triton_sweep --json sweep.json
    python3 -m harness.bench --device cuda --triton-settings sweep.json

For each case (raw/warped rows, float32/bfloat16, p > 0 / top-20; --only picks some), on Qwen1.5-wide rows
(harness.bench's inputs), in phases over all cases (see main): the defaults against each filter's other ways,
then columns per tile ("block") x warps, then widths and maxnreg, all at batch 4096, then programs per
multiprocessor ("waves") at batch 256. Each time is triton.testing.do_bench's median (CUDA events, the L2
cleared before each call); calls of batch 256 take successive slices of the 4096 rows, so they are read from
memory. Each new setting compiles its kernels (5-10 s on an H200's host), so all of it takes over 10
minutes; the sweep starts no timing after --seconds (300). Prints each timing and the best settings per case;
--json writes them all, in the form `harness bench --triton-settings` reads.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch

from harness import bench
from harness import softmax_filter as sf

DEVICE, ROWS = "cuda", 4096  # (tests run the sweep's logic on the CPU with fakes of the timer and the kernels)
# p > 0 first: no sweep has reached it yet (the first one ran out of time after top-k)
CASES = [("warped", "float32", "p>0"), ("raw", "float32", "top-k"), ("warped", "bfloat16", "p>0"), ("raw", "bfloat16", "top-k"),
         ("raw", "float32", "p>0"), ("raw", "bfloat16", "p>0")]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    import triton
    from triton.testing import do_bench

    p = argparse.ArgumentParser(prog="python3 -m harness.triton_sweep", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=300.0, help="start no timing after this many seconds")
    p.add_argument("--json", default=None, help="write every timing here")
    p.add_argument("--only", default="", help="only the cases whose 'inputs dtype filter' contains this, e.g. 'top-k'")
    a = p.parse_args(argv)
    dev, t0 = torch.device(DEVICE), time.monotonic()
    ceil = bench.ceilings(dev, 2.0, 10)
    print(f"{torch.cuda.get_device_name(dev)}: read {ceil.read_gbps:.0f} GB/s (median {ceil.read_median_gbps:.0f}), "
          f"copy {ceil.copy_gbps:.0f}, write {ceil.write_gbps:.0f}; torch {torch.__version__}, triton {triton.__version__}", flush=True)  # fmt: skip
    raw = bench.realistic_logits(ROWS)
    rows = {"raw": raw, "warped": bench.warp(raw[:64]).repeat(ROWS // 64, 1)}
    out: list[dict] = []
    on_device: dict[tuple[str, str], torch.Tensor] = {}  # each input set copied to the GPU once

    def save() -> None:  # after every timing: a sweep stopped by a timeout or a GPU fault keeps what it measured
        if a.json:
            tmp = f"{a.json}.tmp"
            with open(tmp, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(dev), "read_ceiling_gbps": ceil.read_gbps,
                           "copy_ceiling_gbps": ceil.copy_gbps, "results": out, "best": best}, f)  # fmt: skip
            os.replace(tmp, a.json)

    def time_it(kind: str, dtype: str, filter: str, batch: int, **cfg) -> float | None:
        nonlocal on_device
        if time.monotonic() - t0 > a.seconds:
            return None
        try:
            if (kind, dtype) not in on_device:
                on_device = {(kind, dtype): rows[kind].to(dev, bench.DTYPES[dtype])}  # one set at a time: 2.5 GB in float32
            x = on_device[(kind, dtype)]
            # a setting is timed only where its output is right (bench.output_differs): none may have run here before
            differs = bench.output_differs(sf.triton_filter(x[:batch], filter, bench.TOP_K, **cfg), x[:batch], filter)
            if differs:
                print(f"  {kind} {dtype} {filter} {batch} {cfg}: not timed, its output differs from the snippet's: {differs}", flush=True)
                out.append({"inputs": kind, "dtype": dtype, "filter": filter, "batch": batch, **cfg, "wrong": differs})
                save()
                return None
            slices = itertools.cycle(x[s : s + batch] for s in range(0, len(x), batch))
            ms = do_bench(lambda: sf.triton_filter(next(slices), filter, bench.TOP_K, **cfg), warmup=5, rep=40,
                                         return_mode="median")  # fmt: skip
        except Exception as e:  # noqa: BLE001 -- a setting that does not compile or run is reported, not fatal
            print(f"  {kind} {dtype} {filter} {batch} {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
            return None
        gbps = batch * x.shape[1] * x.element_size() / ms / 1e6
        out.append({"inputs": kind, "dtype": dtype, "filter": filter, "batch": batch, **cfg, "ms": ms, "gbps": gbps,
                    "fraction_of_ceiling": gbps / ceil.read_gbps})  # fmt: skip
        print(f"  {kind:>6} {dtype:>8} {filter:>5} {batch:>5} {json.dumps(cfg):<70} {ms:8.3f} ms {gbps:7.0f} GB/s "
              f"{gbps / ceil.read_gbps:5.0%}", flush=True)  # fmt: skip
        return ms

    cases = [c for c in CASES if a.only in " ".join(c)]
    best: dict[str, dict] = {}  # "inputs dtype filter batch" -> the fastest settings so far and their ms

    def better(case: tuple[str, str, str], batch: int, cfg: dict) -> None:  # times cfg; kept where it beats the best
        key = f"{' '.join(case)} {batch}"
        ms = time_it(*case, batch, **cfg)
        if ms is not None and (key not in best or ms < best[key]["ms"]):
            best[key] = {**cfg, "ms": ms}
        if ms is not None:
            save()

    def at(case: tuple[str, str, str]) -> dict:  # the best settings at batch 4096 so far
        return {k: v for k, v in best.get(f"{' '.join(case)} 4096", {}).items() if k != "ms"}

    # In phases over all cases, so that a short run still gets the comparison that matters most:
    # 1. the defaults against each filter's other ways (top-k's bisection and contiguous tiles, p > 0's capture a
    #    part);
    # 2. in the faster way, columns per tile x warps (the first sweep found 8192 columns and 16 warps far slower);
    # 3. top-k's separate `top` kernel (fuse False) and group, or p > 0's row width; maxnreg=128 (two programs a
    #    multiprocessor at 8 warps);
    # 4. at batch 256, programs per multiprocessor.
    for case in cases:
        better(case, 4096, {})
        ways = ([{"select": "bisect"}, {"tile": "contiguous"}, {"select": "bisect", "tile": "contiguous"}] if case[2] == "top-k"
                else [{"capture": "part"}])  # fmt: skip
        for way in ways:
            better(case, 4096, way)
    for case in cases:
        mode = at(case)
        for block, warps in itertools.product((1024, 2048, 4096), (4, 8)):
            better(case, 4096, {**mode, "block": block, "warps": warps})
    for case in cases:
        widths = [{"fuse": False}, {"group": 32}, {"group": 128}] if case[2] == "top-k" else [{"row": 128}, {"row": 512}]
        for extra in [*widths, {"maxnreg": 128}]:
            better(case, 4096, {**at(case), **extra})
    for case in cases:
        for waves in (2, 4, 8):
            better(case, 256, {**at(case), "waves": waves})
    print("best per case (ms is the median of do_bench):")
    for case, cfg in best.items():
        print(f"  {case:<32} {json.dumps(cfg)}")
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
