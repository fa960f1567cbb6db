"""The demo's run history counts a run's files however the run recorded them."""

from __future__ import annotations

import pytest

from localdev.demo import _print_runs


def test_the_run_history_counts_files_of_runs_with_and_without_a_manifest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = {"state": "promoted", "decision": {"reason": "better"}}
    runs = [
        {**base, "run_id": "r-manifest", "manifest": "manifests/m/r.json", "file_count": 3},
        {**base, "run_id": "r-listed", "files": [{"name": "a"}, {"name": "b"}]},
    ]
    _print_runs("m", runs)
    lines = capsys.readouterr().out.splitlines()
    counts = {line.split()[0]: line.split()[3] for line in lines if line.strip().startswith("r-")}
    assert counts == {"r-manifest": "3", "r-listed": "2"}
