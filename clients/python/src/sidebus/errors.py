# The client's exceptions: one class per wire error code, plus the client's own connection-lost,
# closed and timeout errors. Everything the client raises on purpose is a SidebusError.
"""Typed errors of the sidebus client."""

from __future__ import annotations

from typing import Any

__all__ = [
    "SidebusError",
    "BadFrame",
    "FrameTooLarge",
    "BadRequest",
    "UnknownOp",
    "UnsupportedProtocol",
    "ValidationFailed",
    "UnknownVersion",
    "IncompatibleSchema",
    "UnknownTag",
    "NotFound",
    "Backpressure",
    "Unavailable",
    "Unauthorized",
    "Internal",
    "ConnectionLost",
    "ClientClosed",
    "Timeout",
    "error_from_frame",
]


class SidebusError(Exception):
    """Base of every error the client raises on purpose.

    ``code`` is the protocol's error code (``"validation_failed"``, ...) for errors the daemon
    sent, or ``"connection_lost"``, ``"closed"``, ``"timeout"`` for the client's own.
    ``details`` is the daemon's list of maps (``{"field", "message"}`` for ``bad_request``,
    ``{"path", "message"}`` for ``validation_failed``, ...); empty when there are none.
    """

    code: str = "internal"

    def __init__(self, message: str = "", details: list[dict[str, Any]] | None = None, *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.details: list[dict[str, Any]] = list(details) if details else []

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, details={self.details!r})"


class BadFrame(SidebusError):
    """The body was not one MessagePack map with string keys."""

    code = "bad_frame"


class FrameTooLarge(SidebusError):
    """A frame was over ``max_frame_bytes``; raised locally, before sending, when the client knows."""

    code = "frame_too_large"


class BadRequest(SidebusError):
    """A field was missing, of the wrong type or out of range; ``details`` names it."""

    code = "bad_request"


class UnknownOp(SidebusError):
    """The daemon knows no such operation."""

    code = "unknown_op"


class UnsupportedProtocol(SidebusError):
    """The daemon does not speak this protocol version."""

    code = "unsupported_protocol"


class ValidationFailed(SidebusError):
    """``data`` does not match the type's schema; one ``{"path", "message"}`` per violation."""

    code = "validation_failed"


class UnknownVersion(SidebusError):
    """The schema version named does not exist."""

    code = "unknown_version"


class IncompatibleSchema(SidebusError):
    """A schema would break the type's compatibility mode; one ``{"message"}`` per change."""

    code = "incompatible_schema"


class UnknownTag(SidebusError):
    """The connection does not hold that delivery (already ended, expired, or never sent)."""

    code = "unknown_tag"


class NotFound(SidebusError):
    """No such subscription, group, dead letter or replay."""

    code = "not_found"


class Backpressure(SidebusError):
    """The daemon's spool is full: nothing was accepted; retry later."""

    code = "backpressure"


class Unavailable(SidebusError):
    """The daemon cannot do it now (a ``committed`` publish was not confirmed in time, backends
    not reachable yet, shutting down, too many connections). A publish answered this way is
    spooled; retrying it with the same ``event_id`` is safe."""

    code = "unavailable"


class Unauthorized(SidebusError):
    """The peer may not do this."""

    code = "unauthorized"


class Internal(SidebusError):
    """A fault in the daemon, or an error code this client does not know (kept in ``wire_code``)."""

    code = "internal"

    def __init__(self, message: str = "", details: list[dict[str, Any]] | None = None, *, wire_code: str = "internal"):
        super().__init__(message, details)
        self.wire_code = wire_code


class ConnectionLost(SidebusError, ConnectionError):
    """The connection broke while the request was in flight (the request may or may not have
    been carried out: a publish is never re-sent by the client; re-send it with the same
    ``event_id`` to be safe)."""

    code = "connection_lost"


class ClientClosed(ConnectionLost):
    """The client was closed."""

    code = "closed"


class Timeout(SidebusError, TimeoutError):
    """Waiting took too long: no connection to the daemon within the reconnect timeout, or no
    reply within the request timeout."""

    code = "timeout"


_BY_CODE: dict[str, type[SidebusError]] = {
    cls.code: cls
    for cls in (
        BadFrame,
        FrameTooLarge,
        BadRequest,
        UnknownOp,
        UnsupportedProtocol,
        ValidationFailed,
        UnknownVersion,
        IncompatibleSchema,
        UnknownTag,
        NotFound,
        Backpressure,
        Unavailable,
        Unauthorized,
    )
}


def error_from_frame(frame: dict[str, Any]) -> SidebusError:
    """The typed error for an ``error`` frame; an unknown code becomes :class:`Internal`."""
    code = frame.get("code")
    message = frame.get("message")
    message = message if isinstance(message, str) else ""
    raw_details = frame.get("details")
    details = [d for d in raw_details if isinstance(d, dict)] if isinstance(raw_details, list) else []
    cls = _BY_CODE.get(code) if isinstance(code, str) else None
    if cls is None:
        return Internal(message, details, wire_code=code if isinstance(code, str) else "internal")
    return cls(message, details)
