"""Speed of the per-position drift metrics on [N, 151646] float32 pairs, beside the read ceiling.

    python -m harness.metrics_bench [--rows 512] [--repeats 3] [--ceiling-gib 1]

Times (a) the pure-Python dict approach users copy (softmax rows to `{token: p}` dicts, KL and top-1
from the dicts) on a few rows, (b) `metrics.position_metrics` (every per-position metric at once, in
float64 torch ops) and (c) the fused C++ kernel of `metrics_fused`, over blocks of the rows `harness
compare` uses for each (`compare.BLOCK`, `compare.FUSED_BLOCK`); (d) the same kernel on the rows as a
float16 store holds them (what `harness compare` hands it, memory-mapped). GB/s counts the two rows read
per position (float32; float16 for (d)). Each implementation reports the median of its repeats and its best
(the kernels repeat at least 10 times), each as a fraction of the read ceiling measured around it: the
better of two short measurements just before and just after it (bench.Probe, bench.NEAR_GIB), since this
shared VM's memory runs in phases (43-45 GB/s for minutes, then 75-80) that a single ceiling from another
moment would misjudge by up to 1.8x. The run's ceiling, the best of every measurement (a --ceiling-gib
torch.sum, 10 repeats, before and after the timings, and the near ones), is reported beside it with each
implementation's fraction of it. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

from harness import bench, compare, metrics, metrics_fused

WIDTH = 151646


def dict_approach(ref: torch.Tensor, cand: torch.Tensor) -> tuple[list[float], list[bool]]:
    """What users copy: Python dicts of probabilities, KL and top-1 token by token."""
    kls, agree = [], []
    for a, b in zip(torch.softmax(ref, -1).tolist(), torch.softmax(cand, -1).tolist(), strict=True):
        p = {i: x for i, x in enumerate(a) if x > 0}
        q = {i: x for i, x in enumerate(b) if x > 0}
        kls.append(sum(x * math.log(x / q[i]) for i, x in p.items() if i in q))
        agree.append(max(p, key=p.get) == max(q, key=q.get))
    return kls, agree


def _rates(fn, rows: int, repeats: int) -> tuple[float, float]:
    """(median, best) calls of fn() per second, times `rows`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return rows / statistics.median(times), rows / min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ceiling-gib", type=float, default=1.0, help="size of the buffer the read ceiling sums")
    args = parser.parse_args(argv)
    ref = torch.log_softmax(bench.realistic_logits(args.rows, WIDTH, seed=1), -1)
    cand = torch.log_softmax(ref + 0.05 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)), -1)
    target = torch.randint(0, WIDTH, (args.rows,), generator=torch.Generator().manual_seed(3))
    cpu = torch.device("cpu")
    read_gbps = [bench.ceilings(cpu, args.ceiling_gib, 10).read_gbps]
    near = bench.Probe(cpu, min(args.ceiling_gib, bench.NEAR_GIB))
    probes = [near.measure(bench.NEAR_REPEATS).read_gbps]  # between implementations: each takes the better of its two

    def timed(*rates_args) -> tuple[float, float, float]:
        rate, best = _rates(*rates_args)
        probes.append(near.measure(bench.NEAR_REPEATS).read_gbps)
        return rate, best, max(probes[-2:])

    def blocks(fn, n=compare.BLOCK):
        def run():
            for s in range(0, args.rows, n):
                fn(ref[s : s + n], cand[s : s + n], target[s : s + n])

        return run

    few, fast = min(args.rows, 8), max(args.repeats, 10)
    results = {
        "dict": timed(lambda: dict_approach(ref[:few], cand[:few]), few, 1),
        "position_metrics": timed(blocks(metrics.position_metrics), args.rows, args.repeats),
    }
    if metrics_fused.available() is None:
        metrics_fused.fused_position_metrics(ref[:2], cand[:2], target[:2])  # builds the kernel once
        results["fused"] = timed(blocks(metrics_fused.fused_position_metrics, compare.FUSED_BLOCK), args.rows, fast)
        ref, cand = ref.half(), cand.half()  # as `harness compare` reads a float16 store: the rows as stored
        results["fused (float16 rows)"] = timed(blocks(metrics_fused.fused_position_metrics, compare.FUSED_BLOCK), args.rows, fast)
    read_gbps.append(bench.ceilings(cpu, args.ceiling_gib, 10).read_gbps)
    ceiling = max(read_gbps + probes)
    row_bytes = {"fused (float16 rows)": 2 * WIDTH * 2}
    print(f"read ceiling {ceiling:.1f} GB/s (before {read_gbps[0]:.1f}, after {read_gbps[1]:.1f}, near ones "
          f"{min(probes):.1f}-{max(probes):.1f}), threads {torch.get_num_threads()}")
    print(f"{'impl':<22} {'positions/s':>12} {'best':>9} {'GB/s':>7} {'near':>6} {'of near':>8} {'best of':>8} {'of run':>7} {'x dict':>8}")
    rows = []
    for impl, (rate, best, near_gbps) in results.items():
        gb = row_bytes.get(impl, 2 * WIDTH * 4) / 1e9  # GB read per position
        gbps = rate * gb  # fractions as positions/s * gb / ceiling: where best == rate, they are equal floats
        row = {"impl": impl, "positions_per_s": rate, "best_positions_per_s": best, "gbps": gbps, "near_read_gbps": near_gbps,
               "fraction_of_ceiling": gbps / near_gbps, "best_fraction_of_ceiling": best * gb / near_gbps,
               "fraction_of_run_ceiling": gbps / ceiling, "speedup_vs_dict": rate / results["dict"][0]}  # fmt: skip
        rows.append(row)
        print(f"{impl:<22} {rate:>12.1f} {best:>9.1f} {gbps:>7.2f} {near_gbps:>6.1f} {row['fraction_of_ceiling']:>8.1%} "
              f"{row['best_fraction_of_ceiling']:>8.1%} {row['fraction_of_run_ceiling']:>7.1%} {row['speedup_vs_dict']:>8.1f}")
    print(json.dumps({"read_ceiling_gbps": ceiling, "read_ceilings_gbps": read_gbps, "near_read_gbps": probes,
                      "threads": torch.get_num_threads(), "results": rows}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
