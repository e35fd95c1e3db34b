import pytest
import torch

from sd_plugin import GroupZCA, decorrelation_loss
from sd_plugin.core.decorrelation import decorrelation_floor


def reference_loss(f: torch.Tensor, liveness_weight: float = 0.0, ratio: float = 0.01) -> torch.Tensor:
    """Naive float64 loops: squared off-diagonal correlations over D, plus w * sum (1 - R_ii)^2."""
    f = f.double()
    b, d = f.shape
    mean_variance = sum(f[:, i].var(unbiased=False) for i in range(d)) / d
    ridge = ratio * mean_variance if liveness_weight > 0 else 0.0

    def standardised(i):
        return (f[:, i] - f[:, i].mean()) / (f[:, i].var(unbiased=False) + ridge).sqrt()

    total = torch.zeros((), dtype=torch.float64)
    for i in range(d):
        for j in range(d):
            r_ij = (standardised(i) * standardised(j)).mean()
            total += r_ij**2 / d if i != j else liveness_weight * (1.0 - r_ij) ** 2
    return total


def test_matches_float64_reference():
    torch.manual_seed(0)
    f = torch.randn(64, 6) @ torch.randn(6, 6)
    expected = reference_loss(f, liveness_weight=2.0)
    torch.testing.assert_close(decorrelation_loss(f, eps=0.0).double(), expected, rtol=1e-4, atol=1e-6)
    paper_term = decorrelation_loss(f, eps=0.0, liveness_weight=0.0).double()
    torch.testing.assert_close(paper_term, reference_loss(f), rtol=1e-4, atol=1e-6)


def test_matches_float64_reference__with_dying_features():
    torch.manual_seed(1)
    f = torch.randn(64, 6) @ torch.randn(6, 6)
    f[:, 1] *= 0.05  # below the 1% variance ratio: about half dead
    f[:, 4] *= 1e-4  # nearly dead
    expected = reference_loss(f, liveness_weight=2.0)
    assert float(expected - reference_loss(f)) > 1.0  # the diagonal is active
    torch.testing.assert_close(decorrelation_loss(f, eps=0.0).double(), expected, rtol=1e-4, atol=1e-6)


def test_liveness_weight_0__is_the_paper_term():
    torch.manual_seed(2)
    f = torch.randn(64, 6)
    f[:, :2] = 1.0
    expected = reference_loss(f[:, 2:]) * 4 / 6
    torch.testing.assert_close(decorrelation_loss(f, liveness_weight=0.0).double(), expected, rtol=1e-4, atol=1e-6)


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


def test_correlation_term__scale_invariant_per_feature():
    f = torch.randn(128, 8) @ torch.randn(8, 8)
    scales = torch.tensor([1e-3, 1.0, 10.0, 1e3, 0.5, 2.0, 7.0, 100.0])
    torch.testing.assert_close(
        decorrelation_loss(f * scales + 3.0, liveness_weight=0.0),
        decorrelation_loss(f, liveness_weight=0.0),
        rtol=1e-3,
        atol=1e-5,
    )


def test_scale_invariant__globally():
    torch.manual_seed(0)
    f = torch.randn(128, 8) @ torch.randn(8, 8)
    f[:, 2] *= 1e-3
    for scale in (1e-4, 1e4):
        torch.testing.assert_close(decorrelation_loss(f * scale - 2.0), decorrelation_loss(f), rtol=1e-3, atol=1e-5)


def test_nearly_scale_invariant_per_feature__within_the_live_range():
    torch.manual_seed(0)
    f = torch.randn(128, 8) @ torch.randn(8, 8)
    scales = torch.tensor([0.5, 1.0, 2.0, 0.7, 1.5, 1.2, 0.8, 1.0])
    # the ridge is 1% of the mean variance: rescaling live features moves the loss by about that much
    torch.testing.assert_close(decorrelation_loss(f * scales + 3.0), decorrelation_loss(f), rtol=0.03, atol=1e-3)


def _independent(batch: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, width, generator=generator)


@pytest.mark.parametrize("kind", ["dead", "near_constant", "duplicated"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_collapsed_features__score_worse_than_alive_independent(kind, k):
    f = _independent(128, 32)
    collapsed = f.clone()
    if kind == "dead":
        collapsed[:, :k] = 0.7
    elif kind == "near_constant":
        collapsed[:, :k] = 0.7 + 1e-4 * collapsed[:, :k]
    else:
        collapsed[:, :k] = collapsed[:, k : k + 1]  # copies of feature k
    assert float(decorrelation_loss(collapsed)) > float(decorrelation_loss(f))


@pytest.mark.parametrize("target", ["features", "whitened"])
def test_dead_features__score_worse_on_both_targets(target):
    torch.manual_seed(0)
    f = torch.randn(128, 32) @ (torch.eye(32) + 0.3 * torch.randn(32, 32))
    dead = f.clone()
    dead[:, [0, 5, 17]] = 0.0
    zca = GroupZCA(32, group_size=8)

    def loss(x):
        return decorrelation_loss(zca(x) if target == "whitened" else x)

    assert float(loss(dead)) > float(loss(f)) + 5.0  # 3 dead units cost about 2 each
    # The paper's term alone is the defect: it scores the batch with dead units better.
    old = decorrelation_loss(zca(dead) if target == "whitened" else dead, liveness_weight=0.0)
    assert float(old) < float(decorrelation_loss(zca(f) if target == "whitened" else f, liveness_weight=0.0))


def test_killing_any_feature_never_lowers_the_loss():
    torch.manual_seed(0)
    for trial in range(5):
        f = torch.randn(64, 12) @ torch.randn(12, 12)  # strongly correlated features
        full = float(decorrelation_loss(f))
        for unit in range(12):
            killed = f.clone()
            killed[:, unit] = 0.0
            assert float(decorrelation_loss(killed)) > full, (trial, unit)


def test_gradient_pushes_a_dying_feature_back_up():
    torch.manual_seed(0)
    f = torch.randn(128, 16)
    f[:, 3] *= 0.05  # dying: 5% of the others' standard deviation
    f.requires_grad_(True)
    decorrelation_loss(f).backward()
    stepped = f.detach() - 0.1 * f.grad
    assert float(stepped[:, 3].std()) > 1.2 * float(f.detach()[:, 3].std())
    assert float(f.grad[:, 3].abs().max()) < 1.0  # bounded by the ridge, not divided by the tiny std
    # the others barely move
    assert float((stepped[:, [0, 1, 2]] - f.detach()[:, [0, 1, 2]]).abs().max()) < 0.05


def test_error_negative_liveness_weight():
    with pytest.raises(ValueError, match="liveness_weight"):
        decorrelation_loss(torch.randn(8, 4), liveness_weight=-1.0)


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
