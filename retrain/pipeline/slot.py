"""The model's active-run slot: claiming it, releasing it, and the restore a failed promotion owes.

One run at a time holds a model (`active_run` in the model's document). A rollback, a restore,
an approval or a replay claims the slot; a run that ends releases it (a promoted one is seated
as champion first), and a batch that waited for it gets its check. An idle model's target that
does not serve its champion is reconciled through a restore run.
"""

from __future__ import annotations

import logging
import secrets

from retrain.deploy import DeployTarget
from retrain.errors import InputRejected, RemoteError, TransientRemoteError
from retrain.ledger import Doc, model_key, run_key
from retrain.messages import EvaluateRun
from retrain.pipeline.context import Context, dims
from retrain.pipeline.records import (
    champion_run,
    iso,
    new_model,
    parse,
    redeploy_run,
    sweep_key,
)
from retrain.ports import ModelRef
from retrain.runstate import RunState
from retrain.settings import ModelSpec

log = logging.getLogger(__name__)


class ModelSlot:
    """Who holds each model, and what happens when a holder lets go."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def claim_model(
        self,
        spec: ModelSpec,
        run_id: str,
        action: str,
        *,
        replacing: str | None = None,
        champion: str | None = None,
    ) -> None:
        """Make `run_id` the model's active run, or explain why not. With `replacing`, only by
        taking it over from that run (never an idle model: a late check must not act after
        the model moved on); with `champion`, only while that run is the champion."""
        ctx = self._ctx
        now = iso(ctx.clock.now())
        allowed = (run_id, replacing) if replacing else (None, run_id)

        def claim(d: Doc) -> Doc | None:
            if champion is not None and (d.get("champion") or {}).get("run_id") != champion:
                return None
            if d.get("active_run") in allowed:
                d["active_run"], d["active_since"] = run_id, now
                return d
            return None

        state, _ = ctx.ledger.update(model_key(spec.name), claim, initial=new_model(spec))
        if state.get("active_run") is None:
            raise InputRejected(
                f"cannot {action} now: the champion of {spec.name} changed, or the run it "
                "would take the model over from already let it go"
            )
        holder = str(state.get("active_run"))
        if holder != run_id:
            recorded = ctx.ledger.get(run_key(spec.name, holder), remember=False)
            raise InputRejected(
                f"cannot {action} now: run {holder} of {spec.name} {_held(recorded)}"
            )

    def release(self, spec: ModelSpec, run_id: str) -> None:
        """End the model's active run and let a batch that waited for it go ahead.

        A run that still owes its restore check keeps the model until the check is definite
        (it raises a TransientRemoteError while the target cannot tell what it serves, so the
        message, or the next sweep, tries again)."""
        ctx = self._ctx
        run = ctx.ledger.get(run_key(spec.name, run_id), remember=False)
        if run is not None and run.get("restore_pending"):
            self.restore(spec, run)
        if run is not None and run["state"] == RunState.PROMOTED:
            self.seat(spec, run)  # its crown write may have been lost with its writer

        def release(d: Doc) -> Doc | None:
            if d.get("active_run") != run_id:
                return None
            d["active_run"] = None
            return d

        state, _ = ctx.ledger.update(model_key(spec.name), release, initial=new_model(spec))
        if state.get("batch") and not state.get("active_run"):
            ctx.schedule_check(spec, state["batch"], ctx.clock.now())

    def seat(self, spec: ModelSpec, run: Doc) -> bool:
        """Make promoted `run` the champion while it holds the model; True when it is."""
        run_id = run["run_id"]
        champion = {
            "run_id": run_id,
            "model": ModelRef.load(run["outputs"]["model"]).to_doc(),
            "promoted_at": run.get("updated_at") or iso(self._ctx.clock.now()),
            "metrics": (run.get("metrics") or {}).get("challenger"),
        }
        restore = run.get("kind") == "restore"

        def crown(d: Doc) -> Doc | None:
            if d.get("active_run") != run_id or (d.get("champion") or {}).get("run_id") == run_id:
                return None
            if not restore:
                d["previous_champion"] = d.get("champion")
            d["champion"] = champion
            return d

        state, _ = self._ctx.ledger.update(model_key(spec.name), crown)
        return bool((state.get("champion") or {}).get("run_id") == run_id)

    def unpark(self, name: str, run_id: str) -> None:
        """The model no longer has `run_id` waiting for approval."""
        self._ctx.ledger.update(
            model_key(name),
            lambda d: (
                {**d, "awaiting_approval": None} if d.get("awaiting_approval") == run_id else None
            ),
        )

    def redeploy(
        self,
        spec: ModelSpec,
        source: Doc,
        *,
        kind: str,
        by: str,
        replacing: str | None = None,
        run_id: str | None = None,
        champion: str | None = None,
    ) -> str:
        """A run that deploys promoted run `source`'s model again (a rollback or a restore).

        With a given `run_id` it is idempotent: the claim, the record and the message are made
        again only where missing (a restore owed by a failed run is re-tried under one id)."""
        ctx = self._ctx
        now = ctx.clock.now()
        run_id = run_id or f"{kind}-{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
        self.claim_model(
            spec,
            run_id,
            f"deploy run {source['run_id']}'s model",
            replacing=replacing,
            champion=champion,
        )
        note = f"{kind} to run {source['run_id']} requested by {by}"
        run = redeploy_run(spec, source, run_id=run_id, kind=kind, by=by, note=note, now=now)
        if ctx.ledger.create(run_key(spec.name, run_id), run):
            ctx.emit(spec, run, note)
        ctx.outbox.send(ctx.places.evaluations_queue, EvaluateRun(model=spec.name, run_id=run_id))
        return run_id

    def restore(self, spec: ModelSpec, run: Doc) -> None:
        """The restore check a failed promotion owes: make the target serve the champion again
        (through a restore run, one id per failed run), or record what it serves when there is
        nothing to restore. A definite outcome is recorded on the failed run and clears its
        `restore_pending`; while the target cannot say what it serves, the check stays owed and
        a TransientRemoteError goes to the caller (the message's retry or the next sweep)."""
        run_id = run["run_id"]
        key = run_key(spec.name, run_id)
        state = self._ctx.ledger.get(model_key(spec.name)) or {}
        target = self._ctx.target_for(spec)
        unknown: RemoteError | None = None
        try:
            outcome = self._restore_outcome(spec, run, target, state.get("champion"))
        except RemoteError as exc:
            outcome = f"what the target serves is unknown ({exc}); the check is tried again"
            unknown = exc
        except InputRejected as exc:
            # Another run holds the model: the sweep compares target and champion once idle.
            outcome = f"not restored here ({exc}); the sweep compares target and champion"
        log.warning(
            "run %s of %s failed after its deploy claim: %s",
            run_id,
            spec.name,
            outcome,
            extra=dims(spec.name, run_id),
        )
        if unknown is not None:
            self._ctx.ledger.update(key, lambda d: {**d, "target_after": outcome})
            raise TransientRemoteError(
                f"run {run_id} of {spec.name}: restore check: {unknown}", status=unknown.status
            ) from unknown

        def settle(d: Doc) -> Doc | None:
            d.pop("restore_pending", None)
            d["target_after"] = outcome
            return d

        self._ctx.ledger.update(key, settle)

    def _restore_outcome(
        self, spec: ModelSpec, run: Doc, target: DeployTarget, champion: Doc | None
    ) -> str:
        """Ask the target what it serves; start the champion's restore run when it may serve
        failed run `run`'s model. Returns what was found (and done), for the record."""
        if champion is None or run.get("kind") == "restore":
            if target.serves(ModelRef.load(run["outputs"]["model"])):
                return (
                    "the target serves this run's model and there is no champion to restore; "
                    "roll back or retrain"
                )
            return "the target does not serve this run's model"
        if target.serves(ModelRef.load(champion["model"])):
            return f"the target still serves the champion (run {champion['run_id']})"
        found = self._ctx.ledger.get(run_key(spec.name, champion["run_id"]))
        source = champion_run(champion, found)
        restore = self.redeploy(
            spec,
            source,
            kind="restore",
            by="retrain",
            replacing=run["run_id"],
            run_id=f"restore-{run['run_id']}",
            champion=champion["run_id"],
        )
        return (
            f"the target may serve this run's model: restoring the champion "
            f"(run {champion['run_id']}) through run {restore}"
        )

    def reconcile(self, spec: ModelSpec, champion: Doc, *, by: str = "sweep") -> int:
        """An idle model's target must serve its champion. When it does not (a deploy call that
        landed after its run was failed and checked, a change made outside the app), a restore
        run re-deploys the champion, taking the model only while that champion still holds.
        The sweep starts at most one such restore per stall period; a deploy holder that knows
        its own call landed late (`by="holder"`) is not held to that."""
        ctx = self._ctx
        try:
            if ctx.target_for(spec).serves(ModelRef.load(champion["model"])):
                return 0
            if by == "sweep" and not self._claim_restore(spec):
                return 0
            source = champion_run(champion, ctx.ledger.get(run_key(spec.name, champion["run_id"])))
            restore = self.redeploy(
                spec, source, kind="restore", by=by, champion=champion["run_id"]
            )
        except InputRejected:
            return 0  # another run took the model, or the champion changed, meanwhile
        except RemoteError as exc:
            log.warning(
                "%s: could not tell what the target of %s serves: %s",
                by,
                spec.name,
                exc,
                extra=dims(spec.name),
            )
            return 0
        log.warning(
            "%s: the target of %s does not serve its champion (run %s); restoring it "
            "through run %s",
            by,
            spec.name,
            champion["run_id"],
            restore,
            extra=dims(spec.name, restore),
        )
        return 1

    def _claim_restore(self, spec: ModelSpec) -> bool:
        """At most one restore started by the sweep per model and stall period: a target that
        keeps refusing the champion gets a failed restore run now and then, not every sweep."""
        ctx = self._ctx
        now = ctx.clock.now()

        def claim(d: Doc) -> Doc | None:
            last = d.get("restore_started_at")
            if last and now < parse(last) + ctx.stall:
                return None
            d["restore_started_at"] = iso(now)
            return d

        _, claimed = ctx.ledger.update(sweep_key(spec.name), claim, initial={"model": spec.name})
        if not claimed:
            log.warning(
                "sweep: the target of %s does not serve its champion; a restore was started "
                "less than RETRAIN_SWEEP_STALL ago",
                spec.name,
                extra=dims(spec.name),
            )
        return claimed


def _held(recorded: Doc | None) -> str:
    """Why the run whose record is `recorded` keeps the model, in words for the operator."""
    if recorded is None:
        return (
            "holds the model but has no run record (its writer died between the two "
            "writes); the sweep frees the model after RETRAIN_SWEEP_STALL"
        )
    if recorded.get("restore_pending"):
        return (
            "failed after its deploy and keeps the model until the target is known to "
            f"serve the champion ({recorded.get('target_after') or 'checking'}); "
            "each sweep tries again"
        )
    return "is in progress; try again when it has ended"
