"""Operator commands, working from the same app settings as the functions.

Exit codes: 0 done, 1 the command ran and found or caused a failure, 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from retrain.errors import ConfigError, InputRejected, RetrainError, SetupError
from retrain.runstate import RunState

Doc = dict[str, Any]


class Output:
    """Tables for people, JSON for scripts."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(self, data: Any, text: Callable[[], str]) -> None:
        """Print `data` as JSON, or the human rendering."""
        print(json.dumps(data, indent=2, sort_keys=True) if self.as_json else text())


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def _reason(run: Doc) -> str:
    if run.get("error"):
        return str(run["error"])
    if run.get("state") == RunState.REJECTED and run.get("rejected_by"):
        return _rejection(run)
    return str((run.get("decision") or {}).get("reason") or "")


def _rejection(run: Doc) -> str:
    """Who turned a run down by hand, and why (older records keep it only in the history)."""
    reason = run.get("rejected_reason")
    if reason is None:
        notes = [h["note"] for h in run.get("history") or [] if h.get("state") == RunState.REJECTED]
        return str(notes[-1]) if notes else f"rejected by {run['rejected_by']}"
    return f"rejected by {run['rejected_by']}: {reason}"


def _app() -> Any:
    from retrain.wiring import retrainer

    return retrainer()


def cmd_runs(args: argparse.Namespace, out: Output) -> int:
    from retrain.pipeline.records import file_count  # the pipeline is loaded by _app() anyway

    runs = _app().runs(args.model)
    if args.state:
        runs = [r for r in runs if r["state"] == args.state]
    out.emit(
        runs,
        lambda: (
            _table(
                [
                    [
                        r["run_id"],
                        r["model"],
                        r["state"],
                        str(file_count(r)),
                        r.get("updated_at") or r["created_at"],
                        _reason(r)[:80],
                    ]
                    for r in runs
                ],
                ["RUN", "MODEL", "STATE", "FILES", "UPDATED", "REASON"],
            )
            if runs
            else "no runs"
        ),
    )
    return 0


def cmd_show(args: argparse.Namespace, out: Output) -> int:
    app = _app()
    found = app.find_run(args.run)
    run = {**found, "files": app.run_files(found)}

    def text() -> str:
        lines = [f"run {run['run_id']} of {run['model']}: {run['state']}"]
        if run.get("kind") == "rollback":
            lines.append(f"  restores run {run['restores']}")
        lines.append(f"  job: {run.get('job_id') or '-'}   polls: {run.get('polls', 0)}")
        lines.append(f"  training file: {(run.get('training_file') or {}).get('name', '-')}")
        if run.get("training_file_reason"):
            lines.append(f"    chosen: {run['training_file_reason']}")
        for f in run.get("files") or []:
            forced = f"  FORCED ({f.get('requested')})" if f.get("forced") else ""
            lines.append(f"    {f['name']}  {f['size']} bytes  arrived {f['arrived_at']}{forced}")
        for side in ("challenger", "champion"):
            metrics = (run.get("metrics") or {}).get(side)
            if metrics:
                shown = ", ".join(f"{k} {v:.6g}" for k, v in metrics.items())
                lines.append(f"  {side}: {shown}")
        if run.get("decision"):
            lines.append(f"  decision: {run['decision']['reason']}")
        if run.get("state") == RunState.REJECTED and run.get("rejected_by"):
            lines.append(f"  {_rejection(run)}")
        if run.get("error"):
            lines.append(f"  error: {run['error']}")
        lines.append("  timeline:")
        lines += [f"    {h['at']}  {h['state']:<18} {h['note']}" for h in run["history"]]
        return "\n".join(lines)

    out.emit(run, text)
    return 0


def cmd_retrain(args: argparse.Namespace, out: Output) -> int:
    why = f"requested by {args.by}" + (f": {args.reason}" if args.reason else "")
    batch = _app().request(args.model, args.blob, reason=why, force=args.force)
    out.emit(
        {"model": args.model, "batch_id": batch},
        lambda: f"queued: batch {batch} of {args.model} will be sealed into a run",
    )
    return 0


def cmd_approve(args: argparse.Namespace, out: Output) -> int:
    app = _app()
    run = app.find_run(args.run)
    app.approve(run["model"], args.run, by=args.by)
    out.emit(
        {"run_id": args.run, "state": RunState.PROMOTING.value},
        lambda: f"approved: run {args.run} of {run['model']} is being promoted",
    )
    return 0


