"""The method's choice sets and value checks, defined once (every layer validates with these).

Each check raises ``ValueError`` naming the argument, the value and what to use instead.

Example:
    >>> from sd_plugin.utils.choices import MASK_FILLS, check_choice
    >>> check_choice("mask_fill", "noise", MASK_FILLS)
    Traceback (most recent call last):
    ...
    ValueError: mask_fill='noise' is not supported; allowed values are ('random', 'mean', 'zero', 'blur').
"""

from __future__ import annotations

__all__ = [
    "ADVERSARIAL_NORMS",
    "CLASSIFICATION_LOSSES",
    "CONSISTENCY_GRADS",
    "DECOR_TARGETS",
    "ENERGY_LAYERS",
    "GUIDANCE_MASKS",
    "INPUT_GRADIENT_MODES",
    "MASK_FILLS",
    "MASK_SELECTIONS",
    "METHODS",
    "SALIENCY_TARGETS",
    "WHITENING_METHODS",
    "WHITENING_METHOD_SETTINGS",
    "check_choice",
    "check_fraction",
    "check_mask_ratio",
    "check_weight",
]

METHODS = ("baseline", "sgt", "decor", "saliencydecor")
# What replaces a masked pixel: a random image value, the per-channel mean, zero, or a blur.
MASK_FILLS = ("random", "mean", "zero", "blur")
# Which pixels the masked pass replaces: the least salient by input gradient (SGT, SaliencyDecor), or
# pixels drawn uniformly at random per image: the explanation-agnostic control (F-Fidelity), same
# ratio, fill and consistency, no input gradient.
MASK_SELECTIONS = ("least_salient", "random")
CONSISTENCY_GRADS = ("detached", "both")
DECOR_TARGETS = ("whitened", "features")
# What the masking saliency is the input gradient of: the clean objective (cross-entropy plus the
# weighted decorrelation term: free, its backward runs anyway), the cross-entropy alone, or the
# true-class logit. The last two cost one more backward to the input when they differ from the first.
SALIENCY_TARGETS = ("objective", "loss", "logit")
# How a group's whitening matrix is computed: ZCA by eigendecomposition or by the Newton-Schulz
# iteration, or a Cholesky whitening (not ZCA: a rotation of it, for whitening that feeds only
# the loss, which does not see the rotation). "auto" in the settings: Cholesky when the whitening
# only feeds the loss, ZCA by eigh when it feeds the head.
WHITENING_METHODS = ("eigh", "newton_schulz", "cholesky")
WHITENING_METHOD_SETTINGS = ("auto", *WHITENING_METHODS)
# The ball adversarial training perturbs the inputs in (PGD): l_inf (sign steps) or l_2 (normalised steps).
ADVERSARIAL_NORMS = ("linf", "l2")
# How the input-gradient norm penalty is computed: double back-propagation (exact), or a finite
# difference along the gradient direction (first-order gradients only).
INPUT_GRADIENT_MODES = ("double_backprop", "finite_difference")

# What the classification term is (B-cos papers: binary cross-entropy with a logit bias)
CLASSIFICATION_LOSSES = ("cross_entropy", "binary_cross_entropy")

# Where the Energy loss reads the explanation (Rao et al., ICCV 2023): Input×Gradient at the input,
# or Grad-CAM of the last feature map
ENERGY_LAYERS = ("input", "features")

# Which masks guide it: the batch's own, the batch's masks shuffled across its images (control), or
# one centred disc of the batch's mean mask area for every image (the "look at the middle" control)
GUIDANCE_MASKS = ("given", "shuffled", "centred")


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """``value`` must be one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values are {allowed}.")


def check_mask_ratio(value: float, name: str = "mask_ratio") -> None:
    """A fraction of pixels to replace, in ``[0, 1)``."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value} is out of range; use a fraction in [0, 1), e.g. 0.25.")


def check_weight(name: str, value: float) -> None:
    """A loss weight, ``>= 0`` (0 switches the term off)."""
    if value < 0:
        raise ValueError(f"{name}={value} is negative; use a weight >= 0 (0 switches the term off).")


def check_fraction(name: str, value: float, *, low_open: bool = False) -> None:
    """A value in ``[0, 1]`` (``(0, 1]`` with ``low_open``)."""
    if not ((0.0 < value) if low_open else (0.0 <= value)) or value > 1.0:
        raise ValueError(f"{name}={value} must be in {'(0, 1]' if low_open else '[0, 1]'}.")
