"""The ledger's documents as typed records: what each one holds, checked on every write.

The step modules build and change documents as plain JSON-shaped dicts (that is what the store
keeps and what a compare-and-swap loop mutates); these models are their schema. The ledger checks
every document it writes against its model (`check_write`), and every change of a run's state
against the one table of moves in `retrain.runstate`, so a wrong shape or an illegal move is
refused before it is stored, whichever code path wrote it.

Fields not named here are kept (`extra="allow"`): during a rolling upgrade an instance running an
older release must not drop what a newer one wrote, and documents written by earlier releases
load as they are (tests/fixtures/ledger-v1 holds a corpus of them).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from retrain.errors import DocumentInvalid, IllegalTransition
from retrain.runstate import INITIAL, RunState, check_move
from retrain.storage import normalize_etag


def _moment(value: str) -> str:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"not an ISO 8601 moment: {value!r}") from None
    return value


Moment = Annotated[str, AfterValidator(_moment)]
"""A moment as documents store it (`datetime.isoformat()`), kept as written."""


class Record(BaseModel):
    """A stored document: known fields typed, unknown ones kept."""

    model_config = ConfigDict(extra="allow")


class FileVersion(Record):
    """One version of one data blob, the one shape every document uses for it."""

    name: str = Field(min_length=1)
    etag: str = Field(min_length=1)
    size: int | None = Field(default=None, ge=0)
    arrived_at: Moment | None = None
    modified_at: Moment | None = None
    requested: str | None = None
    """Why a retrain-now asked for this version (it then trains on it)."""
    forced: bool | None = None
    trained_before_by: str | None = None

    @property
    def version(self) -> tuple[str, str]:
        """(name, ETag normalised): equal for the same version however its ETag was written."""
        return self.name, normalize_etag(self.etag)


class Batch(Record):
    """Files that arrive together and train as one run (its id is the run's).

    The model document holds only this pointer: each file that joins appends an entry to the
    batch's log (`logs/{model}/{id}/`, when `log` is set), and the run record lists the files
    the log held when the seal sealed it. Member records under `batches/{model}/{id}/` (one
    per file, written by the previous release) and `files` (the release before) are read as
    they are.
    """

    id: str = Field(min_length=1)
    opened_at: Moment
    last_at: Moment
    opened_by: str | None = None
    """The arrival record of the version that opened the batch (it sends the first check)."""
    check_at: Moment | None = None
    files: list[FileVersion] = []
    force: bool | None = None
    log: bool = False
    """Its members append to its log (created before the batch was opened)."""


class StoredModel(Record):
    """A model reference as documents store it (retrain.ports.ModelRef.to_doc)."""

    kind: str
    container: str | None = None
    name: str | None = None
    version: str | None = None
    """A registered model's version (kind "registered")."""


Model = str | StoredModel
"""A stored model reference: the document form, or the 'container/blob' string of runs and
champions recorded before references had a kind."""


class Champion(Record):
    """The run whose model the target serves, as the model document remembers it."""

    run_id: str
    model: Model
    promoted_at: Moment | None = None
    metrics: dict[str, float] | None = None


class ModelState(Record):
    """One model's pointers: open and sealed batch, the run holding the model, the champion."""

    model: str
    batch: Batch | None = None
    sealed: Batch | None = None
    active_run: str | None = None
    active_since: Moment | None = None
    champion: Champion | None = None
    previous_champion: Champion | None = None
    awaiting_approval: str | None = None


class HistoryEntry(Record):
    """One move of a run."""

    state: RunState
    at: Moment
    note: str


class Deployment(Record):
    """A run's claim on the deploy and how far the deploy got."""

    claim: str
    lease_seconds: float = Field(gt=0)
    started_at: Moment
    polls: int = Field(default=0, ge=0)
    operation: str | None = None
    deployed: bool = False


class StartClaim(Record):
    """A delivery's claim on starting a run's job (see `Training._claim_start`)."""

    claim: str = Field(pattern=r"^[0-9a-f]{16}$")
    by: dict[str, Any] | None = None


class Run(Record):
    """One training run of a batch, or one re-deploy (a rollback or a restore)."""

    run_id: str = Field(min_length=1)
    model: str
    state: RunState
    created_at: Moment
    updated_at: Moment | None = None
    deadline_at: Moment | None = None
    kind: str | None = None
    """None for a training run; "rollback" or "restore" for a re-deploy."""
    restores: str | None = None
    manifest: str | None = None
    """The key of its batch's manifest (`manifests/{model}/{run_id}.json`), which lists its files;
    a rollback or restore names the manifest of the run it restores."""
    file_count: int | None = Field(default=None, ge=0)
    files: list[FileVersion] = []
    """The files, in a run recorded before manifests (a newer run names its `manifest`)."""
    training_file: FileVersion | None = None
    forced: bool | None = None
    job_id: str | None = None
    polls: int = Field(default=0, ge=0)
    start: StartClaim | None = None
    outputs: dict[str, Model] | None = None
    metrics: dict[str, dict[str, float] | None] | None = None
    decision: dict[str, Any] | None = None
    error: str | None = None
    deployment: Deployment | None = None
    restore_pending: bool | None = None
    history: list[HistoryEntry]


class Manifest(Record):
    """The files of a sealed batch, written once, before its run is recorded: the first one
    stored is the batch's for good. The run record names it, so an update of the run (a poll,
    a state change) does not copy the file list."""

    model: str
    run_id: str = Field(min_length=1)
    files: list[FileVersion] = []


class Arrival(Record):
    """What became of one blob version's arrival (one record per version)."""

    container: str
    name: str
    etag: str
    size: int | None = Field(default=None, ge=0)
    arrived_at: Moment
    model: str | None = None
    status: str | None = None
    batch_id: str | None = None
    trained_by: list[str] = []


class PoisonRecord(Record):
    """A message that failed on every delivery (partial while its write is in flight)."""

    queue: str | None = None
    body: str | None = None
    poisoned_at: Moment | None = None
    replayed: bool = False
    model: str | None = None
    run_id: str | None = None
    state_before: str | None = None
    """Checked when the record is replayed (a hand-edited one is refused then, and kept)."""


SCHEMAS: dict[str, type[Record]] = {
    "runs/": Run,
    "manifests/": Manifest,
    "models/": ModelState,
    "arrivals/": Arrival,
    "poison/": PoisonRecord,
    "batches/": FileVersion,
    "logs/": FileVersion,
}
"""Which model a document under each key prefix has (others, e.g. sweep notes, are free-form)."""


def schema_of(key: str) -> type[Record] | None:
    """The model of the document stored under `key`, if it has one."""
    for prefix, model in SCHEMAS.items():
        if key.startswith(prefix):
            return model
    return None


def load(key: str, doc: dict[str, Any]) -> Record:
    """The document under `key` as its typed record (DocumentInvalid if it is not one)."""
    model = schema_of(key) or Record
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise DocumentInvalid(f"{key}: {_first(exc)}") from None


def check_write(key: str, before: dict[str, Any] | None, after: dict[str, Any]) -> None:
    """Refuse to store `after` under `key` (replacing `before`, or new) unless it has its
    model's shape and, for a run, its state moved only as the table allows."""
    if schema_of(key) is None:
        return
    load(key, _new_files_only(before, after))
    if not key.startswith("runs/"):
        return
    if before is None:
        if RunState(after["state"]) not in INITIAL:
            raise IllegalTransition(f"{key}: a new run cannot start in {after['state']}")
    elif before.get("state") != after["state"]:
        check_move(before["state"], after["state"])


def _file_lists(doc: dict[str, Any] | None) -> list[list[Any]]:
    """The lists of file versions a document holds (a run's; a model's open and sealed batch)."""
    if doc is None:
        return []
    found = [doc.get("files")]
    found += [b.get("files") for b in (doc.get("batch"), doc.get("sealed")) if isinstance(b, dict)]
    return [files for files in found if isinstance(files, list)]


def _new_files_only(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
    """`after` with each list of file versions cut to the entries `before` did not already hold
    at its start. Stored documents were checked when written, so an arrival (one appended file)
    costs the same check at 10 files as at 5,000; a batch sealed into a run is not checked again.
    """
    held = _file_lists(before)

    def unchecked(files: list[Any]) -> list[Any]:
        known = max((len(h) for h in held if files[: len(h)] == h), default=0)
        return files[known:]

    trimmed = dict(after)
    if isinstance(after.get("files"), list):
        trimmed["files"] = unchecked(after["files"])
    for field in ("batch", "sealed"):
        batch = after.get(field)
        if isinstance(batch, dict) and isinstance(batch.get("files"), list):
            trimmed[field] = {**batch, "files": unchecked(batch["files"])}
    return trimmed


def _first(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "document"
    return f"{where}: {error['msg']}"
