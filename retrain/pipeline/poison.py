"""Poison: a message that failed every delivery is kept, fails its run with the reason, and can
be replayed."""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass

from retrain.errors import InputRejected, MessageError
from retrain.ledger import Doc, model_key, run_key
from retrain.messages import CheckBatch, EvaluateRun, TrackRun, parse_evaluation, parse_jobs
from retrain.pipeline.context import dims
from retrain.pipeline.gate import Gate
from retrain.pipeline.records import iso, with_field
from retrain.pipeline.runs import RunStep
from retrain.runstate import RunState, is_terminal

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Poison(RunStep):
    """The poison-queue step and its replay."""

    _gate: Gate

    def on_poison(self, queue: str, body: bytes) -> str:
        """A message failed every delivery: keep it for replay and fail its run with the reason."""
        ctx = self._ctx
        text = body.decode("utf-8", errors="replace")
        digest = hashlib.sha256(f"{queue}\n{text}".encode()).hexdigest()
        key = f"poison/{digest}.json"
        record: Doc = {
            "queue": queue,
            "body": text,
            "poisoned_at": iso(ctx.clock.now()),
            "replayed": False,
            "model": None,
            "run_id": None,
            "state_before": None,
        }
        message = self._read(queue, body, record)
        # Only a parsed message names a run, and its fields matched their patterns: no ledger
        # key is ever built from text that did not.
        run: Doc | None = None
        if message is not None and record["run_id"] and message.model in ctx.models:
            found = ctx.ledger.get(run_key(message.model, record["run_id"]))
            if found is not None and found.get("run_id") == record["run_id"]:
                run = found
        if run is not None and not is_terminal(run["state"]):
            record["state_before"] = run["state"]
        ctx.ledger.update(
            key,
            lambda d: {**record} if d.get("replayed", True) else None,
            initial={"replayed": True},
        )
        log.error(
            "poison message on %s: %s",
            queue,
            record["reason"],
            extra=dims(record["model"] or "-", record["run_id"]),
        )
        if run is not None and record["state_before"] and message is not None:
            self._runs.fail(ctx.spec(message.model), run, record["reason"], poisoned=key)
            return RunState.FAILED.value
        return "recorded"

    def _read(
        self, queue: str, body: bytes, record: Doc
    ) -> CheckBatch | TrackRun | EvaluateRun | None:
        """Parse the message, noting in `record` what it names and why it is poison."""
        try:
            message = (
                parse_evaluation(body)
                if queue == self._ctx.places.evaluations_queue
                else parse_jobs(body)
            )
        except MessageError as exc:
            record["reason"] = f"the message cannot be parsed: {exc}"
            return None
        record["model"] = message.model
        record["run_id"] = getattr(message, "run_id", None)
        record["reason"] = (
            f"a {message.kind} message failed on every delivery and was moved "
            f"to {queue}-poison (the function's log has each error)"
        )
        if message.model not in self._ctx.models:
            record["reason"] += f"; model {message.model!r} is not configured"
        return message

    def replay_poison(self) -> list[str]:
        """Send every poisoned message back to its queue, reviving the run it failed."""
        ledger = self._ctx.ledger
        replayed = []
        for key in ledger.store.keys("poison/"):
            record = ledger.get(key)
            if record and not record.get("replayed"):
                try:
                    self._replay(key, record)
                except InputRejected as exc:
                    # Kept, with why; the other records are still replayed.
                    log.warning("poison %s not replayed: %s", key, exc)
                    ledger.update(key, functools.partial(with_field, "replay_refused", str(exc)))
                    continue
                replayed.append(key)
        return replayed

    def _replay(self, key: str, record: Doc) -> None:
        ctx = self._ctx
        if record.get("run_id") and record.get("state_before"):
            if record["state_before"] not in {state.value for state in RunState}:
                raise InputRejected(
                    f"cannot replay {key}: its state_before {record['state_before']!r} is not "
                    "a run state (the record was changed by hand?)"
                )
            spec = ctx.spec(record["model"])
            now = ctx.clock.now()
            parked = record["state_before"] == RunState.AWAITING_APPROVAL
            if parked:
                # A run waiting for approval does not hold the model: it waits again, unless
                # another run waits now.
                waiting = (ctx.ledger.get(model_key(spec.name)) or {}).get("awaiting_approval")
                if waiting not in (None, record["run_id"]):
                    raise InputRejected(
                        f"cannot replay {key}: run {waiting} of {spec.name} waits for approval "
                        "now; approve or reject it first"
                    )
            else:
                self._slot.claim_model(spec, record["run_id"], f"replay {key}")
            # No event: the run is where its message found it, as the message's replay expects.
            _, revived = self._runs.move(
                spec,
                record["run_id"],
                RunState.FAILED,
                record["state_before"],
                now,
                note="revived to replay its poisoned message",
                guard=lambda d: d.get("poisoned") == key,
                announce=False,
                error=None,
                poisoned=None,
            )
            if revived and parked:
                self._gate.await_approval(spec, record["run_id"], now)
            elif not revived and not parked:
                self._slot.release(spec, record["run_id"])
        ctx.outbox.send_raw(record["queue"], record["body"])
        ctx.ledger.update(
            key, lambda d: {**d, "replayed": True, "replayed_at": iso(ctx.clock.now())}
        )
