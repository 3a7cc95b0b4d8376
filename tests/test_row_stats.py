"""The fused per-row kernel of extraction against a float64 computation: log-probs over the real
columns, the padding mass and the row's logsumexp, for every output dtype and awkward widths."""

from __future__ import annotations

import pytest
import torch
from conftest import tied_below_a_top

from harness import bench, row_stats

ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # relative spacing of each dtype


def _rows(n: int, width: int, seed: int = 0) -> torch.Tensor:
    x = bench.realistic_logits(n, width, seed)
    x[0, 5:40] = float("-inf")  # masked entries stay -inf in the log-probs
    return x


@pytest.mark.parametrize("layout", ["float16", "float64", "transposed"])
def test_other_dtypes_and_strides_take_the_fallback(layout):
    """The kernel reads contiguous float32 rows; float16 or float64 logits, or a block whose rows are not contiguous,
    go to the torch fallback and give the float64 logsumexp, pad mass and log-probs (the kernel would read float16
    memory as float32, or walk a transposed block's columns as its rows)."""
    raw = bench.realistic_logits(4, 1000, seed=3)
    x = {"float16": raw.half(), "float64": raw.double(), "transposed": raw.t().contiguous().t()}[layout]
    assert layout != "transposed" or x.stride(1) != 1
    got, pad, lse, _ = row_stats.row_stats(x, 997)
    want = x.double()
    want_lse = torch.logsumexp(want, -1)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=0)
    torch.testing.assert_close(pad.double(), (want[:, 997:] - want_lse[:, None]).exp().sum(-1), rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(got.double(), torch.log_softmax(want[:, :997], -1), rtol=0, atol=4e-6)


def _assert_float64(raw, n_vocab, got, pad, lse):
    """row_stats' outputs against float64: the logsumexp within 1e-6, the pad mass within 1e-5 relative, and (where
    written) the log-probs within the float32 error of the normaliser plus one rounding step of their dtype."""
    x = raw.double()
    want_lse = torch.logsumexp(x, -1)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pad.double(), (x[:, n_vocab:] - want_lse[:, None]).exp().sum(-1), rtol=1e-5, atol=1e-12)
    if got is None:
        return
    want = torch.log_softmax(x[:, :n_vocab], -1)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    err = (got.double() - want).abs()[finite]
    allowed = 4e-6 + ULP[got.dtype if got.dtype in ULP else torch.float32] * want.abs()[finite]
    assert (err <= allowed).all(), float((err - allowed).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width, n_vocab", [(151936, 151646), (152064, 151646), (151646, 151646), (1000, 997), (37, 20)])
def test_matches_float64(dtype, width, n_vocab):
    raw = _rows(7, width)
    out = torch.empty(7, n_vocab, dtype=dtype)
    got, pad, lse, _ = row_stats.row_stats(raw, n_vocab, out)
    assert got.data_ptr() == out.data_ptr()  # written in place, in the store's dtype
    _assert_float64(raw, n_vocab, got, pad, lse)


@pytest.mark.parametrize("width, n_vocab", [(151936, 151646), (151646, 151646), (37, 20)])
def test_the_sums_alone(width, n_vocab):
    """logprobs=False: no output, the same pad mass and logsumexp bit for bit."""
    raw = _rows(5, width, seed=3)
    _, pad, lse, _ = row_stats.row_stats(raw, n_vocab)
    none, pad_only, lse_only, _ = row_stats.row_stats(raw, n_vocab, logprobs=False)
    assert none is None and torch.equal(pad_only, pad) and torch.equal(lse_only, lse)


def test_threads_split_rows_the_same_way(monkeypatch):
    raw = _rows(9, 5000, seed=1)
    one_thread = row_stats.row_stats(raw, 4990, top=40)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    four = row_stats.row_stats(raw, 4990, top=40)
    for a, b in zip([*one_thread[:3], *one_thread[3]], [*four[:3], *four[3]], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("top", [1, 20, 147, row_stats.MAX_TOP, row_stats.MAX_TOP + 1])
@pytest.mark.parametrize("width, n_vocab", [(151936, 151646), (1000, 997), (37, 20)])
def test_top_is_torch_topk_of_the_full_row(top, width, n_vocab):
    raw = _rows(5, width, seed=2)
    raw[1, ::3] = raw[1, 0]  # a third of the row tied: the kernel keeps the lowest columns of a tie
    raw[2, n_vocab:] += 40.0  # the padding columns count too
    raw[3, 7:] = float("-inf")  # fewer finite entries than asked for: torch's -inf entries come back as well
    k = min(top, width)
    _, _, _, (values, columns) = row_stats.row_stats(raw, n_vocab, top=top)
    want_values, want_columns = raw.topk(k, dim=-1)
    assert values.shape == columns.shape == (5, k) and columns.dtype == torch.int64
    assert torch.equal(values, want_values)  # the same values, in descending order
    assert torch.equal(raw.gather(1, columns), values)  # each column holds its value
    for r in range(5):
        assert len(set(columns[r].tolist())) == k  # no column twice
        untied = values[r] > values[r, -1]  # every column above the k-th value is torch's too
        assert set(columns[r][untied].tolist()) == set(want_columns[r][untied].tolist())
    if top <= row_stats.MAX_TOP and k < width:
        tied = (values[1] == raw[1, 0]).nonzero().squeeze(1)
        assert columns[1, tied].tolist() == list(range(0, 3 * len(tied), 3))  # lowest columns first


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_gives_a_non_finite_logsumexp(bad):
    raw = _rows(3, 2000)
    raw[1, 1234] = bad
    _, _, lse, _ = row_stats.row_stats(raw, 1990, torch.empty(3, 1990, dtype=torch.float16))
    assert torch.isfinite(lse[[0, 2]]).all() and not torch.isfinite(lse[1])


def test_rejects_a_wrong_output_shape():
    with pytest.raises(ValueError, match="row-contiguous"):
        row_stats.row_stats(_rows(2, 100), 90, torch.empty(2, 91))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", [151646, 1000, 37])
def test_16_bit_outputs_round_as_torch_converts(dtype, width):
    """The stored log-probs are x − c rounded to the store's dtype to nearest, ties to even, as torch's .to() rounds:
    bit for bit. With no padding columns the kernel's c is the returned logsumexp (float32), so torch's own float32
    x − lse, converted by torch, is the exact expectation (test_matches_float64 allows one ulp, which truncation
    or rounding ties away from zero also meet)."""
    raw = _rows(7, width, seed=4)
    raw[3, : width // 2] = raw[3, : width // 2].to(torch.bfloat16).float() + 2.0**-9  # values at bfloat16 ties too
    got, _, lse, _ = row_stats.row_stats(raw, width, torch.empty(7, width, dtype=dtype))
    want = (raw - lse[:, None]).to(dtype)
    assert torch.equal(got.view(torch.int16) if dtype != torch.float32 else got, want.view(torch.int16) if dtype != torch.float32 else want)


class _RecordingLib:
    """Stands in for the built kernel library: says whether it has the 16-bit vector path (`vector`), and fails the
    test if asked to run."""

    def __init__(self, vector: int):
        self.vector = vector

    def rs_vector(self) -> int:
        return self.vector

    def rs_team(self, *args):
        raise AssertionError("the kernel ran where the torch path should have")


def test_no_top_unless_asked():
    """`top` defaults to 0: no top-k list comes back (None), on the kernel path and on the torch one."""
    raw = _rows(3, 1000)
    assert row_stats.row_stats(raw, 997)[3] is None
    assert row_stats.row_stats(raw.half(), 997)[3] is None


@pytest.mark.parametrize("top", [0, 3, 40])
def test_the_torch_path_gives_the_same_top(top):
    """Float16 logits take the torch path: with `top` it returns torch.topk of the full row (values descending, int64
    columns), [R, top]; without, None."""
    raw = _rows(4, 1000, seed=5).half()
    _, _, _, got = row_stats.row_stats(raw, 997, top=top)
    if not top:
        assert got is None
        return
    values, columns = got
    want = raw.float().topk(top, dim=-1)
    assert values.shape == columns.shape == (4, top) and columns.dtype == torch.int64
    assert torch.equal(values, want.values) and torch.equal(raw.float().gather(1, columns), values)


def test_rejects_an_output_whose_columns_are_not_contiguous():
    """A [R, n_vocab] output of the right shape whose columns are strided (a transposed block) is refused: the kernel
    writes each row as one run of memory."""
    out = torch.empty(997, 4).t()
    assert out.shape == (4, 997) and out.stride(1) != 1
    with pytest.raises(ValueError, match="row-contiguous"):
        row_stats.row_stats(_rows(4, 1000), 997, out)


def test_an_output_dtype_the_kernel_lacks_takes_the_torch_path():
    """A float64 output (no kernel kind): the torch path writes it, the float64 log-probs within float32 rounding."""
    raw = _rows(4, 1000, seed=6)
    out = torch.empty(4, 997, dtype=torch.float64)
    got, pad, lse, _ = row_stats.row_stats(raw, 997, out)
    assert got.data_ptr() == out.data_ptr()
    _assert_float64(raw, 997, got, pad, lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_a_kernel_without_the_16_bit_vector_path_leaves_16_bit_outputs_to_torch(monkeypatch, dtype):
    """Where the kernel was built without AVX-512 (rs_vector() = 0) it writes no 16-bit rows: float16 and bfloat16
    outputs take the torch path (a stand-in library fails the test if the kernel is run)."""
    monkeypatch.setattr(row_stats, "_lib", lambda: _RecordingLib(vector=0))
    raw = _rows(4, 1000, seed=7)
    got, pad, lse, _ = row_stats.row_stats(raw, 997, torch.empty(4, 997, dtype=dtype))
    _assert_float64(raw, 997, got, pad, lse)


def test_without_the_kernel_everything_takes_the_torch_path(monkeypatch):
    """No kernel here (no g++, a failed build: _lib raises, so available() says why): float32 logits give their float32
    log-probs, sums and top 5 through torch."""

    def broken():
        raise RuntimeError("the row_stats kernel needs g++ on PATH")

    monkeypatch.setattr(row_stats, "_lib", broken)
    assert row_stats.available().startswith("RuntimeError")
    raw = _rows(4, 1000, seed=8)
    got, pad, lse, (values, _) = row_stats.row_stats(raw, 997, top=5)
    _assert_float64(raw, 997, got, pad, lse)
    assert torch.equal(values, raw.topk(5, dim=-1).values)


def test_a_block_off_the_cpu_takes_the_torch_path(monkeypatch):
    """The kernel reads host memory: a block on another device (here "meta", which has no data) goes to torch, which
    gives the sums on that device; a stand-in library fails the test if the kernel is run."""
    monkeypatch.setattr(row_stats, "_lib", lambda: _RecordingLib(vector=1))
    raw = torch.empty(3, 100, device="meta")
    got, pad, lse, top = row_stats.row_stats(raw, 90, logprobs=False)
    assert got is None and top is None
    assert pad.device.type == lse.device.type == "meta" and pad.shape == lse.shape == (3,)


def test_a_tie_at_the_kth_place_keeps_its_lowest_columns():
    """Twenty 151936-wide rows, each with one clear top logit and 299 more tied just below it at random columns: the
    top 5 are the top column and the tie's 4 lowest columns, in ascending order (by hand: sorted). torch.topk's pick
    inside a tie is unspecified (here it strays from the lowest in some of these rows), so this is the kernel's rule.
    Then column 0 as the one column of a long tie that makes the top 5: a row whose last column is 0 is no short row
    (the -1 that marks one is below 0), so the kernel's pick stands."""
    gen = torch.Generator().manual_seed(3)
    raw, cols = tied_below_a_top(20, 151936, gen)
    want = [[int(c[0])] + sorted(c[1:].tolist())[:4] for c in cols]
    _, _, _, (values, columns) = row_stats.row_stats(raw, 151646, top=5)
    assert values.tolist() == [[-1.0] + [-3.0] * 4] * 20
    assert columns.tolist() == want
    # four clear top logits, then column 0 tied with 299 others: column 0, the tie's lowest, is the 5th (and last)
    raw, want = torch.randn(20, 151936, generator=gen) - 20, []
    for r in range(20):
        cols = torch.randperm(151935, generator=gen)[:303] + 1
        raw[r, cols[4:]] = raw[r, 0] = -3.0
        raw[r, cols[:4]] = torch.tensor([-1.0, -1.5, -2.0, -2.5])
        want.append(cols[:4].tolist() + [0])
    _, _, _, (values, columns) = row_stats.row_stats(raw, 151646, top=5)
    assert columns.tolist() == want
