"""The one codec: JSON frames in and out (msgspec), plus typed field readers for requests.

Field readers raise :class:`BadRequest` naming the field, so every handler reports bad
input the same way.
"""

from __future__ import annotations

from typing import Any

import msgspec

from im_bridge.errors import BadRequest
from im_bridge.ids import no_nul

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def encode(obj: Any) -> bytes:
    """Serialize a frame to UTF-8 JSON bytes (sent as a WebSocket text frame)."""
    return _encoder.encode(obj)


def decode_frame(data: str | bytes) -> dict[str, Any]:
    """Parse one frame; it must be a JSON object with a string ``type``."""
    try:
        obj = _decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"frame is not valid JSON: {exc}") from None
    except RecursionError:
        # msgspec recurses per nesting level: deep nesting must not escape as a crash.
        raise BadRequest("frame is nested too deeply") from None
    if not isinstance(obj, dict):
        raise BadRequest("frame must be a JSON object")
    if not isinstance(obj.get("type"), str) or not obj["type"]:
        raise BadRequest("frame needs a string 'type'")
    return obj


def decode_body(data: bytes | bytearray) -> dict[str, Any]:
    """Parse an HTTP request body; it must be a JSON object."""
    try:
        obj = _decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        raise BadRequest("body must be a JSON object") from None
    if not isinstance(obj, dict):
        raise BadRequest("body must be a JSON object")
    return obj


def req_str(req: dict[str, Any], name: str, *, max_len: int = 256) -> str:
    """A required non-empty string field, without NUL characters (see ids.no_nul)."""
    value = req.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"'{name}' must be a non-empty string", field=name)
    if len(value) > max_len:
        raise BadRequest(f"'{name}' is longer than {max_len} characters", field=name)
    return no_nul(value, name)


def opt_str(req: dict[str, Any], name: str, *, max_len: int = 256) -> str | None:
    """An optional string field (absent or null gives None)."""
    if req.get(name) is None:
        return None
    return req_str(req, name, max_len=max_len)


def req_int(req: dict[str, Any], name: str, *, minimum: int = 0, maximum: int = 2**62) -> int:
    """A required integer field within bounds (booleans are not integers here)."""
    value = req.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"'{name}' must be an integer", field=name)
    if not minimum <= value <= maximum:
        raise BadRequest(f"'{name}' must be between {minimum} and {maximum}", field=name)
    return value


def opt_int(
    req: dict[str, Any], name: str, *, minimum: int = 0, maximum: int = 2**62
) -> int | None:
    """An optional integer field."""
    if req.get(name) is None:
        return None
    return req_int(req, name, minimum=minimum, maximum=maximum)


def req_bool(req: dict[str, Any], name: str) -> bool:
    """A required boolean field."""
    value = req.get(name)
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be true or false", field=name)
    return value


def opt_bool(req: dict[str, Any], name: str, default: bool) -> bool:
    """An optional boolean field with a default."""
    if req.get(name) is None:
        return default
    return req_bool(req, name)


def req_obj(req: dict[str, Any], name: str) -> dict[str, Any]:
    """A required JSON object field."""
    value = req.get(name)
    if not isinstance(value, dict):
        raise BadRequest(f"'{name}' must be an object", field=name)
    return value


def str_list(req: dict[str, Any], name: str, *, max_items: int = 1000) -> list[str] | None:
    """An optional list of non-empty strings."""
    value = req.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise BadRequest(f"'{name}' must be a list of strings", field=name)
    if len(value) > max_items:
        raise BadRequest(f"'{name}' has more than {max_items} items", field=name)
    return value
