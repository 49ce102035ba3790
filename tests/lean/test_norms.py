"""graphprune.lean.norms: kernel operator norms vs dense circulant matrices, power iteration."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphprune import lean


def dense_periodic_norm(k: torch.Tensor, n: int, s: int) -> float:
    """Spectral norm of y[m] = sum_u k[u] x[(s m + u) mod n] on n x n, from its explicit matrix."""
    kh, kw = k.shape
    eye = torch.eye(n * n, dtype=torch.float64).reshape(n * n, 1, n, n)
    xp = F.pad(eye, (0, kw - 1, 0, kh - 1), mode="circular")
    a = F.conv2d(xp, k.reshape(1, 1, kh, kw), stride=s).reshape(n * n, -1).T
    return float(torch.linalg.matrix_norm(a, ord=2))


@pytest.mark.parametrize("method", ["autocorr", "fft"])
@pytest.mark.parametrize("stride,ksize", [(1, 3), (1, 5), (1, 1), (2, 3), (2, 4), (2, 1), (1, 2)])
def test_kernel_norms_match_dense_operator(method, stride, ksize):
    torch.manual_seed(ksize + 10 * stride)
    w = torch.randn(2, 3, ksize, ksize, dtype=torch.float64)
    got = lean.kernel_operator_norms(w, stride, 8, method=method)
    ref = torch.tensor([[dense_periodic_norm(w[i, j], 8, stride) for j in range(3)] for i in range(2)],
                       dtype=torch.float64)
    assert got.shape == (2, 3)
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-12)


def test_kernel_norms_1x1_linear_and_1d():
    w = torch.randn(4, 5, 1, 1)
    assert torch.equal(lean.kernel_operator_norms(w, 2), w.abs()[:, :, 0, 0])
    lin = torch.randn(3, 7)
    assert torch.equal(lean.kernel_operator_norms(lin), lin.abs())
    w1 = torch.randn(2, 2, 3, dtype=torch.float64)  # a 1-d conv is a 2-d one with a 1 x k kernel
    a = lean.kernel_operator_norms(w1, 2, 16)
    assert torch.allclose(a, lean.kernel_operator_norms(w1, 2, 16, method="fft"), rtol=1e-9)
    assert torch.allclose(a, lean.kernel_operator_norms(w1[:, :, None, :], (1, 2), 16), rtol=1e-9)


def test_layer_operator_norm_power_iteration():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2).double()
    x = torch.eye(2 * 36, dtype=torch.float64).reshape(-1, 2, 6, 6)
    a = (conv(x) - conv(torch.zeros_like(x[:1]))).reshape(72, -1).T.detach()
    ref = float(torch.linalg.matrix_norm(a, ord=2))
    assert lean.layer_operator_norm(conv, (1, 2, 6, 6)) == pytest.approx(ref, rel=1e-6)
