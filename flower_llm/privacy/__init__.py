"""Differential privacy: pure accounting and the DP-FedAvg mechanism.

:mod:`~flower_llm.privacy.accounting` is maths only (RDP of the Poisson-subsampled Gaussian
mechanism, conversion to epsilon, planning; the PLD accountant around dp-accounting; one
:class:`Accountant` interface for both); :mod:`~flower_llm.privacy.mechanism` clips and
noises adapter updates with numpy. Neither imports Flower, torch or Opacus; sample-level
DP-SGD with Opacus lives in :mod:`flower_llm.privacy.dpsgd` and is imported only where used.
"""

from flower_llm.privacy.accounting import (
    ACCOUNTANTS,
    DEFAULT_ORDERS,
    Accountant,
    DualAccountant,
    PldAccountant,
    RdpAccountant,
    accountant_from_state_dict,
    calibrate_noise_multiplier,
    compute_rdp,
    epsilon_after,
    epsilons,
    make_accountant,
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
    small_cohort_probability,
)

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ORDERS",
    "Accountant",
    "DualAccountant",
    "PldAccountant",
    "RdpAccountant",
    "accountant_from_state_dict",
    "adaptive_clip_norm",
    "adaptive_update_noise_multiplier",
    "add_gaussian_noise",
    "calibrate_noise_multiplier",
    "clip_update",
    "compute_rdp",
    "dp_fedavg_noise_stddev",
    "epsilon_after",
    "epsilons",
    "global_l2_norm",
    "make_accountant",
    "max_rounds_within",
    "noisy_unclipped_fraction",
    "rdp_to_epsilon",
    "small_cohort_probability",
    "would_exceed",
]
