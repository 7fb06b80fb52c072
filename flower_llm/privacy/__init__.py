"""Differential privacy: pure accounting and the DP-FedAvg mechanism.

:mod:`~flower_llm.privacy.accounting` is maths only (RDP of the Poisson-subsampled Gaussian
mechanism, conversion to epsilon, planning); :mod:`~flower_llm.privacy.mechanism` clips and
noises adapter updates with numpy. Neither imports Flower, torch or Opacus; sample-level
DP-SGD with Opacus lives in :mod:`flower_llm.privacy.dpsgd` and is imported only where used.
"""

from flower_llm.privacy.accounting import (
    DEFAULT_ORDERS,
    RdpAccountant,
    calibrate_noise_multiplier,
    compute_rdp,
    epsilon_after,
    max_rounds_within,
    rdp_to_epsilon,
    would_exceed,
)
from flower_llm.privacy.mechanism import (
    adaptive_clip_norm,
    adaptive_update_noise_multiplier,
    add_gaussian_noise,
    clip_update,
    dp_fedavg_noise_stddev,
    global_l2_norm,
    noisy_unclipped_fraction,
)

__all__ = [
    "DEFAULT_ORDERS",
    "RdpAccountant",
    "adaptive_clip_norm",
    "adaptive_update_noise_multiplier",
    "add_gaussian_noise",
    "calibrate_noise_multiplier",
    "clip_update",
    "compute_rdp",
    "dp_fedavg_noise_stddev",
    "epsilon_after",
    "global_l2_norm",
    "max_rounds_within",
    "noisy_unclipped_fraction",
    "rdp_to_epsilon",
    "would_exceed",
]