def cmd_reject(args: argparse.Namespace, out: Output) -> int:
    app = _app()
    run = app.find_run(args.run)
    app.reject(run["model"], args.run, by=args.by, reason=args.reason)
    out.emit(
        {"run_id": args.run, "state": RunState.REJECTED.value},
        lambda: f"rejected: run {args.run} of {run['model']} ({args.reason})",
    )
    return 0


def cmd_rollback(args: argparse.Namespace, out: Output) -> int:
    run_id = _app().rollback(args.model, args.to, by=args.by)
    out.emit(
        {"model": args.model, "run_id": run_id},
        lambda: f"rolling back {args.model}: run {run_id} is being promoted",
    )
    return 0


def _problem(exc: RetrainError) -> str:
    """What a check found: a configuration problem (a setting, or a resource a setting names,
    is wrong: fix it, then check again) or a service problem (it did not answer as it should)."""
    return "configuration" if isinstance(exc, ConfigError | SetupError) else "service"


def _indented(text: str, by: str = "  ") -> str:
    return text.replace("\n", "\n" + by)


def cmd_preflight(args: argparse.Namespace, out: Output) -> int:
    from retrain.settings import get_settings

    names = list(args.models) or list(get_settings().models)
    app = _app()
    results: list[Doc] = []
    for name in names:
        facts: list[str] = []
        errors: list[str] = []
        problems: set[str] = set()
        steps: list[Callable[[str], list[str]]] = [
            lambda n: app.probe(n).splitlines(),
            lambda n: _target_facts(app, n).splitlines(),
        ]
        for step in steps:
            try:
                facts += step(name)
            except RetrainError as exc:
                errors.append(str(exc))
                problems.add(_problem(exc))
        if errors:
            problem = "service" if "service" in problems else "configuration"
            results.append(
                {"model": name, "ok": False, "problem": problem, "error": "\n".join(errors)}
            )
        else:
            results.append({"model": name, "ok": True, "facts": facts})
    out.emit(results, lambda: "\n".join(_preflight_text(r) for r in results))
    return 0 if all(r["ok"] for r in results) else 1


def _preflight_text(result: Doc) -> str:
    if result["ok"]:
        return f"{result['model']}: ok\n" + "\n".join(f"  {f}" for f in result["facts"])
    status = "configuration: FAILED" if result["problem"] == "configuration" else "FAILED"
    return f"{result['model']}: {status}\n  {_indented(result['error'])}"


def _check(check: str, detail: Callable[[], str]) -> Doc:
    try:
        return {"check": check, "ok": True, "detail": detail()}
    except RetrainError as exc:
        return {"check": check, "ok": False, "problem": _problem(exc), "detail": str(exc)}


def _check_text(row: Doc) -> str:
    if row["ok"]:
        head = "ok "
    else:
        head = "FAIL" + (" configuration:" if row.get("problem") == "configuration" else "")
    return f"{head} {row['check']}: {_indented(row['detail'], '    ')}"


def _target_setup(name: str) -> list[str]:
    from retrain.settings import get_settings
    from retrain.wiring import check_target_setup

    return check_target_setup(get_settings(), name)


def _target_facts(app: Any, name: str) -> str:
    """The target's setup check (v2: the endpoint and the deployment template's assets), then,
    when it passes, its preflight: one fact a line."""
    return "\n".join(_target_setup(name) + app.preflight(name))


def cmd_check(args: argparse.Namespace, out: Output) -> int:
    from retrain.settings import get_settings
    from retrain.wiring import check_storage

    settings = get_settings()
    app = _app()
    checks: list[Doc] = [
        {"check": "configuration", "ok": True, "detail": f"{len(settings.models)} model(s)"}
    ]
    checks += [vars(c) for c in check_storage(settings)]
    try:
        states = {name: app.model_state(name) for name in settings.models}
        checks.append({"check": "model states", "ok": True, "detail": "readable"})
    except RetrainError as exc:
        checks.append({"check": "model states", "ok": False, "detail": str(exc)})
        states = {}
    for name, spec in settings.models.items():
        service = "BES" if spec.training.kind == "bes" else "Azure ML workspace"
        checks.append(_check(f"{service} of {name}", functools.partial(app.probe, name)))
        checks.append(_check(f"target of {name}", functools.partial(_target_facts, app, name)))
        champion = (states.get(name) or {}).get("champion") or {}
        checks.append(
            {
                "check": f"champion of {name}",
                "ok": True,
                "detail": champion.get("run_id") or "none yet",
            }
        )
    out.emit(checks, lambda: "\n".join(_check_text(c) for c in checks))
    return 0 if all(c["ok"] for c in checks) else 1


