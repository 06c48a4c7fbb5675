"""The one error hierarchy. Each error carries a protocol error code (docs/PROTOCOL.md).

Domain code raises these; the gateway turns them into ``reply ok:false`` or ``error`` frames.
They live in im_bridge because the domain is where most of them arise and im_bridge must
not import the transport; signaling and media import them from here.
"""

from __future__ import annotations

from typing import Any, ClassVar


class TalkbridgeError(Exception):
    """Base error: ``code`` is the wire error code, ``message`` says what is wrong."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        """The ``error`` object of a reply or error frame."""
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            err.update(self.details)
        return err


class BadRequest(TalkbridgeError):
    code = "bad_request"


class Unauthorized(TalkbridgeError):
    code = "unauthorized"


class Forbidden(TalkbridgeError):
    code = "forbidden"


class NotFound(TalkbridgeError):
    code = "not_found"


class Conflict(TalkbridgeError):
    code = "conflict"


class RateLimited(TalkbridgeError):
    code = "rate_limited"


class TooLarge(TalkbridgeError):
    code = "too_large"


class Unsupported(TalkbridgeError):
    code = "unsupported"


class Internal(TalkbridgeError):
    code = "internal"


def error_from_wire(wire: dict[str, Any]) -> TalkbridgeError:
    """The error an ``error`` object describes (as sent between nodes or processes)."""
    details = {k: v for k, v in wire.items() if k not in ("code", "message")}
    cls = _BY_CODE.get(str(wire.get("code", "")), Internal)
    return cls(str(wire.get("message", "")), **details)


ERROR_CODES: tuple[str, ...] = tuple(
    c.code
    for c in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        RateLimited,
        TooLarge,
        Unsupported,
        Internal,
    )
)

_BY_CODE: dict[str, type[TalkbridgeError]] = {
    c.code: c
    for c in (
        BadRequest, Unauthorized, Forbidden, NotFound, Conflict,
        RateLimited, TooLarge, Unsupported, Internal,
    )
}
