"""Operator commands, working from the same app settings as the functions."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from retrain.errors import RetrainError


def _load_settings_file(path: Path) -> None:
    try:
        values = json.loads(path.read_text(encoding="utf-8")).get("Values", {})
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot read {path}: {exc}") from exc
    for key, value in values.items():
        os.environ.setdefault(key, str(value))


def preflight(models: Sequence[str]) -> int:
    """Check each model's promotion target; exit code 1 if any check fails."""
    from retrain.settings import get_settings
    from retrain.wiring import retrainer

    try:
        names = list(models) or list(get_settings().models)
        app = retrainer()
    except RetrainError as exc:
        print(f"configuration: FAILED\n  {exc}")
        return 1
    failed = 0
    for name in names:
        try:
            facts = app.preflight(name)
        except (RetrainError, ValueError) as exc:
            failed += 1
            print(f"{name}: FAILED\n  {exc}")
            continue
        print(f"{name}: ok")
        for fact in facts:
            print(f"  {fact}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run one command."""
    parser = argparse.ArgumentParser(prog="python -m retrain", description=__doc__)
    parser.add_argument(
        "--settings",
        type=Path,
        help="a local.settings.json whose Values fill in unset app settings",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("preflight", help="check each model's promotion target")
    check.add_argument("models", nargs="*", help="model names (default: all)")
    args = parser.parse_args(argv)
    if args.settings:
        _load_settings_file(args.settings)
    if args.command == "preflight":
        return preflight(args.models)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
