"""Write one JSONL data file per site from the embedded dataset, each heavy in one domain.

    python scripts/deploy/make_site_data.py NUM_SITES --out DIR [--heavy 0.8] [--seed 0]

Site ``i``'s "home" domain is ``DOMAINS[i % 3]`` (medical, finance, smart-home). Every
record goes to exactly one site: with probability ``--heavy`` to one of its domain's home
sites, otherwise to any other site, so each site holds mostly one kind of question (the
non-IID setting federated fine-tuning is for) and the files are disjoint. Each file is what
a real site would point its SuperNode at: ``--node-config 'data-path="DIR/site-<i>.jsonl"'``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from flower_llm.embedded import DOMAINS, generate_instruction_dataset


def assign_sites(
    rows: list[dict[str, str]], num_sites: int, heavy: float, seed: int
) -> list[list[dict[str, str]]]:
    """Deal ``rows`` to ``num_sites`` sites, each heavy in its home domain.

    Parameters
    ----------
    rows : list[dict[str, str]]
        Records with a ``domain`` key.
    num_sites : int
        Number of sites (>= 1).
    heavy : float
        Probability, in [0, 1], that a record goes to a home site of its domain.
    seed : int
        Same seed, same files.

    Returns
    -------
    list[list[dict[str, str]]]
        The records of each site; disjoint, together all of ``rows``.
    """
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    if not 0.0 <= heavy <= 1.0:
        raise ValueError(f"heavy must be in [0, 1], got {heavy}")
    rng = random.Random(seed)
    sites: list[list[dict[str, str]]] = [[] for _ in range(num_sites)]
    for row in rows:
        home = [i for i in range(num_sites) if DOMAINS[i % len(DOMAINS)] == row["domain"]]
        others = [i for i in range(num_sites) if i not in home]
        # A domain without a home site (fewer sites than domains) is spread evenly.
        pool = home if home and (not others or rng.random() < heavy) else others or home
        sites[rng.choice(pool)].append(row)
    return sites


def write_site_files(
    out_dir: str | Path, num_sites: int, heavy: float = 0.8, seed: int = 0
) -> list[Path]:
    """Write ``site-<i>.jsonl`` for every site under ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, records in enumerate(
        assign_sites(generate_instruction_dataset(seed=seed), num_sites, heavy, seed)
    ):
        path = out / f"site-{i}.jsonl"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        tmp.replace(path)
        paths.append(path)
    return paths


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("num_sites", type=int)
    parser.add_argument("--out", required=True, help="directory for site-<i>.jsonl")
    parser.add_argument("--heavy", type=float, default=0.8, help="share of the home domain")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in write_site_files(args.out, args.num_sites, args.heavy, args.seed):
        domains: dict[str, int] = {}
        for line in path.read_text().splitlines():
            domain = json.loads(line)["domain"]
            domains[domain] = domains.get(domain, 0) + 1
        print(f"{path}: {sum(domains.values())} records {dict(sorted(domains.items()))}")


if __name__ == "__main__":
    main()
