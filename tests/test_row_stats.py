"""The fused per-row kernel of extraction against a float64 computation: log-probs over the real
columns, the padding mass and the row's logsumexp, for every output dtype and awkward widths."""

from __future__ import annotations

import pytest
import torch

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width, n_vocab", [(151936, 151646), (152064, 151646), (151646, 151646), (1000, 997), (37, 20)])
def test_matches_float64(dtype, width, n_vocab):
    raw = _rows(7, width)
    out = torch.empty(7, n_vocab, dtype=dtype)
    got, pad, lse, _ = row_stats.row_stats(raw, n_vocab, out)
    assert got.data_ptr() == out.data_ptr()  # written in place, in the store's dtype
    x = raw.double()
    want_lse = torch.logsumexp(x, -1)
    want = x[:, :n_vocab] - torch.logsumexp(x[:, :n_vocab], -1, keepdim=True)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-6)
    want_pad = (x[:, n_vocab:] - want_lse[:, None]).exp().sum(-1)
    torch.testing.assert_close(pad.double(), want_pad, rtol=1e-5, atol=1e-12)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    # within the float32 error of the normaliser plus one rounding step of the output dtype
    err = (got.double() - want).abs()[finite]
    allowed = 4e-6 + ULP[dtype] * want.abs()[finite]
    assert (err <= allowed).all(), float((err - allowed).max())


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
