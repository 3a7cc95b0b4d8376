"""Each metric against an independent computation (scipy, float64 by hand) on random rows."""

import numpy as np
import pytest
import torch
from scipy.special import rel_entr

from harness import metrics


def _probs(logp):
    """float64 probabilities of float32 log-prob rows, normalised exactly (the independent side)."""
    p = np.exp(logp.double().numpy())
    return p / p.sum(-1, keepdims=True)


def _rows(kind, n=16, v=5000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "peaked":
        logits = torch.randn(n, v, generator=gen) * 8
    elif kind == "near-uniform":
        logits = torch.randn(n, v, generator=gen) * 1e-3
    elif kind == "tied":
        logits = torch.randint(0, 3, (n, v), generator=gen).float()
    else:
        logits = torch.randn(n, v, generator=gen) * 2
    return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("kind", ["normal", "peaked", "near-uniform", "tied"])
def test_kl_matches_scipy(kind):
    p, q = _rows(kind, seed=1), _rows(kind, seed=2)
    ours = metrics.kl(p, q).numpy()
    theirs = rel_entr(_probs(p), _probs(q)).sum(-1)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-15)


def test_kl_of_tiny_drift_keeps_its_digits():
    """KL of ~1e-7 nats between float32 rows (below their own normalisation error) stays exact."""
    p = _rows("normal", seed=3)
    noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(4))
    q = torch.log_softmax(p + 5e-4 * noise, -1)
    exact = rel_entr(_probs(p), _probs(q)).sum(-1)
    assert exact.max() < 1e-6
    np.testing.assert_allclose(metrics.kl(p, q).numpy(), exact, rtol=1e-6)
    assert (metrics.kl(p, q) > 0).all()


def test_kl_with_filtered_rows_is_never_nan():
    p = torch.log_softmax(torch.tensor([[0.0, 1.0, -torch.inf, 2.0]]), -1)
    q_ok = torch.log_softmax(torch.tensor([[0.5, 1.0, 3.0, 2.0]]), -1)
    q_zero = torch.log_softmax(torch.tensor([[0.5, -torch.inf, 3.0, 2.0]]), -1)
    finite = metrics.kl(p, q_ok)
    assert torch.isfinite(finite).all() and finite.item() > 0  # p = 0 columns contribute nothing
    assert metrics.kl(p, q_zero).item() == float("inf")  # q = 0 where p > 0
    assert metrics.kl(p, p).item() == 0.0


def test_top1_agree():
    p = torch.log_softmax(torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]]), -1)
    q = torch.log_softmax(torch.tensor([[0.0, 5.0, 1.0], [0.0, 3.0, 1.0]]), -1)
    assert metrics.top1_agree(p, q).tolist() == [True, False]
