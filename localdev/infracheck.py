"""Judge checkov's JSON report of infra/: fail on a failed check, a file checkov could not
parse (it skips such a file and passes otherwise), or a scan that checked nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def problems(report: Any) -> list[str]:
    """What is wrong with a report (checkov writes one object, or a list with one per framework)."""
    runs = report if isinstance(report, list) else [report]
    found: list[str] = []
    checked = 0
    for run in runs:
        summary = run.get("summary", {})
        checked += int(summary.get("passed", 0)) + int(summary.get("failed", 0))
        if summary.get("parsing_errors"):
            found.append(f"{run.get('check_type')}: {summary['parsing_errors']} file(s) not parsed")
        for check in run.get("results", {}).get("failed_checks", []):
            found.append(
                f"{check['check_id']} {check['check_name']}: {check['resource']} "
                f"({check['file_path']}:{check['file_line_range'][0]})"
            )
    if not checked:
        found.append("no check ran: is infra/ empty or the framework wrong?")
    return found


def main(argv: list[str]) -> int:
    """`python -m localdev.infracheck REPORT.json`: 0 when the scan passed, 1 otherwise."""
    report = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    found = problems(report)
    for line in found:
        print(f"infra-check: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
