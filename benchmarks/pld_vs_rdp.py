"""Noise that a target epsilon needs under the PLD and the RDP accountant (docs/privacy.md).

For each run (sampling rate ``q``, compositions ``T``) and target epsilon at ``delta``, the
smallest noise multiplier each accountant certifies (``calibrate_noise_multiplier``, relative
tolerance 1e-4), and the epsilon each reports at the issue-11 runs' own noise.

    python -m benchmarks.pld_vs_rdp
"""

from __future__ import annotations

from flower_llm.privacy import calibrate_noise_multiplier, epsilon_after

DELTA = 1e-5
#: (name, q, T): the two DP-FedAvg runs of issue 11 and a DP-SGD site (batch 8 of 128 examples,
#: 10 rounds of 30 steps).
RUNS = [
    ("20 sites, q=0.25, 6 rounds", 0.25, 6),
    ("16 sites, q=0.5, 4 rounds", 0.5, 4),
    ("DP-SGD, q=1/16, 300 steps", 1 / 16, 300),
]
TARGETS = (1.0, 2.0, 4.0, 8.0)
#: Noise of the issue-11 runs, for the epsilon comparison.
MEASURED = [
    ("20 sites, q=0.25, 6 rounds", 0.25, 6, 0.9),
    ("16 sites, q=0.5, 4 rounds", 0.5, 4, 1.3),
]


def main() -> None:
    print(f"delta = {DELTA}")
    print("| run | target epsilon | sigma (RDP) | sigma (PLD) | PLD / RDP |")
    print("|---|---:|---:|---:|---:|")
    for name, q, rounds in RUNS:
        for target in TARGETS:
            rdp = calibrate_noise_multiplier(target, DELTA, rounds, q, accountant="rdp")
            pld = calibrate_noise_multiplier(target, DELTA, rounds, q, accountant="pld")
            print(f"| {name} | {target:g} | {rdp:.4f} | {pld:.4f} | {pld / rdp:.3f} |")
    print()
    print("| run | sigma | epsilon (RDP) | epsilon (PLD) | PLD / RDP |")
    print("|---|---:|---:|---:|---:|")
    for name, q, rounds, sigma in MEASURED:
        rdp_eps = epsilon_after(rounds, sigma, q, DELTA, accountant="rdp")
        pld_eps = epsilon_after(rounds, sigma, q, DELTA, accountant="pld")
        print(f"| {name} | {sigma} | {rdp_eps:.3f} | {pld_eps:.3f} | {pld_eps / rdp_eps:.3f} |")


if __name__ == "__main__":
    main()
