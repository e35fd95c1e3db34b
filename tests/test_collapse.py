"""Dimensional collapse: live-feature counting, the one-time warning, and a real-data check.

The real-data test trains the paper's CNN on scikit-learn's digits: with the paper's
decorrelation term alone (``decor_liveness_weight=0``) SaliencyDecor kills penultimate
features that the baseline keeps; with the default objective no seed does.
"""

import warnings

import pytest
import tiny_models
import torch
from collapse_digits_seeds import train_digits

from sd_plugin import SaliencyDecorTrainer
from sd_plugin.core.collapse import CollapseMonitor, FeatureCollapseWarning, live_feature_fraction


def test_live_feature_fraction__counts_constant_and_near_constant_features_as_dead():
    f = torch.randn(64, 10)
    f[:, 0] = 3.0
    f[:, 1] = 3.0 + 1e-6 * torch.randn(64)
    f[:, 2] *= 0.05  # small but alive
    assert float(live_feature_fraction(f)) == pytest.approx(0.8)
    assert float(live_feature_fraction(f * 1e6)) == pytest.approx(0.8)  # relative to the batch's scale
    assert float(live_feature_fraction(torch.zeros(8, 4))) == 0.0


def test_live_feature_fraction__error_batch_size_1():
    with pytest.raises(ValueError, match="B >= 2"):
        live_feature_fraction(torch.randn(1, 4))


def test_collapse_monitor__warns_once_below_the_fraction():
    monitor = CollapseMonitor(min_fraction=0.5)
    assert not monitor.check({"loss": 1.0})
    assert not monitor.check({"live_features": 0.6}, step=1)
    with pytest.warns(FeatureCollapseWarning, match="30% of the penultimate features are alive at step 2"):
        assert monitor.check({"live_features": 0.3}, step=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not monitor.check({"live_features": 0.1}, step=3)  # once only


class HalfDeadHead(torch.nn.Module):
    """A tiny classifier whose penultimate layer has 6 of 8 features stuck at a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8))
        self.fc = torch.nn.Linear(8, tiny_models.NUM_CLASSES)

    def forward(self, pixel_values, labels=None):
        features = self.body(pixel_values)
        features = torch.cat([features[:, :2], features[:, 2:] * 0.0 + 1.0], dim=1)
        return {"logits": self.fc(features)}


def test_trainer__logs_live_features_and_warns_on_collapse(tmp_path):
    from test_trainer import config, dataset

    args = config(tmp_path, method="sgt", feature_layer=None)
    trainer = SaliencyDecorTrainer(model=HalfDeadHead(), args=args, train_dataset=dataset())
    with pytest.warns(FeatureCollapseWarning, match="25% of the penultimate features"):
        trainer.train()
    logged = [entry["live_features"] for entry in trainer.state.log_history if "live_features" in entry]
    assert logged == [0.25, 0.25]


@pytest.mark.slow  # ~70 s on 2 cores; CI runs it (.ci/run: make test-slow)
def test_real_digits__no_seed_loses_features_the_baseline_keeps():
    baseline_live = {}
    for seed in (0, 1):
        baseline_accuracy, baseline_live[seed] = train_digits("baseline", seed)
        for method in ("decor", "saliencydecor"):
            method_accuracy, live = train_digits(method, seed)
            assert live >= baseline_live[seed], (method, seed, live, baseline_live[seed])
            assert method_accuracy > baseline_accuracy - 2.0, (method, seed, method_accuracy, baseline_accuracy)
    # The paper's term alone (the defect this objective fixes) loses features on the same data.
    _, paper_term_live = train_digits("saliencydecor", 0, decor_liveness_weight=0.0, decor_weight=0.01)
    assert paper_term_live < baseline_live[0] - 50
