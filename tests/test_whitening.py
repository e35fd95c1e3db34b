import io

import pytest
import torch
from compile_support import needs_torch_compile

from sd_plugin import GroupZCA
from sd_plugin.core.whitening import inverse_sqrt_psd, shrink_covariance


def correlated(batch: int, width: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=g) * 3 + torch.eye(width)
    return (torch.randn(batch, width, generator=g) @ mixing + 5.0).to(dtype)


METHODS = ["eigh", "newton_schulz", "cholesky"]


@pytest.mark.parametrize("method", METHODS)
def test_forward__whitens_each_group_to_identity_covariance(method):
    zca = GroupZCA(32, group_size=8, shrinkage=0.0, eps=0.0, method=method, ns_iterations=25)
    z = zca(correlated(1024, 32)).double()
    for group in z.split(8, dim=1):
        centred = group - group.mean(0)
        cov = centred.T @ centred / group.shape[0]
        # float32 statistics of a condition number ~1e3 covariance: identity to 1e-3.
        torch.testing.assert_close(cov, torch.eye(8, dtype=torch.float64), atol=1e-3, rtol=0)


def test_whitening_matrix__is_symmetric_zca_not_pca():
    zca = GroupZCA(16, group_size=8, shrinkage=0.0)
    f = correlated(512, 16)
    _, cov, _ = zca._batch_statistics(f)
    w = zca.whitening_matrix(cov)
    torch.testing.assert_close(w, w.transpose(-1, -2), atol=1e-5, rtol=1e-5)
    # ZCA is the unique symmetric whitening: W Sigma W = I with W symmetric.
    torch.testing.assert_close(w @ cov @ w, torch.eye(8).expand(2, 8, 8), atol=2e-3, rtol=0)


def test_inverse_sqrt__matches_float64_reference_and_newton_schulz():
    f = correlated(256, 8, dtype=torch.float64)
    sigma = torch.cov(f.T) + 0.1 * torch.eye(8, dtype=torch.float64)
    eigenvalues, q = torch.linalg.eigh(sigma)
    reference = q @ torch.diag(eigenvalues.rsqrt()) @ q.T
    torch.testing.assert_close(inverse_sqrt_psd(sigma), reference)
    shrunk = shrink_covariance(sigma, 0.5, 0.0)
    e2, q2 = torch.linalg.eigh(shrunk)
    torch.testing.assert_close(
        inverse_sqrt_psd(shrunk, "newton_schulz", iterations=12),
        q2 @ torch.diag(e2.rsqrt()) @ q2.T,
        atol=1e-6,
        rtol=1e-6,
    )


@pytest.mark.parametrize("method", METHODS)
def test_backward__gradcheck_float64(method):
    zca = GroupZCA(8, group_size=4, shrinkage=0.3, method=method).double()
    f = correlated(12, 8, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(zca, (f,), eps=1e-6, atol=1e-5)


def test_backward__custom_eigh_gradient_equals_autograd_on_distinct_eigenvalues():
    sigma = torch.cov(correlated(64, 6, dtype=torch.float64).T).requires_grad_(True)
    weights = torch.randn(6, 6, dtype=torch.float64)
    (inverse_sqrt_psd(sigma) * weights).sum().backward()
    custom = sigma.grad.clone()
    sigma.grad = None
    e, q = torch.linalg.eigh(sigma)
    ((q @ torch.diag(e.rsqrt()) @ q.T) * weights).sum().backward()
    torch.testing.assert_close(custom, sigma.grad)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "case",
    ["dead_units", "duplicated_features", "batch_smaller_than_group", "all_zero", "batch_of_one"],
)
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_torch_compile)])
def test_forward_backward__finite_on_degenerate_batches(case, method, compiled):
    f = correlated(32, 16)
    if case == "dead_units":
        f[:, :5] = 0.0
    elif case == "duplicated_features":
        f[:, 8:] = f[:, :8]
    elif case == "batch_smaller_than_group":
        f = f[:5]
    elif case == "all_zero":
        f = torch.zeros(32, 16)
    elif case == "batch_of_one":
        f = f[:1]
    f.requires_grad_(True)
    zca = GroupZCA(16, group_size=8, method=method, compiled=compiled)
    z = zca(f)
    (z.square().sum() + z.sum()).backward()
    assert torch.isfinite(z).all()
    assert torch.isfinite(f.grad).all()
    # Plain autograd through eigh would give NaN/inf here; ours must not.
    assert torch.isfinite(zca.running_cov).all()


