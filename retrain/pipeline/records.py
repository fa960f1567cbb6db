"""The shapes of the ledger's documents: model state, batches and runs, built and read here."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

from retrain.ledger import Doc
from retrain.runstate import RunState
from retrain.settings import ModelSpec
from retrain.storage import normalize_etag


def iso(moment: datetime) -> str:
    """A moment as documents store it."""
    return moment.isoformat()


def parse(moment: str) -> datetime:
    """A moment as documents store it, read back."""
    return datetime.fromisoformat(moment)


def sweep_key(model: str) -> str:
    """The sweep's own notes on a model: its listing mark, the last schedule skip."""
    return f"sweeps/{model}.json"


def new_model(spec: ModelSpec) -> Doc:
    """A model's state before anything happened to it."""
    return {
        "model": spec.name,
        "batch": None,
        "active_run": None,
        "champion": None,
        "previous_champion": None,
    }


def holds(files: list[Doc], file: Doc) -> bool:
    """Whether `files` has this version of the file (ETags compared normalised: entries written
    before normalisation carry quoted ones)."""
    etag = normalize_etag(file["etag"])
    return any(f["name"] == file["name"] and normalize_etag(f["etag"]) == etag for f in files)


def note_trained(run_id: str, record: Doc) -> Doc | None:
    """The arrival record, now naming run `run_id` among those that trained its version;
    None if it already does."""
    trained = record.setdefault("trained_by", [])
    if run_id in trained:
        return None
    trained.append(run_id)
    return record


def with_field(field: str, value: Any, doc: Doc) -> Doc:
    """`doc` with `field` set to `value`."""
    return {**doc, field: value}


def batch_id(now: datetime) -> str:
    """A new batch's id, which is also its run's id."""
    return f"{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def check_due(spec: ModelSpec, batch: Doc, files: list[Doc] | None = None) -> datetime:
    """When the batch may be sealed: quiet since its last arrival, or open for max_wait.

    Without its `files` (the member records), only what the pointer knows: the batch cannot be
    due before that, and may be later.
    """
    arrivals = [batch["last_at"]] + [f["arrived_at"] for f in files or [] if f.get("arrived_at")]
    quiet_end = max(parse(at) for at in arrivals) + spec.quiet_period
    hard_end = parse(batch["opened_at"]) + spec.max_wait
    return min(quiet_end, hard_end)


def open_batch(doc: Doc, *, new_id: str, now: datetime, opener: str) -> Doc | None:
    """Open batch `new_id` on the model document; None when a batch is open already."""
    if doc.get("batch") is not None:
        return None
    doc["batch"] = {
        "id": new_id,
        "opened_at": iso(now),
        "last_at": iso(now),
        "opened_by": opener,
        "log": True,
    }
    return doc


def merge_files(*lists: list[Doc]) -> list[Doc]:
    """The file versions of several lists, each once, in order of arrival; a later entry for
    the same version (a retrain-now's, with its marks) wins over an earlier one."""
    merged: dict[tuple[str, str], Doc] = {}
    for files in lists:
        for f in files:
            version = (f["name"], normalize_etag(f["etag"]))
            merged[version] = {**merged.get(version, {}), **f}
    return sorted(merged.values(), key=lambda f: (f.get("arrived_at") or "", f["name"]))


def fold_log(entries: list[Doc]) -> list[Doc]:
    """The file versions of a batch's log, each once: an entry appended again (a redelivered
    arrival) keeps the first one's fields; a retrain-now's entry (`replace`) wins with its
    marks."""
    files: dict[tuple[str, str], Doc] = {}
    for entry in entries:
        file = {k: v for k, v in entry.items() if k != "replace"}
        version = (file["name"], normalize_etag(file["etag"]))
        if version not in files:
            files[version] = file
        elif entry.get("replace"):
            files[version] = {**files[version], **file}
    return list(files.values())


def file_entry(
    name: str, etag: str, size: int, now: datetime, modified: datetime | None, **marks: Any
) -> Doc:
    """A file version as a batch lists it (`marks`: why it was asked for, when it was)."""
    file: Doc = {"name": name, "etag": etag, "size": size, "arrived_at": iso(now), **marks}
    if modified is not None:
        file["modified_at"] = iso(modified)
    return file


def new_run(spec: ModelSpec, batch: Doc, files: list[Doc], manifest: str, now: datetime) -> Doc:
    """The run of sealed batch `batch` holding `files` (listed in the document `manifest`),
    queued for training (or superseded at once when no file is in it)."""
    # Each file is a full dataset: the newest one of the batch is what the model trains on.
    newest, why = training_file(files) if files else (None, "no file")
    state = RunState.QUEUED if files else RunState.SUPERSEDED
    note = (
        f"batch of {len(files)} file(s)"
        if files
        else "closed with no file: every arrival that claimed it joined another batch"
    )
    return {
        "run_id": batch["id"],
        "model": spec.name,
        "state": state.value,
        "created_at": iso(now),
        "deadline_at": iso(now + spec.job_deadline),
        "manifest": manifest,
        "file_count": len(files),
        "training_file": newest,
        "training_file_reason": why,
        "forced": any(f.get("forced") for f in files),
        "job_id": None,
        "polls": 0,
        "outputs": None,
        "metrics": None,
        "decision": None,
        "error": None,
        "history": [{"state": state.value, "at": iso(now), "note": note}],
    }


def redeploy_run(
    spec: ModelSpec, source: Doc, *, run_id: str, kind: str, by: str, note: str, now: datetime
) -> Doc:
    """A run that deploys promoted run `source`'s model again (a rollback or a restore)."""
    promoting = RunState.PROMOTING.value
    return {
        "run_id": run_id,
        "model": spec.name,
        "kind": kind,
        "restores": source["run_id"],
        "state": promoting,
        "created_at": iso(now),
        "updated_at": iso(now),
        **{k: source[k] for k in ("manifest", "file_count", "files") if k in source},
        "training_file": source.get("training_file"),
        "job_id": source.get("job_id"),
        "polls": 0,
        "outputs": {"model": source["outputs"]["model"]},
        "metrics": source.get("metrics"),
        "decision": {"promote": True, "reason": note},
        "error": None,
        "requested_by": by,
        "history": [{"state": promoting, "at": iso(now), "note": note}],
    }


def file_count(run: Doc) -> int:
    """How many files run `run` holds (a run recorded before manifests lists them itself)."""
    count = run.get("file_count")
    return int(count) if count is not None else len(run.get("files") or [])


def champion_run(champion: Doc, found: Doc | None) -> Doc:
    """The champion's run record as `found`, or the little the model document knows of it."""
    return found or {"run_id": champion["run_id"], "outputs": {"model": champion["model"]}}


def training_file(files: list[Doc]) -> tuple[Doc | None, str]:
    """The file a batch trains on, and why: a requested one, else the newest by the blob's own
    Last-Modified (then by name); entries recorded without it fall back to delivery order."""
    count = f"{len(files)} file(s)"
    requested = [f for f in files if f.get("requested")]
    if requested:
        return requested[-1], f"requested ({requested[-1]['requested']}), of {count}"
    if all(f.get("modified_at") for f in files):
        newest = max(files, key=lambda f: (parse(f["modified_at"]), f["name"]))
        return newest, f"newest by last-modified of {count}"
    return files[-1], f"last delivered of {count} (last-modified not recorded)"
