"""The CUDA kernels of softmax_filter.triton_filter (imported on first use: needs triton).

Each program of `stats`/`write` takes one part of one row, W columns (the last part what is left); `top` takes a
row, `compact` a part. Helpers are module globals, as Triton resolves the names a kernel calls through them.
"""

import triton
import triton.language as tl

MIN64 = tl.constexpr(-9223372036854775807 - 1)  # the smallest int64: no key (2^63 itself is out of int64 range)


@triton.jit
def key_of(v, pos):
    # int64 keys that order as (v, -pos): v's float bits made to order as signed integers, then 2^32 − 1 − pos, so
    # that among equal values the lowest position ranks first
    b = v.to(tl.int32, bitcast=True)
    return ((b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.int64) << 32) | (4294967295 - pos.to(tl.int64))


@triton.jit
def prob(x, mx, inv, val_ptr, BF16: tl.constexpr):
    # p = exp(x − max) / Σ and whether it is kept (> 0 in the output dtype). bfloat16 p is rounded to nearest even
    # on its float32 bits (then stored as int16): exact for subnormal p too, which a float conversion may flush
    # (and Triton's interpreter converts wrongly).
    p = tl.exp(x - mx) * inv
    if BF16:
        b = p.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        return b.to(tl.int16), b != 0
    p = p.to(val_ptr.dtype.element_ty)
    return p, p > 0


@triton.jit
def combine(stat_ptr, row, NPART, NP: tl.constexpr):
    # The row's max, Σ exp(x − max) and bad flag (NaN, +inf, or all −inf) from its parts' stats
    j = tl.arange(0, NP)
    at = stat_ptr + (row * NPART + j) * 4
    pm = tl.load(at, mask=j < NPART, other=float("-inf"))
    ps = tl.load(at + 1, mask=j < NPART, other=0.0)
    pn = tl.load(at + 2, mask=j < NPART, other=0.0)
    mx = tl.max(pm, 0)
    total = tl.sum(tl.where(pm == float("-inf"), 0.0, ps * tl.exp(pm - mx)), 0)
    return mx, total, (tl.max(pn, 0) > 0) | (mx == float("inf")) | (mx == float("-inf"))


@triton.jit
def okey(v):
    # float32 bits as int32 that order as the floats do (NaN beyond ±inf); INT32_MIN, which marks no entry, only for
    # the NaN whose bits are all ones (its row is bad anyway: the call raises)
    b = v.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def kth(keys, k):
    # The k-th largest of int32 `keys` (1-D, at least k of them): the t with count(keys >= t) >= k > count(keys > t),
    # by bisection, 32 block-wide counts and no sort
    lo = tl.min(keys, 0).to(tl.int64)  # count(keys >= lo) >= k > count(keys >= hi) throughout
    hi = tl.max(keys, 0).to(tl.int64) + 1
    for _ in range(32):
        mid = (lo + hi) >> 1
        enough = tl.sum((keys >= mid.to(tl.int32)).to(tl.int32), 0) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    return lo.to(tl.int32)


@triton.jit
def first_k(keys, k):
    # The k largest of `keys` (1-D, in the order that breaks ties: earlier first) as a mask, fewer where fewer than
    # k are not INT32_MIN
    t = kth(keys, k)
    above, tie = keys > t, keys == t
    room = k - tl.sum(above.to(tl.int32), 0)
    return (above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= room))) & (keys != -2147483648)


