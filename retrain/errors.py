"""Errors, sorted by what the caller should do about them."""

from __future__ import annotations


class RetrainError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(RetrainError):
    """A setting is missing or invalid; the message names the setting and the fix."""


class MessageError(RetrainError):
    """A queue message cannot be parsed; retrying it cannot help."""


class InputRejected(RetrainError):
    """Arrived data is unusable for training; the reason is recorded and the blob quarantined."""


class RemoteError(RetrainError):
    """A call to Azure ML failed.

    ``retryable`` says whether sending the same request later can succeed (timeouts, 429, 5xx),
    ``status`` is the HTTP status when there was a response, ``retry_after`` the server's hint.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        from retrain.http import redact  # texts from services may echo a SAS URL or a key

        super().__init__(redact(message))
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


class StateConflict(RetrainError):
    """A conditional write lost a race: someone else changed the document first."""


class EvaluationError(RetrainError):
    """The Evaluate Model output is missing, malformed, or lacks a metric the gate needs."""


class IllegalTransition(RetrainError):
    """A run was asked to move between states the state table does not connect: a bug."""