@pytest.mark.parametrize("method", METHODS)
def test_eval__batch_of_one_and_independent_of_batch_composition(method):
    zca = GroupZCA(16, group_size=8, method=method)
    for seed in range(5):
        zca(correlated(64, 16, seed=seed))
    zca.eval()
    batch = correlated(10, 16, seed=99)
    full = zca(batch)
    alone = zca(batch[3:4])
    assert alone.shape == (1, 16)
    torch.testing.assert_close(alone, full[3:4])
    torch.testing.assert_close(zca(batch.flip(0)).flip(0), full)


@pytest.mark.parametrize("method", METHODS)
def test_autocast_bf16__statistics_in_float32(method):
    zca = GroupZCA(16, group_size=8, shrinkage=0.0, method=method, ns_iterations=25)
    f = correlated(256, 16)
    reference = zca(f)
    zca_bf16 = GroupZCA(16, group_size=8, shrinkage=0.0, method=method, ns_iterations=25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = zca_bf16(f.bfloat16())
    assert z.dtype == torch.bfloat16
    assert zca_bf16.running_cov.dtype == torch.float32
    assert torch.isfinite(z.float()).all()
    # bf16 inputs carry ~3 significant digits.
    assert (z.float() - reference).abs().mean() < 0.05


def test_running_buffers__detached_and_state_dict_round_trip():
    zca = GroupZCA(16, group_size=4)
    f = correlated(64, 16).requires_grad_(True)
    zca(f).sum().backward()
    for name, buffer in zca.named_buffers():
        assert not buffer.requires_grad, name
        assert buffer.grad_fn is None, name
    assert int(zca.num_batches_tracked) == 1
    state = io.BytesIO()
    torch.save(zca.state_dict(), state)
    state.seek(0)
    restored = GroupZCA(16, group_size=4)
    restored.load_state_dict(torch.load(state))
    zca.eval()
    restored.eval()
    x = correlated(8, 16, seed=3)
    torch.testing.assert_close(restored(x), zca(x))


def test_running_statistics__first_batch_replaces_init_then_momentum():
    zca = GroupZCA(4, group_size=4, momentum=0.5)
    a, b = correlated(100, 4, seed=1), correlated(100, 4, seed=2)
    zca(a)
    torch.testing.assert_close(zca.running_mean, a.mean(0))
    torch.testing.assert_close(zca.running_cov[0], torch.cov(a.T), rtol=1e-4, atol=1e-4)
    zca(b)
    torch.testing.assert_close(zca.running_mean, 0.5 * a.mean(0) + 0.5 * b.mean(0))


def test_init__error_group_size_not_dividing():
    with pytest.raises(ValueError, match=r"group_size=5 does not divide num_features=16.*\[1, 2, 4, 8, 16\]"):
        GroupZCA(16, group_size=5)


def test_forward__error_wrong_width():
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        GroupZCA(16, group_size=4)(torch.randn(4, 12))


@pytest.mark.parametrize(("width", "group"), [(392, 8), (512, 16), (512, 32)])
def test_newton_schulz__matches_eigh_on_real_feature_shapes(width, group):
    f = correlated(128, width) * 0.1 + torch.randn(128, width)
    eigh = GroupZCA(width, group_size=group)
    newton = GroupZCA(width, group_size=group, method="newton_schulz")
    torch.testing.assert_close(newton(f), eigh(f), rtol=1e-3, atol=1e-3)


def test_eval__whitening_matrix_cached_until_the_buffers_change():
    zca = GroupZCA(16, group_size=8)
    zca(correlated(64, 16, seed=1))
    zca.eval()
    x = correlated(6, 16, seed=2)
    first = zca(x)
    cached = zca._eval_cache[1]
    torch.testing.assert_close(zca(x), first)
    assert zca._eval_cache[1] is cached  # not decomposed again
    zca.train()
    zca(correlated(64, 16, seed=3))  # running statistics move
    zca.eval()
    expected = torch.einsum("bgi,gij->bgj", (x - zca.running_mean).view(6, 2, 8), zca.whitening_matrix())
    torch.testing.assert_close(zca(x), expected.reshape(6, 16))
    state = GroupZCA(16, group_size=8).state_dict()
    zca.load_state_dict(state)  # identity statistics again
    torch.testing.assert_close(zca(x), (x - 0.0) @ torch.eye(16) / (1.0 + 1e-5) ** 0.5, rtol=1e-4, atol=1e-4)


@needs_torch_compile
@pytest.mark.parametrize("method", METHODS)
def test_compiled__same_whitening_gradients_and_running_statistics_as_eager(method):
    from sd_plugin.core.decorrelation import compiled_decorrelation_loss, decorrelation_loss

    eager = GroupZCA(32, group_size=8, method=method)
    compiled = GroupZCA(32, group_size=8, method=method, compiled=True)
    for seed in range(2):
        x = correlated(48, 32, seed=seed)
        x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
        z_eager, z_compiled = eager(x_eager), compiled(x_compiled)
        torch.testing.assert_close(z_compiled, z_eager, rtol=1e-4, atol=1e-4)
        decorrelation_loss(z_eager).backward()
        compiled_decorrelation_loss()(z_compiled).backward()
        torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(compiled.running_cov, eager.running_cov)
    torch.testing.assert_close(compiled.running_mean, eager.running_mean)
    assert int(compiled.num_batches_tracked) == 2
    compiled.track_running_stats = False  # a frozen pass (another graph) leaves the buffers alone
    before = compiled.running_cov.clone()
    compiled(correlated(48, 32, seed=5))
    torch.testing.assert_close(compiled.running_cov, before)


def test_compiled__error_with_synced_statistics():
    with pytest.raises(ValueError, match="sync_statistics"):
        GroupZCA(16, group_size=8, compiled=True, sync_statistics=True)


# -- the Cholesky whitening against ZCA (issue 20): the loss does not see the rotation -----------


def _loss_and_gradient(features, method, dtype, shrinkage, eps=1e-5, liveness_weight=2.0, group_size=8):
    from sd_plugin.core.decorrelation import whitened_decorrelation_loss

    f = features.to(dtype).clone().requires_grad_(True)
    whitening = GroupZCA(f.shape[1], group_size=group_size, method=method, shrinkage=shrinkage, eps=eps)
    loss = whitened_decorrelation_loss(whitening, f, liveness_weight=liveness_weight)
    loss.backward()
    return float(loss.detach()), f.grad.double().flatten()


def _feature_cases():
    g = torch.Generator().manual_seed(0)
    random = torch.randn(256, 32, generator=g) @ torch.randn(32, 32, generator=g)
    # 8 latent factors shared by all four groups of 8: cross-group copies (what the loss penalises)
    low_rank = torch.randn(256, 8, generator=g) @ torch.randn(8, 32, generator=g)
    low_rank += 0.1 * torch.randn(256, 32, generator=g)  # and a little noise: conditioned for float32
    dead = random.clone()
    dead[:, :5] = 0.0  # five dead (constant) units
    return {"random": random, "low-rank": low_rank, "dead units": dead}


@pytest.mark.parametrize("case", ["random", "low-rank", "dead units"])
def test_cholesky__same_decorrelation_loss_and_gradient_as_zca_float64_reference(case):
    """Exact whitening makes the whitened covariance I for both, so the loss cannot see the rotation: equal to
    round-off. With the default shrinkage they differ by less than switching the shrinkage off changes ZCA."""
    features = _feature_cases()[case]
    cosine = torch.nn.functional.cosine_similarity
    # exact whitening (a dead unit needs a ridge for a finite inverse: then equal to the ridge's effect)
    exact = {"shrinkage": 0.0, "eps": 1e-5 if case == "dead units" else 0.0}
    ref_loss, ref_grad = _loss_and_gradient(features, "eigh", torch.float64, **exact)
    for dtype, tolerance in ((torch.float64, 1e-7), (torch.float32, 1e-4)):
        loss, grad = _loss_and_gradient(features, "cholesky", dtype, **exact)
        assert loss == pytest.approx(ref_loss, rel=tolerance)
        assert float(cosine(grad, ref_grad, dim=0)) > 1 - tolerance
    # the default shrinkage 0.01: the whitened covariance is no longer I, so the rotation shows a little
    zca_loss, zca_grad = _loss_and_gradient(features, "eigh", torch.float64, 0.01)
    chol_loss, chol_grad = _loss_and_gradient(features, "cholesky", torch.float64, 0.01)
    # the gradient within what switching the shrinkage off changes in ZCA itself (the measure)
    assert (chol_grad - zca_grad).norm() < (ref_grad - zca_grad).norm()
    assert chol_loss == pytest.approx(zca_loss, rel=0.06 if case == "low-rank" else 1e-3)
    # the same direction: closely for well-conditioned groups, roughly for near-low-rank ones
    assert float(cosine(chol_grad, zca_grad, dim=0)) > (0.9 if case == "low-rank" else 0.9999)


def test_cholesky__stays_exact_in_float32_where_zca_gradient_is_round_off():
    """Dead units without the liveness term: float32 ZCA's gradient is noise (repeated tiny eigenvalues),
    the Cholesky whitening's matches its float64 value."""
    features = _feature_cases()["dead units"]
    cosine = torch.nn.functional.cosine_similarity
    _, chol64 = _loss_and_gradient(features, "cholesky", torch.float64, 0.01, liveness_weight=0.0)
    _, chol32 = _loss_and_gradient(features, "cholesky", torch.float32, 0.01, liveness_weight=0.0)
    assert float(cosine(chol32, chol64, dim=0)) > 0.9999


def test_cholesky__a_matrix_it_cannot_factor_gives_nan_not_a_wrong_whitening():
    from sd_plugin.core.whitening import cholesky_whitening

    indefinite = torch.tensor([[[1.0, 2.0], [2.0, 1.0]], [[2.0, 0.0], [0.0, 3.0]]])
    w = cholesky_whitening(indefinite)
    assert torch.isnan(w[0]).all()  # reported through the loss it feeds (the step's finite check)
    torch.testing.assert_close(w[1].T @ indefinite[1] @ w[1], torch.eye(2))


def test_whiten_for_loss__leaves_running_statistics_alone():
    zca = GroupZCA(16, group_size=8)
    before = zca.running_cov.clone()
    zca.train()
    zca.whiten_for_loss(correlated(64, 16))
    assert int(zca.num_batches_tracked) == 0
    torch.testing.assert_close(zca.running_cov, before)


@pytest.mark.parametrize("method", METHODS)
def test_whitened_loss__a_dying_group_costs_liveness(method):
    """A whole group whose features shrink towards a constant (a conv channel dying: on digits the
    default step lost one where the baseline kept it, CI of 2026-12) must raise the whitened
    decorrelation loss. A per-group shrinkage target re-scaled such a group to unit variance, so the
    loss did not change until the group was below ``eps``: the liveness term never saw it."""
    from sd_plugin.core.decorrelation import whitened_decorrelation_loss

    features = torch.randn(512, 32, generator=torch.Generator().manual_seed(0))
    losses = []
    for scale in (1.0, 1e-1, 1e-2, 1e-3):
        f = features.clone()
        f[:, :8] *= scale  # the first group of 8 fades; its shape within the group is unchanged
        whitening = GroupZCA(32, group_size=8, method=method)
        losses.append(float(whitened_decorrelation_loss(whitening, f)))
    assert losses[0] < losses[1] < losses[2] < losses[3]
    # at 0.1% of the scale (still 10x above eps) the group is nearly dead to the loss: about the liveness
    # weight 2 per feature (the per-group target gave 0.1 here)
    assert losses[3] - losses[0] > 0.8 * 2.0 * 8


def test_shrink_covariance__target_is_the_layer_mean_variance_not_each_groups():
    sigma = torch.stack([4.0 * torch.eye(3), torch.zeros(3, 3)])
    shrunk = shrink_covariance(sigma, 0.25, 0.0)
    torch.testing.assert_close(shrunk[0], (0.75 * 4.0 + 0.25 * 2.0) * torch.eye(3))
    torch.testing.assert_close(shrunk[1], 0.25 * 2.0 * torch.eye(3))
    with pytest.raises(ValueError, match=r"\(G, g, g\) or \(g, g\)"):
        shrink_covariance(torch.zeros(2, 2, 3, 3), 0.1, 0.0)
