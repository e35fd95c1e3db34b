import pytest
import torch

from sd_plugin import decorrelation_loss
from sd_plugin.decorrelation import decorrelation_floor


def reference_loss(f: torch.Tensor) -> torch.Tensor:
    """Naive float64 loop: mean over features of the squared off-diagonal correlations."""
    f = f.double()
    b, d = f.shape
    total = torch.zeros((), dtype=torch.float64)
    for i in range(d):
        for j in range(d):
            if i != j:
                fi = (f[:, i] - f[:, i].mean()) / f[:, i].std(unbiased=False)
                fj = (f[:, j] - f[:, j].mean()) / f[:, j].std(unbiased=False)
                total += ((fi * fj).mean()) ** 2
    return total / d


def test_matches_float64_reference():
    f = torch.randn(64, 6) @ torch.randn(6, 6)
    torch.testing.assert_close(decorrelation_loss(f, eps=0.0).double(), reference_loss(f), rtol=1e-4, atol=1e-6)


def test_independent_features__near_floor():
    torch.manual_seed(0)
    batch, width = 512, 32
    losses = torch.stack([decorrelation_loss(torch.randn(batch, width)) for _ in range(20)])
    floor = decorrelation_floor(batch, width)
    assert abs(float(losses.mean()) - floor) < 0.1 * floor


def test_correlated_features__large():
    base = torch.randn(256, 1)
    f = base + 0.1 * torch.randn(256, 16)
    assert float(decorrelation_loss(f)) > 10.0  # close to the maximum D - 1 = 15


def test_scale_invariant_per_feature():
    f = torch.randn(128, 8) @ torch.randn(8, 8)
    scales = torch.tensor([1e-3, 1.0, 10.0, 1e3, 0.5, 2.0, 7.0, 100.0])
    torch.testing.assert_close(decorrelation_loss(f * scales + 3.0), decorrelation_loss(f), rtol=1e-3, atol=1e-5)


def test_dead_units_finite():
    f = torch.randn(32, 8)
    f[:, :3] = 0.0
    f.requires_grad_(True)
    loss = decorrelation_loss(f)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f.grad).all()


def test_error_batch_size_1():
    with pytest.raises(ValueError, match="at least 2 samples"):
        decorrelation_loss(torch.randn(1, 8))
