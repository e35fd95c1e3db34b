"""Group-wise ZCA whitening of penultimate features.

``GroupZCA`` splits ``D`` features into groups of ``g`` and whitens each group with its
own batch statistics: ``z = (f - mu) W`` with ``W = Q diag(lambda)^-1/2 Q^T`` from the
(shrunk) covariance. Statistics and the decomposition run in float32 with autocast off,
and the backward of the inverse square root uses the Daleckii-Krein form
``K_ij = -1 / (sqrt(l_i) sqrt(l_j) (sqrt(l_i) + sqrt(l_j)))``, which stays finite when
eigenvalues repeat (dead or duplicated units, rank-deficient batches).

``method="cholesky"`` whitens with ``W = L^-T`` from the Cholesky factor ``S = L L^T`` instead: the
same whitened covariance up to a rotation within each group, at the cost of one batched
factorisation and one triangular solve, and no host synchronisation. The rotation depends on the
feature order, so it is for whitening that feeds only the decorrelation loss (whose value does not
depend on it without shrinkage, and barely with the default shrinkage: ``tests/test_whitening.py``);
ZCA (``eigh``) is the whitening a head may read.

Example:
    >>> import torch
    >>> from sd_plugin import GroupZCA
    >>> zca = GroupZCA(8, group_size=4, shrinkage=0.0)
    >>> f = torch.randn(256, 8) @ torch.randn(8, 8)
    >>> z = zca(f)
    >>> cov = z[:, :4].T @ z[:, :4] / 256
    >>> bool(torch.allclose(cov, torch.eye(4), atol=1e-3))
    True
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ..utils.choices import WHITENING_METHODS, check_choice, check_fraction
from ..utils.distributed import sum_over_processes
from ..utils.errors import NonFiniteLossError
from ..utils.precision import at_least_float32, autocast_off

__all__ = ["GroupZCA", "cholesky_whitening", "inverse_sqrt_psd", "shrink_covariance"]


class _InverseSqrtEigh(torch.autograd.Function):
    """``S^-1/2`` of a batch of symmetric positive definite matrices, with a stable backward."""

    @staticmethod
    def forward(ctx, sigma: Tensor) -> Tensor:  # type: ignore[override]
        eigenvalues, eigenvectors = torch.linalg.eigh(sigma)
        # Shrinkage guarantees positive eigenvalues; the clamp guards round-off only.
        floor = torch.finfo(sigma.dtype).tiny ** 0.5
        sqrt_eig = eigenvalues.clamp_min(floor).sqrt()
        inv_sqrt = (eigenvectors / sqrt_eig.unsqueeze(-2)) @ eigenvectors.transpose(-1, -2)
        ctx.save_for_backward(eigenvectors, sqrt_eig)
        return inv_sqrt

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:  # type: ignore[override]
        eigenvectors, sqrt_eig = ctx.saved_tensors
        grad_sym = 0.5 * (grad_output + grad_output.transpose(-1, -2))
        s_i = sqrt_eig.unsqueeze(-1)
        s_j = sqrt_eig.unsqueeze(-2)
        kernel = -1.0 / (s_i * s_j * (s_i + s_j))
        inner = eigenvectors.transpose(-1, -2) @ grad_sym @ eigenvectors
        return eigenvectors @ (inner * kernel) @ eigenvectors.transpose(-1, -2)


def inverse_sqrt_psd(sigma: Tensor, method: str = "eigh", iterations: int = 15) -> Tensor:
    """Inverse matrix square root of symmetric positive definite matrices ``(..., g, g)``.

    ``method="eigh"`` uses an eigendecomposition with a finite custom backward;
    ``method="newton_schulz"`` uses the coupled Newton-Schulz iteration (matrix products
    only, differentiated by autograd); after trace normalisation it needs about
    ``log2.25(trace / lambda_min)`` iterations, so the default 15 covers condition numbers
    up to ~1e4 (with 5, ``test_newton_schulz__matches_eigh_on_real_feature_shapes`` fails).

    Example:
        >>> s = torch.tensor([[4.0, 0.0], [0.0, 9.0]])
        >>> inverse_sqrt_psd(s)
        tensor([[0.5000, 0.0000],
                [0.0000, 0.3333]])
    """
    check_choice("method", method, ("eigh", "newton_schulz"))
    if method == "eigh":
        return _InverseSqrtEigh.apply(sigma)
    return _newton_schulz_inverse_sqrt(sigma, iterations)


def cholesky_whitening(sigma: Tensor) -> Tensor:
    """``W = L^-T`` for ``sigma = L L^T`` (``(..., g, g)``, positive definite): ``W^T sigma W = I``.

    A whitening matrix for row vectors (``z = x W``) that is not ZCA's symmetric one but a
    rotation of it. No host synchronisation: ``cholesky_ex`` reports a failed factorisation
    (NaN input, a matrix that is not positive definite) in a device tensor, and such a
    matrix's ``W`` is all NaN, so the loss it feeds is non-finite and the training step's
    finite check names it, instead of a silently wrong whitening.

    Example:
        >>> s = torch.tensor([[4.0, 2.0], [2.0, 5.0]])
        >>> w = cholesky_whitening(s)
        >>> torch.allclose(w.T @ s @ w, torch.eye(2), atol=1e-6)
        True
    """
    factor, info = torch.linalg.cholesky_ex(sigma)
    identity = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device).expand_as(sigma)
    inverse = torch.linalg.solve_triangular(factor, identity, upper=False)
    failed = (info != 0)[..., None, None]
    return torch.where(failed, torch.full_like(inverse, float("nan")), inverse).transpose(-1, -2)


def _newton_schulz_inverse_sqrt(sigma: Tensor, iterations: int) -> Tensor:
    size = sigma.shape[-1]
    identity = torch.eye(size, dtype=sigma.dtype, device=sigma.device).expand_as(sigma)
    norm = sigma.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(sigma.dtype).tiny)
    norm = norm[..., None, None]
    y = sigma / norm
    z = identity
    for _ in range(iterations):
        t = 0.5 * (3.0 * identity - z @ y)
        y = y @ t
        z = t @ z
    return z / norm.sqrt()


def shrink_covariance(sigma: Tensor, shrinkage: float, eps: float) -> Tensor:
    """``(1 - a) S_k + a v I + eps I`` for the group covariances ``S_k`` of one layer, ``(G, g, g)`` or ``(g, g)``.

    ``v`` is the layer's mean feature variance (the mean diagonal over all ``G`` groups), so the
    result is positive definite for any input scale (``eps`` covers all-zero features) and the
    target does not follow a single group's scale: a group whose features all shrink towards
    a constant whitens to small outputs, which the decorrelation loss's liveness term charges,
    instead of being re-scaled to unit variance as a per-group ``tr(S_k)/g`` target would do
    (``tests/test_whitening.py::test_whitened_loss__a_dying_group_costs_liveness``). One ``v``
    for the layer is also the paper's ``Sigma + eps I`` with a scale-relative ``eps``.

    Example:
        >>> s = torch.stack([torch.eye(2), 0.0 * torch.eye(2)])  # a live and a dead group
        >>> shrink_covariance(s, 0.5, 0.0)[1]  # the dead group gets the layer's target, not 0
        tensor([[0.2500, 0.0000],
                [0.0000, 0.2500]])
    """
    if sigma.dim() not in (2, 3):
        raise ValueError(f"shrink_covariance expects (G, g, g) or (g, g) covariances, got {tuple(sigma.shape)}.")
    identity = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)
    mean_variance = sigma.diagonal(dim1=-2, dim2=-1).mean()
    return (1.0 - shrinkage) * sigma + (shrinkage * mean_variance + eps) * identity


@functools.cache
def _compiled_whiten_batch():
    """One compiled function for every ``GroupZCA`` (a module attribute would break deepcopy and pickling)."""
    return torch.compile(lambda module, f: module._whiten_batch(f))


def _decomposition_error() -> NonFiniteLossError:
    return NonFiniteLossError(
        "GroupZCA could not decompose the feature covariance (the penultimate features contain "
        "NaN or inf): check the inputs for NaN and lower the learning rate."
    )


class GroupZCA(nn.Module):
    """Group-wise ZCA whitening, ``(B, D) -> (B, D)``.

    Args:
        num_features: ``D``, the feature width.
        group_size: ``g``, features per whitening group; must divide ``D``. Keep
            ``g <= 32`` and batches of at least ``2 g`` for a full-rank covariance.
        shrinkage: ``a`` in ``(1 - a) S_k + a v I`` (``v``: the layer's mean feature variance,
            ``shrink_covariance``); keeps rank-deficient batches and repeated eigenvalues
            finite, and a dying group visible to the loss. ``0`` whitens exactly.
        eps: absolute ridge added to the shrunk covariance.
        momentum: update rate of the running mean and covariance used in eval mode.
        method: ``"eigh"`` (default) or ``"newton_schulz"`` for ZCA's inverse square root, or
            ``"cholesky"`` for the Cholesky whitening (a rotation of ZCA; for loss-only use).
        ns_iterations: Newton-Schulz iterations (``method="newton_schulz"`` only).
        compiled: ``torch.compile`` the training-mode computation (statistics, running
            update, inverse square root, whitening) into fused kernels; the first batch of
            each shape compiles (seconds to a minute). Not with ``sync_statistics``; back-
            propagate each forward once (torch refuses ``retain_graph`` on compiled graphs
            with donated buffers).
        sync_statistics: reduce batch statistics over ``torch.distributed`` processes
            (autograd-aware), so ``N`` processes with ``B/N`` equal one with ``B``.

    In training mode the batch statistics whiten the input and update the running
    buffers (unless ``track_running_stats`` is switched off for a pass); in eval mode the
    running buffers are used, so a batch of one works and outputs do not depend on the
    rest of the batch.
    """

    running_mean: Tensor
    running_cov: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        num_features: int,
        group_size: int = 16,
        shrinkage: float = 0.01,
        eps: float = 1e-5,
        momentum: float = 0.1,
        method: str = "eigh",
        sync_statistics: bool = False,
        ns_iterations: int = 15,
        compiled: bool = False,
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}.")
        if group_size < 1 or num_features % group_size != 0:
            divisors = [d for d in range(1, min(num_features, 64) + 1) if num_features % d == 0]
            raise ValueError(
                f"group_size={group_size} does not divide num_features={num_features}; "
                f"choose a group_size among {divisors}."
            )
        check_fraction("shrinkage", shrinkage)
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        check_fraction("momentum", momentum, low_open=True)
        check_choice("method", method, WHITENING_METHODS)
        if compiled and sync_statistics:
            raise ValueError(
                "compiled=True is not supported with sync_statistics=True (cross-process statistics); "
                "turn one of them off."
            )
        self.num_features = num_features
        self.group_size = group_size
        self.num_groups = num_features // group_size
        self.shrinkage = shrinkage
        self.eps = eps
        self.momentum = momentum
        self.method = method
        self.ns_iterations = ns_iterations
        self.sync_statistics = sync_statistics
        self.compiled = compiled
        self.track_running_stats = True
        self._eval_cache: tuple[tuple, Tensor] | None = None
        # Set by ``ModelAdapter.attach_whitening``: where the whitening sits in the model.
        self.feeds_head = False
        self.tap_module_name: str | None = None
        self.tap_where: str | None = None
        eye = torch.eye(group_size).expand(self.num_groups, group_size, group_size).clone()
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_cov", eye)
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, group_size={self.group_size}, shrinkage={self.shrinkage}, "
            f"eps={self.eps}, momentum={self.momentum}, method={self.method!r}"
            + (", compiled=True" if self.compiled else "")
        )

    def forward(self, features: Tensor) -> Tensor:
        self._check_shape(features)
        with autocast_off(features):
            f = at_least_float32(features)
            if self.training:
                try:
                    z = self._training_forward()(f)
                except torch.linalg.LinAlgError as error:
                    raise _decomposition_error() from error
            else:
                z = self._whiten(f, self.running_mean.to(f.dtype), self._eval_whitening(f.dtype))
        return z.to(features.dtype)

    def _training_forward(self):
        """``_whiten_batch``, or its ``torch.compile``d form when ``compiled=True``."""
        return functools.partial(_compiled_whiten_batch(), self) if self.compiled else self._whiten_batch

    def _whiten_batch(self, f: Tensor, update_running: bool = True) -> Tensor:
        """Training mode: whiten with the batch statistics (and update the running ones)."""
        mean, cov, count = self._batch_statistics(f)
        if update_running and self.track_running_stats:
            self._update_running(mean.detach(), cov.detach(), count.detach())
        return self._whiten(f, mean, self.whitening_matrix(cov))

    def whiten_for_loss(self, features: Tensor) -> Tensor:
        """``features`` whitened with their batch statistics, in float32, running statistics untouched.

        For a whitening that feeds only the decorrelation loss: nothing reads its running
        statistics (they serve eval-mode forwards, which such a whitening never runs), so they
        are not updated. Differentiable; the caller's mode (train/eval) does not matter.
        """
        self._check_shape(features)
        with autocast_off(features):
            f = at_least_float32(features)
            try:
                return self._whiten_batch(f, update_running=False)
            except torch.linalg.LinAlgError as error:
                raise _decomposition_error() from error

    def _check_shape(self, features: Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(
                f"GroupZCA expects features of shape (B, {self.num_features}), got {tuple(features.shape)}."
            )

    def _whiten(self, f: Tensor, mean: Tensor, whitening: Tensor) -> Tensor:
        centred = (f - mean).view(-1, self.num_groups, self.group_size)
        return torch.einsum("bgi,gij->bgj", centred, whitening).reshape(-1, self.num_features)

    def _decompose(self, cov: Tensor) -> Tensor:
        try:
            return self.whitening_matrix(cov)
        except torch.linalg.LinAlgError as error:
            raise _decomposition_error() from error

    def _eval_whitening(self, dtype: torch.dtype) -> Tensor:
        """Eval-mode ``W`` from the running covariance, decomposed once per buffer version.

        ``W`` depends on buffers only, so it is a constant for any eval input; it is
        recomputed when the buffer changes in place (training steps, ``load_state_dict``).
        """
        key = (self.running_cov._version, self.running_cov.data_ptr(), dtype)
        if self._eval_cache is None or self._eval_cache[0] != key:
            with torch.no_grad():
                self._eval_cache = (key, self._decompose(self.running_cov.to(dtype)))
        return self._eval_cache[1]

    def whitening_matrix(self, cov: Tensor | None = None) -> Tensor:
        """``W`` per group, ``(num_groups, g, g)``, from ``cov`` (default: running)."""
        cov = self.running_cov if cov is None else cov
        shrunk = shrink_covariance(cov, self.shrinkage, self.eps)
        if self.method == "cholesky":
            return cholesky_whitening(shrunk)
        return inverse_sqrt_psd(shrunk, self.method, self.ns_iterations)

    def _batch_statistics(self, f: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sync = self.sync_statistics
        count = sum_over_processes(f.new_full((), f.shape[0]), sync)  # no host-to-device copy
        mean = sum_over_processes(f.sum(0), sync) / count
        centred = (f - mean).view(-1, self.num_groups, self.group_size)
        scatter = sum_over_processes(torch.einsum("bgi,bgj->gij", centred, centred), sync)
        return mean, scatter / count, count

    @torch.no_grad()
    def _update_running(self, mean: Tensor, cov: Tensor, count: Tensor) -> None:
        mean, cov, count = (t.to(self.running_mean.dtype) for t in (mean, cov, count))
        unbiased = cov * (count / (count - 1).clamp_min(1.0))
        # The first batch replaces the identity initialisation; later ones use momentum.
        weight = torch.where(self.num_batches_tracked == 0, 1.0, self.momentum).to(mean)
        # A non-finite batch never reaches the running buffers (checked without a host sync).
        finite = torch.isfinite(mean).all() & torch.isfinite(unbiased).all()
        self.running_mean.copy_(torch.where(finite, torch.lerp(self.running_mean, mean, weight), self.running_mean))
        self.running_cov.copy_(torch.where(finite, torch.lerp(self.running_cov, unbiased, weight), self.running_cov))
        self.num_batches_tracked.add_(finite.long())
