"""slerp between noise tensors."""

import torch

from difflab.diffusion.interpolation import slerp


def test_slerp_endpoints_norm_and_midpoint():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    mid = slerp(a, b, 0.5)
    # Equal-norm inputs keep their norm along the arc; the straight line would shrink it.
    a_n, b_n = a / a.flatten(1).norm(dim=1).view(-1, 1, 1, 1), b / b.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(slerp(a_n, b_n, 0.3).flatten(1).norm(dim=1), torch.ones(3), atol=1e-5)
    assert ((a_n + b_n) / 2).flatten(1).norm(dim=1).max() < 0.9
    # On the unit sphere the midpoint is equidistant from both ends.
    mid_n = slerp(a_n, b_n, 0.5)
    assert torch.allclose((mid_n - a_n).flatten(1).norm(dim=1), (mid_n - b_n).flatten(1).norm(dim=1), atol=1e-5)
    assert not torch.allclose(mid, (a + b) / 2, atol=1e-3)


def test_slerp_of_parallel_inputs_is_the_line():
    a = torch.randn(2, 4)
    assert torch.allclose(slerp(a, 2 * a, 0.5), 1.5 * a, atol=1e-5)
