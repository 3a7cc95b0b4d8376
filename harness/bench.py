"""Throughput of the softmax/filter step: logits rows -> sparse probabilities, against the memory ceiling.

    python -m harness.bench --quick
    python -m harness.bench --batches 1,16,256,4096 --dtypes float32,bfloat16 --repeats 5

Inputs are Qwen1.5-wide rows (V = 151936) of realistic logits: a heavy-tailed body plus a few large
logits (entropy 1.4 nats on average), and the same rows after a Qwen1.5-Chat generation config's warpers
(transformers' TopKLogitsWarper(20) then TopPLogitsWarper(0.8): all but a handful -inf). Each
implementation of harness.softmax_filter is timed per (batch, dtype, inputs, filter): CUDA events after
warm-up on CUDA, time.perf_counter on CPU; medians over at least --repeats calls and 0.3 s, with the
interquartile range, min and max. Successive calls take successive batches of an input set of
max(--batches) rows and at least INPUT_MIB of float32 rows, so a small batch is read from memory as the
ceiling's buffer is, not from the cache its previous call left (16 rows are 10 MB). The ceilings are
measured in the same run: read GB/s of a torch.sum over a buffer much larger than the last-level cache,
copy GB/s (bytes of the source copied per second) and write GB/s (a fill). A shared machine's memory
runs in phases (here 43-45 GB/s for minutes, then 75-80), so each case is held against its own ceilings
("near"): the better of two short measurements (NEAR_GIB, NEAR_REPEATS), just before and just after it.
The run's ceilings, in the header and the JSON, are the best of everything measured: at least 10 repeats
over a --ceiling-gib buffer at the start and at the end (their medians kept beside them), and every
case's. "ceil" is logits bytes read per second over the near read ceiling; "run" the same over the
run's; "bound" is the fraction of the rows/s that memory allows the case as a whole at its near ceilings
(memory_bound: its reads, and its writes of the sparse form, which for p > 0 on raw rows are 2-3x the
bytes read, so that no implementation can reach a high fraction of the read ceiling there). The web
snippet is slow (~60 rows/s), so it is timed only at batches <= --snippet-max-batch; a speed-up is over
its rows/s at the same batch, else at the largest batch it was timed at (`snippet_batch` says which).
"fused-cpu" writes into a Workspace kept between calls (a stream of batches, its intended use);
"fused-alloc" is the same kernel with a new output per call, as the torch paths allocate theirs (fresh
pages fault on first write: for p > 0 on raw rows, several times slower). The load average before and
after the run is recorded; where other processes hold cores the threads need, a note says the timings
are not to be trusted.
Prints a table, then one JSON line (`run()` returns the same dict, for a run record).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import torch

from harness import softmax_filter as sf

VOCAB = 151936  # Qwen1.5 0.5B-7B
TOP_K, TOP_P = 20, 0.8  # Qwen1.5-Chat generation_config.json
CASES = [("raw", "p>0"), ("warped", "p>0"), ("raw", "top-k")]  # (inputs, filter)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# bench-only variants of an implementation of harness.softmax_filter: name -> (the implementation, what differs)
VARIANTS = {"fused-alloc": ("fused-cpu", "a new output per call (fused-cpu reuses a Workspace)")}


def impl_names() -> list[str]:
    """What `--impls` may name, in the table's order: the snippet, softmax_filter's implementations, the variants."""
    names = ["snippet", *sf.IMPLS]
    for variant, (base, _) in VARIANTS.items():
        names.insert(names.index(base) + 1, variant)
    return names


def realistic_logits(n: int, width: int = VOCAB, seed: int = 0, unique: int = 64) -> torch.Tensor:
    """[n, width] float32 logits shaped like an LM's: a Student-t(8) body (scale 1.5, centred at -4; its largest
    of 151936 entries lies 10-13 above the centre) plus 1-8 tokens raised 8-20 above the body. Over the 64 distinct
    rows at Qwen1.5's width: entropy 1.4 nats on average (0 to 6), the top token's probability 0.75 at the median,
    one maximum a row, x - max down to -50 (no probability rounds to 0, in bfloat16 either), and the chat warpers
    keep 2 tokens on average (1 to 7). (Until 2026-12-06 the body was drawn with a uniform variance and clamped at
    30 scales: every row's top was 7-27 entries tied at exactly 41, x - max reached -90, and 22 of the 64 rows
    dropped entries in bfloat16.) `unique` distinct rows are drawn and tiled, so that large batches are cheap to
    make."""
    gen = torch.Generator().manual_seed(seed)
    u = min(n, unique)
    chi2 = sum(torch.empty(u, width).exponential_(generator=gen) for _ in range(4)) * 2  # chi-square, 8 degrees
    x = 1.5 * torch.randn(u, width, generator=gen) / (chi2 / 8).sqrt() - 4.0
    for r in range(u):
        hot = torch.randint(width, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen)
        x[r, hot] += 8 + 12 * torch.rand(hot.numel(), generator=gen)
    return x.repeat((n + u - 1) // u, 1)[:n].contiguous()


def warp(x: torch.Tensor) -> torch.Tensor:
    """[n, V] logits after top_k 20 then top_p 0.8 (transformers' warpers): kept logits, the rest -inf."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    return TopPLogitsWarper(TOP_P)(None, TopKLogitsWarper(TOP_K)(None, x.clone()))


def entropy_nats(x: torch.Tensor) -> float:
    """Mean softmax entropy of [n, V] logits rows, in nats."""
    lp = torch.log_softmax(x.float(), -1)
    return float(-(lp.exp() * lp.nan_to_num(neginf=0.0)).sum(-1).mean())


def timed(fn, device: torch.device, repeats: int, warmup: int = 1, min_seconds: float = 0.0) -> list[float]:
    """Seconds per call of fn(), `repeats` times after `warmup` calls, and more (up to 2000) until the calls
    add up to `min_seconds`: a median of five sub-millisecond calls moves with every hiccup of a shared machine."""
    for _ in range(warmup):
        fn()
    out = []
    while len(out) < repeats or (sum(out) < min_seconds and len(out) < 2000):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


@dataclass(frozen=True)
class Ceilings:
    read_gbps: float  # torch.sum over the buffer: the best of the repeats (what the memory can do)
    copy_gbps: float  # Tensor.copy_, bytes of the source per second: the best of the repeats
    write_gbps: float  # Tensor.fill_, bytes written per second: the best of the repeats
    read_median_gbps: float
    copy_median_gbps: float
    write_median_gbps: float

    def best(self, other: Ceilings) -> Ceilings:
        """Field by field, the higher of two measurements."""
        return Ceilings(*(max(a, b) for a, b in zip(astuple(self), astuple(other), strict=True)))


class Probe:
    """A `gib` GiB float32 buffer (random: no page the host could merge) and its copy target, allocated once, whose
    read, copy and write bandwidth `measure` takes as often as asked."""

    def __init__(self, device: torch.device, gib: float):
        self.device = device
        self.src = torch.empty(int(gib * 2**30) // 4, device=device).uniform_()
        self.dst = torch.empty_like(self.src)

    def measure(self, repeats: int) -> Ceilings:
        nbytes = self.src.numel() * 4
        read = [nbytes / t / 1e9 for t in timed(lambda: self.src.sum(), self.device, repeats)]
        copy = [nbytes / t / 1e9 for t in timed(lambda: self.dst.copy_(self.src), self.device, repeats)]
        write = [nbytes / t / 1e9 for t in timed(lambda: self.dst.fill_(0.5), self.device, repeats)]
        return Ceilings(max(read), max(copy), max(write), *(statistics.median(v) for v in (read, copy, write)))


def ceilings(device: torch.device, gib: float, repeats: int) -> Ceilings:
    """Read, copy and write bandwidth over a `gib` GiB float32 buffer, at least 10 times each.

    The best of the repeats is the ceiling: on a shared virtual machine other tenants' traffic moves a
    single measurement by up to 2x (seen here: reads at 31 or at 52 GB/s, minutes apart), and a fraction
    of a ceiling caught in a slow moment would flatter every implementation. The medians are kept beside it.
    """
    return Probe(device, gib).measure(max(repeats, 10))


# Each case's own ceiling: a probe of NEAR_GIB (8x a 32 MB last-level cache) measured NEAR_REPEATS times between
# consecutive cases, a case taking the better of the probes before and after it. This VM's memory runs in phases
# (seen here: a 2 GiB sum at 43-45 GB/s for minutes, then at 75-80 from one second to the next, in the same
# process, on the same buffer): a run's one ceiling, from a slow phase, gave a kernel timed in a fast one 129%.
NEAR_GIB, NEAR_REPEATS = 0.25, 3

# The input set's float32 size at least: successive calls take successive batches of it, so that each reads rows the
# cache does not hold. With only max(batches) rows (16 in --quick: 10 MB, inside a 32 MB L3), a batch of 16 was read
# from the cache and showed 132-231% of the read ceiling.
INPUT_MIB = 512


def input_rows(batches, width: int) -> int:
    """Rows in the input set: max(batches), and at least INPUT_MIB of float32 rows."""
    return max(max(batches), -(-INPUT_MIB * 2**20 // (width * 4)))


def memory_bound(read_bytes: float, write_bytes: float, read_gbps: float, write_gbps: float, copy_gbps: float) -> float:
    """Calls/s that memory allows a call reading `read_bytes` and writing `write_bytes`. A byte read costs 1/read
    ceiling; a byte written costs what a copy's byte costs beyond its read (1/copy - 1/read), and writes alone run no
    faster than the write ceiling. So reads alone are bound at the read ceiling and a copy at the copy ceiling."""
    extra = 1 / copy_gbps - 1 / read_gbps
    per_write = extra if extra > 0 else 1 / write_gbps
    return 1e9 / max(read_bytes / read_gbps + write_bytes * per_write, write_bytes / write_gbps)


def kept_per_row(x: torch.Tensor, filter: str) -> float:
    """Tokens the sparse form keeps per row of `x`, on average."""
    return sf.torch_filter(x, filter, TOP_K).indices.numel() / len(x)


CHECKED_ROWS = 4  # rows of each case's output held to the snippet before it is timed


def output_differs(got: sf.SparseRows, x: torch.Tensor, filter: str) -> str | None:
    """Where the first CHECKED_ROWS rows of `got` (an implementation's output for the rows `x`, any device) differ from
    the snippet's on the same rows (softmax_filter.same, 1e-6, the float64 softmax for its tie-break), the difference;
    else None. What a benchmark times must be right: the sweep's fastest settings included, which no test may have run
    on this device."""
    n = min(CHECKED_ROWS, len(x))
    end = int(got.offsets[n])
    head = sf.SparseRows(got.offsets[: n + 1].cpu(), got.indices[:end].cpu(), got.values[:end].cpu())
    rows = x[:n].cpu()
    return sf.same(sf.snippet(list(rows.split(1))), head, filter, TOP_K, atol=1e-6, exact=torch.softmax(rows.double(), dim=1))


def written_per_row(x: torch.Tensor, filter: str) -> float:
    """Bytes of the sparse form per row of `x` (column indices int32 and probabilities in x's dtype, + its offset)."""
    return kept_per_row(x, filter) * (4 + x.element_size()) + 8


def busy_note(threads: int, load: list[float]) -> str | None:
    """Why the timings are not to be trusted, where the 1-minute load average (before, after) says other processes
    held cores these threads needed (a 2-thread kernel then waits whole scheduler slices: 8 ms calls, not 0.4). The
    load after the run holds the run's own threads: they are taken off it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    worst = max(load[0], load[-1] - threads)
    if worst > max(cores - threads, 0) + 0.5:
        return (f"the machine was busy: load average {worst:.1f} on {cores} cores with {threads} threads timed; "
                "other processes took cores from the timed threads, so these rows/s are low and uneven: run again on a quiet machine")
    return None


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def peak_bytes(impl: str, batch: int, width: int, itemsize: int, filter: str) -> int:
    """Rough peak memory of one call beyond its input, for skipping what would not fit (--max-gb)."""
    cells = batch * width
    if impl == "snippet":
        return cells * 100  # Python floats and dict entries
    kept = cells if filter == "p>0" else batch * TOP_K  # upper bound: raw rows keep every token
    if impl in ("torch", "compiled"):
        return cells * (itemsize + 1) + kept * (8 + itemsize + 4)
    return kept * (itemsize + 4)


def run(batches=(1, 16, 256, 4096), dtypes=("float32", "bfloat16"), repeats=5, impls=None, width=VOCAB,
        snippet_max_batch=16, ceiling_gib=2.0, max_gb=8.0, device=None, min_seconds=0.3, log=print,
        triton_settings: dict | None = None) -> dict:
    """Times every implementation and returns the record: device, ceilings, settings, notes and `results`.
    `triton_settings`: harness.triton_sweep's "best" (case -> launch settings), else triton_filter's defaults."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    impls = [i for i in impl_names() if i in (impls or impl_names())]  # the snippet first: every speed-up needs it
    load = [_load()]
    notes = {i: sf.available(VARIANTS.get(i, (i,))[0], device.type) for i in impls if i != "snippet"}
    notes = {i: why for i, why in notes.items() if why}
    fused = [i for i in ("fused-cpu", "fused-alloc") if i in impls and i not in notes]  # (notes: why one cannot run)
    isa = sf.kernel_isa() if device.type == "cpu" and fused else None
    if isa is not None and isa != "avx512":  # its fastest loops are AVX-512's: say which it runs here
        notes["fused-cpu isa"] = ("8-lane AVX2 and FMA row loops (this CPU or build has no AVX-512)" if isa == "avx2"
                                  else "scalar row loops (built without AVX2: HARNESS_CEXT_PORTABLE=1, or a CPU without it)")
    wrong: set[tuple] = set()  # cases whose output differed from the snippet's: not timed
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph breaks at nonzero/.item() are expected
    ceil = ceilings(device, ceiling_gib, repeats)
    log(f"{device.type} ({name}), {torch.get_num_threads()} threads: read {ceil.read_gbps:.1f} GB/s, copy {ceil.copy_gbps:.1f} GB/s, "
        f"write {ceil.write_gbps:.1f} GB/s")
    near = Probe(device, min(ceiling_gib, NEAR_GIB))
    last = near.measure(NEAR_REPEATS)
    seen = [ceil, last]  # every measurement, for the run's ceiling
    base = realistic_logits(input_rows(batches, width), width)
    inputs = {"raw": base, "warped": warp(base[: min(len(base), 64)]).repeat(len(base) // min(len(base), 64) + 1, 1)[: len(base)]}
    log(f"raw rows: entropy {entropy_nats(base[:64]):.2f} nats; warped rows keep {(inputs['warped'][:64] > float('-inf')).sum(1).float().mean():.1f} tokens")
    results, snippet_rps = [], {}  # (dtype, inputs) -> {batch: rows/s}
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for kind, filter in CASES:
            rows_all = inputs[kind].to(device, dtype)
            kept = kept_per_row(rows_all[:64], filter)  # the first 64 rows are all the distinct ones
            written = kept * (4 + rows_all.element_size()) + 8
            for impl in impls:
                if impl in notes or (impl == "snippet" and filter != "p>0"):
                    continue
                for batch in batches:
                    if impl == "snippet" and batch > snippet_max_batch:
                        continue
                    if peak_bytes(impl, batch, width, rows_all.element_size(), filter) > max_gb * 1e9:
                        notes[f"{impl}@{batch} {dtype_name} {kind} {filter}"] = f"skipped: needs more than --max-gb {max_gb}"
                        continue
                    x = rows_all[:batch]
                    # successive calls take successive batches of the whole input set (max(batches) rows), so
                    # small batches are read from memory, as the read ceiling is, not from the cache a repeat leaves
                    batches_all = itertools.cycle(rows_all[s : s + batch] for s in range(0, len(rows_all) - batch + 1, batch))
                    if impl == "snippet":
                        scores = list(x.split(1))
                        fn = lambda s=scores: sf.snippet(s)  # noqa: E731
                    else:
                        if impl == "fused-cpu":
                            call = lambda rows, f=filter, ws=sf.Workspace(): sf.fused_cpu_filter(rows, f, TOP_K, ws)  # noqa: E731
                        elif impl == "fused-alloc":
                            call = lambda rows, f=filter: sf.fused_cpu_filter(rows, f, TOP_K)  # noqa: E731
                        elif impl == "triton" and triton_settings:
                            cfg = swept(triton_settings, kind, dtype_name, filter, batch)
                            call = lambda rows, f=filter, c=cfg: sf.triton_filter(rows, f, TOP_K, **c)  # noqa: E731
                        else:
                            call = lambda rows, f=filter, g=sf.IMPLS[impl]: g(rows, f, TOP_K)  # noqa: E731
                        fn = lambda c=call, b=batches_all: c(next(b))  # noqa: E731
                    case = (impl, dtype_name, kind, filter, batch if impl == "triton" else None)
                    try:
                        # the output held to the snippet first: at each batch for Triton (its launch settings and its
                        # parts a row follow the batch), once a case for the others (at its first batch)
                        if impl != "snippet" and (impl == "triton" or batch == min(batches)):
                            differs = output_differs(call(x), x, filter)
                            if differs:
                                notes[f"{impl}@{batch} {dtype_name} {kind} {filter}"] = f"not timed: its output differs from the snippet's: {differs}"
                                wrong.add(case)
                        if case in wrong:
                            continue
                        secs = timed(fn, device, repeats, warmup=1 if impl != "compiled" else 2, min_seconds=min_seconds)
                    except Exception as e:  # noqa: BLE001 -- e.g. torch.compile failing on this machine
                        notes[impl] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                        break
                    med = statistics.median(secs)
                    rps = batch / med
                    now = near.measure(NEAR_REPEATS)
                    local, last = last.best(now), now
                    seen.append(now)
                    if impl == "snippet":
                        snippet_rps.setdefault((dtype_name, kind), {})[batch] = rps
                    timed_at = snippet_rps.get((dtype_name, kind)) or snippet_rps.get((dtype_name, "raw")) or {}
                    at = batch if batch in timed_at else max(timed_at, default=None)  # the same batch, else the largest
                    ref = timed_at.get(at)
                    gbps = batch * width * x.element_size() / med / 1e9
                    results.append({
                        "impl": impl, "batch": batch, "dtype": dtype_name, "inputs": kind, "filter": filter,
                        "rows_per_s": rps, "tokens_per_s": rps * width, "kept_per_s": rps * kept, "gbps": gbps,
                        "near_read_gbps": local.read_gbps, "near_copy_gbps": local.copy_gbps,
                        "near_write_gbps": local.write_gbps, "fraction_of_ceiling": gbps / local.read_gbps,
                        "read_bytes_per_row": width * x.element_size(), "written_bytes_per_row": written,
                        "speedup_vs_snippet": rps / ref if ref else None, "snippet_batch": at if ref else None,
                        "median_s": med, "min_s": min(secs), "max_s": max(secs), "repeats": len(secs),
                        "iqr_s": float(np.subtract(*np.percentile(secs, [75, 25]))),
                        **({"settings": cfg} if impl == "triton" and triton_settings else {}),
                    })
                    r = results[-1]
                    r["bound_rows_per_s"] = memory_bound(r["read_bytes_per_row"], written, local.read_gbps, local.write_gbps,
                                                         local.copy_gbps)  # fmt: skip
                    r["fraction_of_bound"] = rps / r["bound_rows_per_s"]
                    log(row_text(r))
    # measured again at the end: the run's ceiling is the best of every measurement (the cases' probes included)
    end = ceilings(device, ceiling_gib, repeats)
    best = end
    for c in seen:
        best = best.best(c)
    read_gbps, copy_gbps, write_gbps = best.read_gbps, best.copy_gbps, best.write_gbps
    for r in results:
        r["fraction_of_run_ceiling"] = r["gbps"] / read_gbps
    load.append(_load())
    if why := busy_note(torch.get_num_threads() if device.type == "cpu" else 1, load):
        notes["machine"] = why
    notes |= {v: f"{base}'s kernel with {what}" for v, (base, what) in VARIANTS.items() if v in impls and v not in notes}
    return {
        "version": 1, "device": device.type, "device_name": name, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "width": width, "top_k": TOP_K, "top_p": TOP_P, "fused_cpu_isa": isa,
        "read_ceiling_gbps": read_gbps, "copy_ceiling_gbps": copy_gbps, "write_ceiling_gbps": write_gbps,
        "ceiling_gib": ceiling_gib,
        "read_median_gbps": [ceil.read_median_gbps, end.read_median_gbps],  # at the start and at the end
        "copy_median_gbps": [ceil.copy_median_gbps, end.copy_median_gbps],
        "write_median_gbps": [ceil.write_median_gbps, end.write_median_gbps],
        "load_average": load, "notes": notes, "results": results,
    }


def swept(best: dict, kind: str, dtype: str, filter: str, batch: int) -> dict:
    """The sweep's settings for a case: those it found at batch 4096 for batches >= 4096, else at 256 (or 4096)."""
    at = best.get(f"{kind} {dtype} {filter} {4096 if batch >= 4096 else 256}") or best.get(f"{kind} {dtype} {filter} 4096", {})
    return {k: v for k, v in at.items() if k != "ms"}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "cpu"


HEADER = (f"{'impl':>11} {'dtype':>8} {'inputs':>6} {'filter':>6} {'batch':>5} {'rows/s':>10} {'GB/s':>6} {'near':>5} {'ceil':>5}"
          f" {'bound':>5} {'run':>5} {'x snippet':>9} {'spread':>7}")


def row_text(r: dict) -> str:
    spread = r.get("iqr_s", r["max_s"] - r["min_s"]) / r["median_s"]  # records before iqr_s: the full range
    up = f"{r['speedup_vs_snippet']:.0f}" if r["speedup_vs_snippet"] else "-"
    bound = f"{r['fraction_of_bound']:.0%}" if "fraction_of_bound" in r else "-"  # "-": an older record
    near = f"{r['near_read_gbps']:.1f}" if "near_read_gbps" in r else "-"
    run = f"{r['fraction_of_run_ceiling']:.0%}" if "fraction_of_run_ceiling" in r else "-"  # "-": the log's line
    return (f"{r['impl']:>11} {r['dtype']:>8} {r['inputs']:>6} {r['filter']:>6} {r['batch']:>5} {r['rows_per_s']:>10.0f}"
            f" {r['gbps']:>6.2f} {near:>5} {r['fraction_of_ceiling']:>5.0%} {bound:>5} {run:>5} {up:>9} {spread:>7.0%}")


def table(record: dict) -> str:
    write = f", write {record['write_ceiling_gbps']:.1f} GB/s" if "write_ceiling_gbps" in record else ""
    lines = [f"{record['device']} ({record['device_name']}), {record['threads']} threads; ceiling: read "
             f"{record['read_ceiling_gbps']:.1f} GB/s, copy {record['copy_ceiling_gbps']:.1f} GB/s{write} "
             "(GB/s = logits bytes read; near = the read ceiling measured around the case, GB/s; ceil = GB/s over near; "
             "bound = fraction of the rows/s that memory allows the case's reads and writes of its sparse form at the ceilings "
             "measured around it, see memory_bound; run = GB/s over the run's read ceiling, the best of every measurement; "
             "spread = interquartile range / median)",
             HEADER]
    lines += [row_text(r) for r in record["results"]]
    lines += [f"note {k}: {v}" for k, v in record["notes"].items()]
    return "\n".join(lines)


# the defaults of the options --quick changes, without it and with it (an option given explicitly counts either way)
DEFAULTS = {"batches": "1,16,256,4096", "dtypes": "float32,bfloat16", "repeats": 5, "ceiling_gib": 2.0}
QUICK = {"batches": "1,16", "dtypes": "float32", "repeats": 3, "ceiling_gib": 1.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="harness bench", description=__doc__.split("\n")[0])
    p.add_argument("--batches", default=None, help=f"comma-separated batch sizes (rows per call; default {DEFAULTS['batches']})")
    p.add_argument("--dtypes", default=None, help=f"comma-separated, of {','.join(DTYPES)} (default {DEFAULTS['dtypes']})")
    p.add_argument("--impls", default=None, help=f"comma-separated, of {','.join(impl_names())} (default all)")
    p.add_argument("--repeats", type=int, default=None, help=f"default {DEFAULTS['repeats']}")
    p.add_argument("--width", type=int, default=VOCAB, help="row width (vocabulary size)")
    p.add_argument("--snippet-max-batch", type=int, default=16)
    p.add_argument("--ceiling-gib", type=float, default=None, help=f"buffer size for the read/copy ceiling (default {DEFAULTS['ceiling_gib']})")
    p.add_argument("--max-gb", type=float, default=8.0, help="skip cases whose working memory would exceed this")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--quick", action="store_true", help="defaults of batches 1,16, float32, 3 repeats, a 1 GiB ceiling buffer")
    p.add_argument("--triton-settings", default=None, metavar="SWEEP_JSON",
                   help="time triton at the best settings of a `python3 -m harness.triton_sweep --json` file")
    p.add_argument("--into", default=None, metavar="RUN_DIR",
                   help="also store the result in that run's record (its HTML report gains a throughput section)")
    a = p.parse_args(argv)
    for key, value in (QUICK if a.quick else DEFAULTS).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    try:
        ints = [int(b) for b in a.batches.split(",")]
    except ValueError:
        p.error(f"--batches {a.batches!r}: give comma-separated whole numbers, e.g. 1,16,256")
    if min(ints) < 1 or a.repeats < 1 or a.width < 1:
        p.error(f"--batches ({a.batches}), --repeats ({a.repeats}) and --width ({a.width}) must be at least 1")
    if not (a.ceiling_gib > 0 and a.max_gb > 0):  # nan fails both comparisons
        p.error(f"--ceiling-gib ({a.ceiling_gib}) and --max-gb ({a.max_gb}) must be positive numbers of GiB / GB")
    if a.impls is not None and not a.impls.strip():
        p.error("--impls is empty: leave it out for every implementation, or name some of " + ",".join(impl_names()))
    dtypes = a.dtypes.split(",")
    impls = a.impls.split(",") if a.impls else None
    for name in dtypes:
        if name not in DTYPES:
            p.error(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    for name in impls or []:
        if name not in impl_names():
            p.error(f"unknown implementation {name!r}; choose from {', '.join(impl_names())}")
    if a.device not in (None, "cpu", "cuda"):
        p.error(f"unknown device {a.device!r}; choose cpu or cuda")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error(f"--device cuda, but this torch ({torch.__version__}) sees no CUDA device")
    settings = target = None
    if a.triton_settings:
        try:
            settings = json.loads(Path(a.triton_settings).read_text())["best"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            p.error(f"--triton-settings {a.triton_settings}: not a `python3 -m harness.triton_sweep --json` file ({exc!r})")
    if a.into:
        from harness import records, report

        try:
            target = records.read(Path(a.into))  # read first: a bad folder fails before the benchmark runs
        except records.RecordError as exc:
            p.error(f"--into: {exc}")
    # each case's row on stderr as it is measured (a run stopped early keeps what it measured), the table on stdout
    record = run(ints, dtypes, a.repeats, impls, a.width, a.snippet_max_batch, a.ceiling_gib, a.max_gb, a.device,
                 log=lambda msg: print(msg, file=sys.stderr, flush=True), triton_settings=settings)
    print(table(record))
    if target is not None:
        records.write(records.run_dir(a.into), target.model_copy(update={"throughput": record}))
        print(f"report: {report.render(records.run_dir(a.into))}")
    print(json.dumps(record, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