def cmd_poison(args: argparse.Namespace, out: Output) -> int:
    app = _app()
    if args.replay:
        replayed = app.replay_poison()
        kept = [
            {"key": r.get("key"), "run_id": r.get("run_id"), "reason": r["replay_refused"]}
            for r in app.poisoned()
            if not r.get("replayed") and r.get("replay_refused")
        ]
        out.emit(
            {"replayed": replayed, "kept": kept},
            lambda: "\n".join(
                [f"replayed {len(replayed)} message(s)"]
                + [f"kept (run {k['run_id']}): {k['reason']}" for k in kept]
            ),
        )
        return 0
    records = app.poisoned()
    out.emit(
        records,
        lambda: (
            _table(
                [
                    [
                        r["poisoned_at"],
                        r["queue"],
                        r.get("run_id") or "-",
                        "replayed" if r.get("replayed") else "kept",
                        r["reason"][:80],
                    ]
                    for r in records
                ],
                ["POISONED", "QUEUE", "RUN", "STATUS", "REASON"],
            )
            if records
            else "no poison messages"
        ),
    )
    return 0


def _load_settings_file(path: Path) -> None:
    try:
        values = json.loads(path.read_text(encoding="utf-8")).get("Values", {})
    except (OSError, ValueError) as exc:
        raise InputRejected(f"cannot read {path}: {exc}") from exc
    for key, value in values.items():
        os.environ.setdefault(key, str(value))


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m retrain", description=__doc__)
    p.add_argument(
        "--settings",
        type=Path,
        help="a local.settings.json whose Values fill in unset app settings",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True)
    runs = sub.add_parser("runs", help="list runs")
    runs.add_argument("--model")
    runs.add_argument("--state")
    sub.add_parser("show", help="one run in full").add_argument("run")
    retrain = sub.add_parser("retrain", help="retrain a model now, through the normal path")
    retrain.add_argument("model")
    retrain.add_argument("--blob", help="the data file (default: the model's newest)")
    retrain.add_argument(
        "--force",
        action="store_true",
        help="retrain even on a file version a run already trained (recorded on the run)",
    )
    retrain.add_argument("--reason", help="why, recorded with the request")
    sub.add_parser("approve", help="promote a run waiting for approval").add_argument("run")
    reject = sub.add_parser("reject", help="turn down a run waiting for approval")
    reject.add_argument("run")
    reject.add_argument("--reason", required=True)
    rollback = sub.add_parser("rollback", help="re-deploy an earlier champion")
    rollback.add_argument("model")
    rollback.add_argument("--to", help="the run to restore (default: the previous champion)")
    sub.add_parser("check", help="configuration, storage and every target")
    pre = sub.add_parser("preflight", help="check each model's promotion target")
    pre.add_argument("models", nargs="*")
    poison = sub.add_parser("poison", help="list poisoned messages, or replay them")
    poison.add_argument("--replay", action="store_true")
    for name in ("retrain", "approve", "reject", "rollback"):
        sub.choices[name].add_argument("--by", default=_who(), help="recorded as who did it")
    return p


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"


COMMANDS: dict[str, Callable[[argparse.Namespace, Output], int]] = {
    "runs": cmd_runs,
    "show": cmd_show,
    "retrain": cmd_retrain,
    "approve": cmd_approve,
    "reject": cmd_reject,
    "rollback": cmd_rollback,
    "check": cmd_check,
    "preflight": cmd_preflight,
    "poison": cmd_poison,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; errors are printed with what to do, never as a traceback."""
    args = parser().parse_args(argv)
    out = Output(args.json)
    try:
        if args.settings:
            _load_settings_file(args.settings)
        return COMMANDS[args.command](args, out)
    except ConfigError as exc:
        print(f"configuration: FAILED\n  {exc}", file=sys.stderr)
        return 1
    except InputRejected as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RetrainError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
