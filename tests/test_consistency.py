import torch

from sd_plugin import consistency_loss


def test_matches_float64_reference():
    clean, masked = torch.randn(8, 5), torch.randn(8, 5)
    p = clean.double().softmax(-1)
    q = masked.double().softmax(-1)
    reference = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(consistency_loss(clean, masked).double(), reference, rtol=1e-5, atol=1e-6)


def test_zero_for_equal_predictions_and_positive_otherwise():
    logits = torch.randn(4, 10)
    assert float(consistency_loss(logits, logits)) == 0.0
    assert float(consistency_loss(logits, torch.randn(4, 10))) > 0.0


def test_detach_clean__gradient_flows_only_into_masked_branch():
    clean = torch.randn(4, 3, requires_grad=True)
    masked = torch.randn(4, 3, requires_grad=True)
    consistency_loss(clean, masked).backward()
    assert clean.grad is None and masked.grad is not None
    consistency_loss(clean, masked, detach_clean=False).backward()
    assert clean.grad is not None
