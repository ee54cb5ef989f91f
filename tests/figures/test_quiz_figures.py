"""The quiz's what-if figures: pure builders checked on their traces, axes and shapes."""

from __future__ import annotations

import numpy as np
import pytest

from kvviz.figures.quiz import own_weight_figure, tied_attention_figure

TOKENS = ["It", " is", " a", " truth"]


def causal(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.tril(rng.random((4, 4))).astype(np.float32)
    return m / m.sum(-1, keepdims=True)  # (4, 4) rows sum to 1, zero above the diagonal


def test_tied_attention_figure_draws_the_causal_matrix():
    m = causal(0)
    fig = tied_attention_figure(m, TOKENS, "What if")
    (heat,) = fig.data
    z = np.asarray(heat.z, dtype=float)
    assert z.shape == (4, 4)
    assert np.isnan(z[np.triu_indices(4, 1)]).all()  # the future is empty
    np.testing.assert_allclose(z[np.tril_indices(4)], m[np.tril_indices(4)], rtol=1e-6)
    assert list(heat.y) == ["0 It", "1 ␣is", "2 ␣a", "3 ␣truth"] and heat.zmin == 0 and heat.zmax == 1
    assert fig.layout.title.text == "What if" and fig.layout.yaxis.autorange == "reversed"
    assert fig.layout.xaxis.title.text == "key (position)"


def test_own_weight_figure_compares_the_diagonals():
    real, tied = causal(1), causal(2)
    fig = own_weight_figure(real, tied, TOKENS, "Own")
    assert [b.name for b in fig.data] == ["real W_k, W_v", "W_k = W_v = W_q"]
    np.testing.assert_allclose(np.asarray(fig.data[0].y, dtype=float), np.diagonal(real), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fig.data[1].y, dtype=float), np.diagonal(tied), rtol=1e-6)
    assert fig.layout.barmode == "group" and fig.layout.yaxis.title.text == "weight on itself"


@pytest.mark.parametrize("matrix", [np.zeros((3, 4)), np.zeros((3, 3)), np.zeros(4)])
def test_shapes_that_do_not_fit_the_tokens_are_refused(matrix):
    with pytest.raises(ValueError, match="square with one row per token"):
        tied_attention_figure(matrix, TOKENS, "x")
