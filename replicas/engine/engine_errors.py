"""What the async engine raises to a request's consumer."""

from __future__ import annotations

from typing import Any


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; nothing more can be served by this replica."""


class RequestFailedError(RuntimeError):
    """The engine step that ran this request failed. `cause` is the class name of what failed
    (for the client; the traceback goes to the log). `retryable` marks failures of a peer that
    may come back (an expert shard), which front ends answer with 503 and Retry-After."""

    def __init__(self, message: str, cause: str, retryable: bool) -> None:
        super().__init__(message)
        self.cause = cause
        self.retryable = retryable

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries (Ray) intact
        return type(self), (str(self), self.cause, self.retryable)


class StreamStalledError(RuntimeError):
    """The consumer stopped reading this stream; the request was aborted."""
