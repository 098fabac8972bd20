"""Gradient-noise scales that depend on the global step, for ``OptimizeLoss(gradient_noise_scale=...)``."""

from __future__ import annotations

import math
from typing import Any

from lightning_optloss.common import validation
from lightning_optloss.gradients.noise import GradientNoise

_OWNER = "annealed_noise_scale"


class AnnealedNoiseScale:
    """``t -> sigma_t`` with ``sigma_t ** 2 = eta / (1 + t) ** gamma``: annealed noise (Neelakantan et al.).

    Called with the global step ``t`` (0 at the first update, as OptimizeLoss counts it, so ``sigma_0 ** 2 = eta``;
    optax's ``add_noise`` uses the same ``1 + t``), it returns ``sigma_t`` as a Python float. Instances pickle
    (``ddp_spawn``).

    OptimizeLoss multiplies a **truncated** normal (TF's: cut at ±2 standard deviations, standard deviation
    0.8796) by the scale, so by default the noise's standard deviation is ``0.8796 sigma_t``; the paper adds
    Gaussian noise of standard deviation ``sigma_t``. With ``match_paper_std=True`` the scale is
    ``sigma_t / 0.8796256610342398`` and the noise's standard deviation is ``sigma_t`` (its tails still cut, at
    ±2.27 sigma_t).

    References:
        Neelakantan, Vilnis, Le, Sutskever, Kaiser, Kurach & Martens, "Adding Gradient Noise Improves
        Learning for Very Deep Networks", 2015, section 2, https://arxiv.org/abs/1511.06807
    """

    def __init__(self, eta: float, gamma: float, match_paper_std: bool) -> None:
        self.eta = eta
        self.gamma = gamma
        self.match_paper_std = match_paper_std

    def __call__(self, global_step: int) -> float:
        step = _global_step(global_step)
        sigma = math.sqrt(self.eta / (1.0 + step) ** self.gamma)
        return sigma / GradientNoise.truncated_std if self.match_paper_std else sigma

    def __repr__(self) -> str:
        return f"annealed_noise_scale(eta={self.eta}, gamma={self.gamma}, match_paper_std={self.match_paper_std})"


def _global_step(value: Any) -> int:
    step = validation.as_integer(value)
    if step is None or step < 0:
        accepted = "an integer >= 0 (a Python int or a numpy/torch integer scalar)"
        raise validation.invalid(_OWNER, "global_step", accepted, value)
    return step


def annealed_noise_scale(eta: float = 0.01, gamma: float = 0.55, match_paper_std: bool = False) -> AnnealedNoiseScale:
    """The annealed gradient-noise scale ``sigma_t = sqrt(eta / (1 + t) ** gamma)``, a callable of the global step.

    For ``OptimizeLoss(gradient_noise_scale=annealed_noise_scale(...))``: the callback adds
    ``truncated_normal(shape) * sigma_t`` to every gradient at global step ``t``.

    Args:
        eta: The variance at step 0, a finite number > 0. The paper tries 0.01, 0.3 and 1.0. Default 0.01.
        gamma: The decay exponent of the variance, a finite number >= 0. Default 0.55 (the paper's).
        match_paper_std: Divide the scale by 0.8796 (the standard deviation of TF's truncated normal) so
            the noise's standard deviation is ``sigma_t``, as the paper's Gaussian. Default False (TF's
            convention: the scale multiplies the truncated normal).

    Returns:
        An :class:`AnnealedNoiseScale`: ``scale(global_step) -> float``.

    Examples:
        >>> from lightning_optloss import annealed_noise_scale
        >>> scale = annealed_noise_scale(eta=0.01, gamma=0.55)
        >>> scale(0), round(scale(99), 6)  # sqrt(0.01), sqrt(0.01 / 100 ** 0.55)
        (0.1, 0.028184)

    References:
        Neelakantan et al., "Adding Gradient Noise Improves Learning for Very Deep Networks", 2015,
        https://arxiv.org/abs/1511.06807
    """
    eta = validation.real(_OWNER, "eta", eta, minimum=0.0, strictly=True)
    gamma = validation.real(_OWNER, "gamma", gamma, minimum=0.0)
    match_paper_std = validation.boolean(_OWNER, "match_paper_std", match_paper_std)
    return AnnealedNoiseScale(eta, gamma, match_paper_std)