@triton.jit
def top_of_row(x_ptr, row, ld, V, k, mx, total, bad, gmax_ptr, NG, val_ptr, idx_ptr, cnt_ptr, flag_ptr, sel_ptr,
               G: tl.constexpr, KP: tl.constexpr, NGP: tl.constexpr, BF16: tl.constexpr, SELECT: tl.constexpr):
    # The row's top k from its groups' maxima: the k-th largest logit lies in one of the k groups whose (max,
    # −group) rank highest (each group ranking above a logit's own group holds a logit ranking above it), so only
    # those KP >= k groups are read again, [KP, G] logits. SELECT 0: both choices by tl.topk (a bitonic network
    # over NGP, then KP·G int64 keys). SELECT 1: by bisection on the values (first_k), each choice compacted in
    # column order through sel[row] (KP int64), then tl.topk sorts the k chosen. Row r's entries go to
    # [r·k, r·k + count): the kept p are a prefix, as p falls with the rank.
    g = tl.arange(0, NGP)
    gm = tl.load(gmax_ptr + row * NG + g, mask=g < NG, other=float("-inf"))
    j = tl.arange(0, KP)
    if SELECT:
        pick = first_k(tl.where(g < NG, okey(gm), -2147483648), k)  # in group order, so the tile is in column order
        tl.store(sel_ptr + row * KP + tl.cumsum(pick.to(tl.int32), 0) - 1, g.to(tl.int64), mask=pick)
        tl.debug_barrier()
        grp = tl.load(sel_ptr + row * KP + j, mask=j < tl.sum(pick.to(tl.int32), 0), other=-1)
        col = grp[:, None] * G + tl.arange(0, G)[None, :]
        ok = (grp >= 0)[:, None] & (col < V)
        x = tl.load(x_ptr + row * ld + col, mask=ok, other=float("-inf")).to(tl.float32)
        xs, cs = tl.reshape(x, [KP * G]), tl.reshape(col, [KP * G])
        pick = first_k(tl.reshape(tl.where(ok, okey(x), -2147483648), [KP * G]), k)
        tl.debug_barrier()  # every program thread has read the group numbers before they are overwritten
        tl.store(sel_ptr + row * KP + tl.cumsum(pick.to(tl.int32), 0) - 1, key_of(xs, cs), mask=pick)
        tl.debug_barrier()
        top = tl.topk(tl.load(sel_ptr + row * KP + j, mask=j < tl.sum(pick.to(tl.int32), 0), other=MIN64), KP)
    else:
        best = tl.topk(tl.where(g < NG, key_of(gm, g), MIN64), KP)
        col = (4294967295 - (best & 4294967295))[:, None] * G + tl.arange(0, G)[None, :]
        ok = (best != MIN64)[:, None] & (col < V)
        x = tl.load(x_ptr + row * ld + col, mask=ok, other=float("-inf")).to(tl.float32)
        top = tl.topk(tl.reshape(tl.where(ok, key_of(x, col), MIN64), [KP * G], can_reorder=True), KP)
    hi = (top >> 32).to(tl.int32)
    v = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    p, keep = prob(v, mx, 1.0 / total, val_ptr, BF16)
    keep = keep & (j < k) & (top != MIN64)
    tl.store(val_ptr + row * k + j, p, mask=keep)
    tl.store(idx_ptr + row * k + j, (4294967295 - (top & 4294967295)).to(tl.int32), mask=keep)
    n = tl.sum(keep.to(tl.int32), 0)
    tl.store(cnt_ptr + row, n.to(tl.int64))
    tl.atomic_max(flag_ptr, bad.to(tl.int64))
    tl.atomic_add(flag_ptr + 1, n.to(tl.int64))


