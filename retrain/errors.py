"""Errors, sorted by what the caller must do about them.

    RetrainError
    ├── TransientError        try again later: let it escape so the host re-delivers
    │   ├── StateConflict
    │   └── TransientRemoteError
    ├── PermanentError        trying again cannot help: fail the run with the reason
    │   ├── MessageError, EvaluationError, IllegalTransition, DocumentMissing, DocumentInvalid
    │   └── PermanentRemoteError
    │       ├── BlobUnreadable (retrain.storage)
    │       └── SetupError    a resource the configuration names is missing or shuts the app out
    ├── UsageError            back to the operator with the fix
    │   ├── ConfigError
    │   └── InputRejected
    └── RemoteError           a remote call failed (status, Retry-After): only its two subclasses
                              above are raised

A remote failure is both a `RemoteError` (it has a status and maybe a Retry-After) and one of the
first two kinds (what to do about it); callers catch the kind they handle.
"""

from __future__ import annotations


class RetrainError(Exception):
    """Root of every error this package raises on purpose."""


class TransientError(RetrainError):
    """Trying again later can succeed: let it escape so the host re-delivers the message, or
    re-send the message after `retry_after` seconds when the service asked for a wait."""

    retry_after: float | None = None


class PermanentError(RetrainError):
    """Trying again cannot help: the run fails with this message as its reason."""


class UsageError(RetrainError):
    """What was asked cannot be done as asked: the message says what to change."""


class ConfigError(UsageError):
    """A setting is missing or invalid; the message names the setting and the fix."""


class InputRejected(UsageError):
    """Arrived data, or an operator's request, cannot be used as it is: for data the reason is
    recorded and the blob quarantined; for a command the CLI prints it."""


class MessageError(PermanentError):
    """A queue message cannot be parsed; retrying it cannot help."""


class EvaluationError(PermanentError):
    """The Evaluate Model output is missing, malformed, or lacks a metric the gate needs."""


class IllegalTransition(PermanentError):
    """A run was asked to move between states the state table does not connect: a bug."""


class DocumentMissing(PermanentError):
    """A ledger document that an update needs does not exist (and no initial one was given)."""


class DocumentInvalid(PermanentError):
    """A ledger document does not have its record's shape (retrain.documents): a bug, or a
    document edited by hand; the write is refused and the message names the field."""


class StateConflict(TransientError):
    """A conditional write lost a race: someone else changed the document first."""


class RemoteError(RetrainError):
    """A call to a remote service (Azure ML, storage, a webhook) failed.

    `status` is the HTTP status when there was a response, `retry_after` the server's hint in
    seconds. Never raised itself: a remote failure is a TransientRemoteError or a
    PermanentRemoteError, so a handler knows what to do with it from its class.
    """

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        if type(self) is RemoteError:
            raise TypeError("raise TransientRemoteError or PermanentRemoteError, not RemoteError")
        from retrain.http import redact  # texts from services may echo a SAS URL or a key

        super().__init__(redact(message))
        self.status = status
        self.retry_after = retry_after
        self.change_unanswered = False
        """A change (PUT, PATCH, POST, DELETE) that got no answer, or only a gateway's 502/504:
        the service may still act on it, late (set by `retrain.http.call`)."""


class TransientRemoteError(RemoteError, TransientError):
    """The service did not answer, was busy or failed in passing (timeouts, 429, 5xx, a copy
    still in progress): the same request later can succeed."""


class PermanentRemoteError(RemoteError, PermanentError):
    """The service refused the request or answered something unusable: retrying the same
    request cannot help."""


class SetupError(PermanentRemoteError):
    """A remote resource the configuration names is missing, unusable, or refuses the app's
    identity: what to fix is the configuration or the resource, and the message says which and
    how. A check reports it as a configuration problem; a run that meets it fails with it."""
