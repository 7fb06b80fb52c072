"""`flwr run .` with ``fed.personalization = local-b``: the per-site table and each site's B.

One run of 4 simulated sites (the embedded data, by domain), 2 rounds, with the local-only
baseline so that all three columns of the per-site table are filled. The run must finish,
write the table with every site's three held-out losses, and leave every site's own B in
its state store, written in the last round. (That no B ever leaves a site is checked on the
messages themselves in tests/test_personal.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.flwr_procs import flwr_run, local_superlink_pids, stop_pids

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.long]

SITES = 4


def test_a_local_b_run_ends_with_each_sites_table_row_and_its_own_b(tmp_path: Path) -> None:
    # Prepare
    home, out, cache = tmp_path / "flwr-home", tmp_path / "outputs", tmp_path / "cache"
    run_config = " ".join(
        [
            f'output.dir="{out}"',
            'output.run-name="local-b"',
            "output.local-only-baseline=true",
            'fed.personalization="local-b"',
            "fed.num-rounds=2",
            "train.local-steps=5",
            "eval.tasks=false",
        ]
    )

    # Execute
    try:
        proc = flwr_run(home, run_config=run_config, num_supernodes=SITES, timeout=600, cache=cache)
    finally:
        stop_pids(local_superlink_pids(home))

    # Assert: the run finished with a row per site holding all three losses
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    summary = json.loads((out / "local-b" / "summary.json").read_text())
    assert summary["status"] == "ok", summary
    per_site = summary["per-site"]
    assert "missing" not in per_site, per_site
    assert len(per_site["sites"]) == SITES, per_site
    for label, row in per_site["sites"].items():
        for adapter in ("local-only", "global", "personal"):
            assert isinstance(row[adapter], float) and row[adapter] > 0, (label, row)
        # local-b's global adapter is A with B = 0 (the base model); the site's own B helps
        assert row["personal"] < row["global"], (label, row)
    # every site kept its own B, written by this run in its last round
    from flower_llm.personal import PERSONAL_B, read_entry
    from flower_llm.site_state import SiteStateStore

    state_dir = cache / "site-state" / "local-b"
    sites = sorted(p.name for p in state_dir.iterdir())
    assert sites == [f"partition-{i}-of-{SITES}" for i in range(SITES)], sites
    run_id = int((out / "local-b" / "run-id").read_text())
    for site in sites:
        entry = read_entry(SiteStateStore(state_dir.parent, "local-b", site), PERSONAL_B)
        assert entry is not None, site
        state, meta = entry
        assert (meta["run-id"], meta["last-round"]) == (run_id, 2)
        assert state and all("lora_B" in key for key in state)
        assert any(float(abs(v).max()) > 0 for v in state.values())  # trained, not zeros