@triton.jit
def stats(x_ptr, ld, V, W, k, stat_ptr, gmax_ptr, NG, cval_ptr, cidx_ptr, ccnt_ptr, val_ptr, idx_ptr, cnt_ptr, flag_ptr,
          sel_ptr, R: tl.constexpr, G: tl.constexpr, CR: tl.constexpr, TOPK: tl.constexpr, FUSED: tl.constexpr,
          KP: tl.constexpr, NGP: tl.constexpr, BF16: tl.constexpr, SELECT: tl.constexpr, CONTIG: tl.constexpr):
    # One read of the part: its max, Σ exp(x − max), NaN flag and the most finite logits in a segment into
    # stat[row, part]. The part is R contiguous segments of W/R columns, each read G columns a step by its own
    # threads (a warp or less), so the running max is one per segment and needs no exchange between warps: one
    # exp an entry. The next step's tile is loaded before this one is used. Top-k: each group's max (G columns)
    # into gmax[row, group], and where the row is one part (FUSED) the row's top k at once (top_of_row). p > 0:
    # each segment's first CR finite logits, in column order, and their columns into cval/cidx[row, part, segment]
    # (all of a warped row's), their count into ccnt (a segment's whole count: over CR, `write` reads the part).
    # CONTIG (top-k only: the groups' order does not matter there): the tile's R rows are adjacent groups, so a
    # step reads R·G contiguous columns, one stream a program rather than R; row r keeps the running max of groups
    # r, r + R, r + 2R, ...
    row, part = tl.program_id(0), tl.program_id(1)  # int32 offsets within a row and the buffers: fewer registers
    lo = part * W
    hi = tl.minimum(lo + W, V)
    seg = W // R
    span = W if CONTIG else seg  # the columns a tile row covers, `step` at a time
    step = R * G if CONTIG else G
    first = lo + tl.arange(0, R) * (G if CONTIG else seg)
    cols = first[:, None] + tl.arange(0, G)[None, :]
    base, slot = x_ptr + row.to(tl.int64) * ld, row * tl.num_programs(1) + part
    m = tl.full([R], float("-inf"), tl.float32)
    s = tl.zeros([R, G], tl.float32)
    nfin = tl.zeros([R], tl.int32)
    x = tl.load(base + cols, mask=cols < hi, other=float("-inf"))
    for t in range(0, span, step):
        col = cols + t
        nxt = col + step
        x_next = tl.load(base + nxt, mask=(nxt < hi) & (t + step < span), other=float("-inf"))
        xf = x.to(tl.float32)
        gm = tl.max(xf, 1)
        if TOPK:
            tl.store(gmax_ptr + row.to(tl.int64) * NG + (first + t) // G, gm, mask=first + t < hi)
        else:
            if tl.min(nfin, 0) < CR:  # until every segment has CR or more finite logits (a raw row's first steps)
                fin = (xf > float("-inf")).to(tl.int32)
                pos = nfin[:, None] + tl.cumsum(fin, 1) - 1
                keep = (fin != 0) & (pos < CR)
                at = (slot * R + tl.arange(0, R)[:, None]) * CR + pos
                tl.store(cval_ptr + at, xf, mask=keep)
                tl.store(cidx_ptr + at, col.to(tl.int32), mask=keep)
                nfin += tl.sum(fin, 1)
            else:
                nfin += CR  # every segment at CR or more: the part is read again in `write`, the count no longer matters
        # exp(x − max) is 0 for x = −inf whatever the max, so a segment with no finite logit yet takes 0 for its max
        m_new = tl.maximum(m, gm)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(tl.where(m_new == float("-inf"), 0.0, m - m_new))[:, None] + tl.exp(xf - m_safe[:, None])
        m = m_new
        x = x_next
    mx = tl.max(m, 0)
    # NaN where the part holds NaN (exp(NaN) is NaN) or +inf (exp(inf − inf))
    total = tl.sum(tl.sum(s, 1) * tl.exp(tl.where(m == float("-inf"), float("-inf"), m - tl.where(mx == float("-inf"), 0.0, mx))), 0)
    at = stat_ptr + slot * 4
    tl.store(at, mx)
    tl.store(at + 1, total)
    tl.store(at + 2, (total != total).to(tl.float32))
    tl.store(at + 3, tl.max(nfin, 0).to(tl.float32))
    if not TOPK:
        tl.store(ccnt_ptr + slot * R + tl.arange(0, R), tl.minimum(nfin, CR + 1))
    if FUSED:  # the row is this one part: its group maxima, written above by other threads, are read back
        tl.debug_barrier()
        bad = (total != total) | (mx == float("inf")) | (mx == float("-inf"))
        top_of_row(x_ptr, row.to(tl.int64), ld, V, k, mx, total, bad, gmax_ptr, NG, val_ptr, idx_ptr, cnt_ptr, flag_ptr, sel_ptr,
                   G, KP, NGP, BF16, SELECT)


@triton.jit
def stats_part(x_ptr, ld, V, W, stat_ptr, cval_ptr, cidx_ptr, ccnt_ptr, BLOCK: tl.constexpr, CAP: tl.constexpr):
    # p > 0's `stats` with capture "part": the part read BLOCK columns a step by all its threads (the next step's
    # tile loaded first), one max a step by a block-wide reduction. A step whose logits are all −inf (most of a
    # warped row's) does nothing more: no exp. Else Σ exp(x − max) with the running max, and until the part holds
    # CAP finite logits, those logits and their columns in column order into cval/cidx[row, part] (a scan over the
    # step). Same stat[row, part] as `stats` ([3]: the finite count, CAP + 1 once past CAP), and the part's count
    # into ccnt as one segment of CAP: `write` runs with R = 1, CR = CAP.
    row, part = tl.program_id(0), tl.program_id(1)
    lo = part * W
    hi = tl.minimum(lo + W, V)
    base, slot = x_ptr + row.to(tl.int64) * ld, row * tl.num_programs(1) + part
    offs = tl.arange(0, BLOCK)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    nfin = tl.full([], 0, tl.int32)
    x_next = tl.load(base + lo + offs, mask=lo + offs < hi, other=float("-inf"))
    for start in range(lo, hi, BLOCK):
        col = start + offs
        x = x_next.to(tl.float32)
        x_next = tl.load(base + col + BLOCK, mask=col + BLOCK < hi, other=float("-inf"))
        # the step's max with NaN as +inf, so that a step holding NaN among −inf is not skipped; NaN or +inf then
        # make Σ NaN (exp(NaN), exp(inf − inf)): the bad-row flag
        gm = tl.max(tl.where(x == x, x, float("inf")), 0)
        if gm != float("-inf"):
            if nfin <= CAP:
                live = x != float("-inf")  # finite, +inf or NaN
                pos = nfin + tl.cumsum(live.to(tl.int32), 0) - 1
                keep = live & (pos < CAP)
                tl.store(cval_ptr + slot * CAP + pos, x, mask=keep)
                tl.store(cidx_ptr + slot * CAP + pos, col.to(tl.int32), mask=keep)
                nfin = tl.minimum(nfin + tl.sum(live.to(tl.int32), 0), CAP + 1)
            m_new = tl.maximum(m, gm)
            s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
            m = m_new
    total = tl.sum(s, 0)
    at = stat_ptr + slot * 4
    tl.store(at, m)
    tl.store(at + 1, total)
    tl.store(at + 2, (total != total).to(tl.float32))
    tl.store(at + 3, nfin.to(tl.float32))
    tl.store(ccnt_ptr + slot, nfin)


@triton.jit
def top(x_ptr, ld, V, k, NPART, stat_ptr, gmax_ptr, NG, val_ptr, idx_ptr, cnt_ptr, flag_ptr, sel_ptr,
        NP: tl.constexpr, G: tl.constexpr, KP: tl.constexpr, NGP: tl.constexpr, BF16: tl.constexpr, SELECT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    mx, total, bad = combine(stat_ptr, row, NPART, NP)
    top_of_row(x_ptr, row, ld, V, k, mx, total, bad, gmax_ptr, NG, val_ptr, idx_ptr, cnt_ptr, flag_ptr, sel_ptr, G, KP, NGP,
               BF16, SELECT)


@triton.jit
def write(x_ptr, ld, V, W, cap, stat_ptr, cval_ptr, cidx_ptr, ccnt_ptr, val_ptr, idx_ptr, cnt_ptr, flag_ptr,
          BLOCK: tl.constexpr, R: tl.constexpr, CR: tl.constexpr, NP: tl.constexpr, BF16: tl.constexpr):
    # The part's kept p, compacted in column order from row·cap + lo: from the logits `stats` kept where no segment
    # has more than CR finite ones, else from a second read of the part; its count into cnt[row, part].
    row, part, npart = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    lo = part * W
    hi = tl.minimum(lo + W, V)
    slot = row * npart + part
    mx, total, bad = combine(stat_ptr, row, npart, NP)
    inv = 1.0 / total
    val_ptr, idx_ptr = val_ptr + row.to(tl.int64) * cap + lo, idx_ptr + row.to(tl.int64) * cap + lo  # int32 offsets from here
    c = tl.full([], 0, tl.int32)
    if tl.load(stat_ptr + slot * 4 + 3) <= CR:
        j = tl.arange(0, CR)[None, :]
        n = tl.load(ccnt_ptr + slot * R + tl.arange(0, R))[:, None]
        at = (slot * R + tl.arange(0, R)[:, None]) * CR + j
        x = tl.load(cval_ptr + at, mask=j < n, other=float("-inf"))
        col = tl.load(cidx_ptr + at, mask=j < n, other=0)
        p, keep = prob(x, mx, inv, val_ptr, BF16)
        keep = tl.reshape(keep & (j < n), [R * CR])  # row-major: segment by segment, so in column order
        pos = tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(val_ptr + pos, tl.reshape(p, [R * CR]), mask=keep)
        tl.store(idx_ptr + pos, tl.reshape(col, [R * CR]), mask=keep)
        c = tl.sum(keep.to(tl.int32), 0)
    else:
        base, offs = x_ptr + row.to(tl.int64) * ld, tl.arange(0, BLOCK)
        x_next = tl.load(base + lo + offs, mask=lo + offs < hi, other=float("-inf"))
        for start in range(lo, hi, BLOCK):
            col = start + offs
            x = x_next
            x_next = tl.load(base + col + BLOCK, mask=col + BLOCK < hi, other=float("-inf"))
            p, keep = prob(x.to(tl.float32), mx, inv, val_ptr, BF16)
            keep = keep & (col < hi)
            nk = tl.sum(keep.to(tl.int32), 0)
            if nk == BLOCK:  # all kept (a raw row's tiles): no scan
                pos = c + offs
            else:
                pos = c + tl.cumsum(keep.to(tl.int32), 0) - 1
            tl.store(val_ptr + pos, p, mask=keep)
            tl.store(idx_ptr + pos, col.to(tl.int32), mask=keep)
            c += nk
    tl.store(cnt_ptr + slot, c.to(tl.int64))
    tl.atomic_add(flag_ptr + 1, c.to(tl.int64))
    if part == 0:
        tl.atomic_max(flag_ptr, bad.to(tl.int64))


@triton.jit
def compact(src_val, src_idx, cnt_ptr, dst_ptr, W, cap, val_ptr, idx_ptr, BLOCK: tl.constexpr):
    # Closes the gaps: part (row, part)'s cnt entries from row·cap + part·W to dst[row, part]
    row, part = tl.program_id(0).to(tl.int64), tl.program_id(1)
    slot = row * tl.num_programs(1) + part
    n, dst, src = tl.load(cnt_ptr + slot), tl.load(dst_ptr + slot), row * cap + part * W
    for i in range(0, n, BLOCK):
        j = i + tl.arange(0, BLOCK)
        tl.store(val_ptr + dst + j, tl.load(src_val + src + j, mask=j < n), mask=j < n)
        tl.store(idx_ptr + dst + j, tl.load(src_idx + src + j, mask=j < n), mask=j < n)
