# The wire format: length-prefixed MessagePack frames (encode, decode, a streaming reader), a
# local check of request frames, and the JSON forms of MessagePack values used by the vectors
# and the conformance suite. No I/O here, so all of it is unit-tested against the golden vectors.
"""Frames of the sidebus protocol, version 1 (see protocol/PROTOCOL.md)."""

from __future__ import annotations

import base64
from typing import Any

import msgpack  # type: ignore[import-untyped]

from .errors import BadFrame, BadRequest, FrameTooLarge, SidebusError, UnknownOp

__all__ = [
    "PROTOCOL_VERSION",
    "DEFAULT_MAX_FRAME_BYTES",
    "encode_body",
    "encode_frame",
    "decode_body",
    "FrameReader",
    "check_request",
    "to_json",
    "from_json",
]

PROTOCOL_VERSION = 1
# The daemon's default `max_frame_bytes`; the `hello` reply says the real one.
DEFAULT_MAX_FRAME_BYTES = 1 << 20
# The largest frame the client accepts from the daemon: the largest `max_frame_bytes` a daemon
# may be configured with. Anything longer means the stream is out of step.
MAX_INCOMING_FRAME_BYTES = 64 << 20
# JavaScript readers cannot hold integers beyond this exactly; the JSON forms write them as
# {"$int": "..."}.
MAX_SAFE_INTEGER = (1 << 53) - 1


def encode_body(frame: dict[str, Any]) -> bytes:
    """One frame body: the map as MessagePack (strings as `str`, `bytes` as `bin`, every integer
    in its smallest encoding, which is what the golden vectors hold)."""
    body: bytes = msgpack.packb(frame, use_bin_type=True)
    return body


def encode_frame(frame: dict[str, Any]) -> bytes:
    """A whole frame: the 4-byte big-endian length, then the body."""
    body = encode_body(frame)
    return len(body).to_bytes(4, "big") + body


def _map_len(body: bytes | bytearray | memoryview) -> int:
    """The entry count a map header declares (or -1 when the body does not start with a map)."""
    b = body[0]
    if 0x80 <= b <= 0x8F:
        return b & 0x0F
    if b == 0xDE and len(body) >= 3:
        return int.from_bytes(body[1:3], "big")
    if b == 0xDF and len(body) >= 5:
        return int.from_bytes(body[1:5], "big")
    return -1


def decode_body(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Decodes one frame body, which must be exactly one MessagePack map with distinct string
    keys (maps inside it may have any keys). Raises :class:`BadFrame` otherwise."""
    if len(body) == 0:
        raise BadFrame("the frame body is empty")
    try:
        # strict_map_key=False: keys inside `data` may be integers (MessagePack allows it).
        value = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except msgpack.ExtraData:
        raise BadFrame("bytes follow the map") from None
    except Exception as e:  # the library raises several kinds for malformed input
        raise BadFrame(f"not MessagePack: {e}") from None
    if type(value) is not dict:
        raise BadFrame(f"the body is a {type(value).__name__}, not a map")
    for k in value:
        if type(k) is not str:
            raise BadFrame(f"a key is a {type(k).__name__}, not a string")
    # A repeated key leaves fewer entries than the header declares.
    if len(value) != _map_len(body):
        raise BadFrame("a key is given twice")
    return value


class FrameReader:
    """Splits a byte stream into frames. `feed` returns the frames completed by the bytes given:
    each one a decoded map, or a :class:`BadFrame` for a body that did not decode (the stream
    stays in step: the length says where the next frame starts). A declared length over
    `max_frame_bytes` raises :class:`FrameTooLarge`: the stream cannot be trusted after it."""

    __slots__ = ("_buf", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int = MAX_INCOMING_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self.max_frame_bytes = max_frame_bytes

    def feed(self, data: bytes) -> list[dict[str, Any] | BadFrame]:
        buf = self._buf
        buf += data
        out: list[dict[str, Any] | BadFrame] = []
        pos = 0
        end = len(buf)
        view = memoryview(buf)
        try:
            while end - pos >= 4:
                n = int.from_bytes(view[pos : pos + 4], "big")
                if n > self.max_frame_bytes:
                    raise FrameTooLarge(f"a frame of {n} bytes is over the {self.max_frame_bytes} allowed")
                if end - pos - 4 < n:
                    break
                with view[pos + 4 : pos + 4 + n] as body:
                    try:
                        out.append(decode_body(body))
                    except BadFrame as e:
                        out.append(e)
                pos += 4 + n
        finally:
            view.release()
        if pos:
            del buf[:pos]
        return out

    @property
    def buffered(self) -> int:
        """Bytes received that do not make a whole frame yet."""
        return len(self._buf)


# ---- a local check of request frames ----

_STR, _UINT, _BOOL, _ANY, _SCHEMA, _STRS = "string", "unsigned integer", "boolean", "any", "schema", "strings"

# Each op's fields: (kind, required). Mirrors PROTOCOL.md's tables.
_OPS: dict[str, dict[str, tuple[str, bool]]] = {
    "hello": {"protocol": (_UINT, True), "client": (_STR, False)},
    "ping": {},
    "publish": {
        "type": (_STR, True),
        "data": (_ANY, True),
        "version": (_UINT, False),
        "source": (_STR, False),
        "event_id": (_STR, False),
        "correlationid": (_STR, False),
        "partitionkey": (_STR, False),
        "traceparent": (_STR, False),
        "durability": (_STR, False),
        "deliver_at": (_STR, False),
        "delay_ms": (_UINT, False),
    },
    "subscribe": {
        "type": (_STR, True),
        "group": (_STR, True),
        "max_in_flight": (_UINT, False),
        "max_attempts": (_UINT, False),
        "ack_timeout_ms": (_UINT, False),
    },
    "ack": {"tag": (_UINT, True)},
    "nack": {"tag": (_UINT, True), "error": (_STR, False), "delay_ms": (_UINT, False), "dead": (_BOOL, False)},
    "extend": {"tag": (_UINT, True)},
    "unsubscribe": {"sub": (_UINT, True)},
    "register_schema": {
        "type": (_STR, True),
        "schema": (_SCHEMA, True),
        "compatibility": (_STR, False),
        "strict": (_BOOL, False),
        "dry_run": (_BOOL, False),
    },
    "get_schema": {"type": (_STR, True), "version": (_UINT, False)},
    "list_schemas": {},
    "replay": {"type": (_STR, True), "group": (_STR, True), "since": (_STR, True), "until": (_STR, False)},
    "replay_cancel": {"replay": (_STR, True)},
    "replays": {"all": (_BOOL, False)},
    "dlq_list": {
        "type": (_STR, True),
        "group": (_STR, True),
        "limit": (_UINT, False),
        "after": (_UINT, False),
        "ids": (_STRS, False),
    },
    "dlq_redrive": {"type": (_STR, True), "group": (_STR, True), "ids": (_STRS, False), "rate": (_UINT, False)},
    "dlq_purge": {"type": (_STR, True), "group": (_STR, True), "ids": (_STRS, False)},
    "stats": {},
    # Group lifecycle: no client methods yet; read so that their vectors are checked.
    "groups": {"type": (_STR, False)},
    "group_delete": {"type": (_STR, True), "group": (_STR, True), "force": (_BOOL, False)},
    "group_reset": {"type": (_STR, True), "group": (_STR, True), "to": (_STR, True)},
}

# Answered only when they carry an id; the rest need one.
_ID_OPTIONAL = frozenset({"ack", "nack", "extend"})


def _is_uint(v: Any) -> bool:
    return type(v) is int and v >= 0


def _kind_ok(kind: str, v: Any) -> bool:
    if kind == _STR:
        return type(v) is str
    if kind == _UINT:
        return _is_uint(v)
    if kind == _BOOL:
        return type(v) is bool
    if kind == _SCHEMA:
        return type(v) in (dict, bool)
    if kind == _STRS:
        return type(v) is list and all(type(x) is str for x in v)
    return True


def _bad(field: str, problem: str) -> BadRequest:
    return BadRequest(f"bad field {field}: {problem}", [{"field": field, "message": problem}])


def check_request(frame: dict[str, Any]) -> None:
    """Checks a request frame's shape the way the daemon does before running it: `id`, `op`,
    then the op's required fields and their types, in that order. Raises the error the daemon
    would answer (:class:`BadRequest` naming the field, or :class:`UnknownOp`). Ranges and name
    rules are left to the daemon. Tools that build frames by hand can call it; the client's own
    methods build valid frames by construction."""
    rid = frame.get("id")
    if rid is not None and not (_is_uint(rid) or type(rid) is str):
        raise _bad("id", "must be an unsigned integer")
    op = frame.get("op")
    if op is None:
        raise _bad("op", "required")
    if type(op) is not str:
        raise _bad("op", "must be a string")
    fields = _OPS.get(op)
    if fields is None:
        raise UnknownOp(f"unknown op `{op[:64]}`")
    for name, (kind, required) in fields.items():
        # A nil value counts as absent, except for publish's `data`, where nil is a value.
        present = name in frame if kind == _ANY else frame.get(name) is not None
        if not present:
            if required:
                raise _bad(name, "required")
            continue
        if not _kind_ok(kind, frame[name]):
            raise _bad(name, f"must be {'a map or a boolean' if kind == _SCHEMA else 'an array of strings' if kind == _STRS else 'a ' + kind}")
    if op == "publish" and frame.get("durability") not in (None, "local", "committed"):
        raise _bad("durability", 'must be "local" or "committed"')
    if rid is None and op not in _ID_OPTIONAL:
        raise _bad("id", "required")
    if type(rid) is str and op != "publish":
        raise _bad("id", "must be an unsigned integer (a string id is only taken by publish)")


# ---- JSON forms ----


def to_json(v: Any) -> Any:
    """A MessagePack value as JSON can hold it: `bin` as {"$bin": base64}, an integer beyond
    +-(2^53 - 1) as {"$int": "decimal"}, an extension value as {"$ext": [type, base64]}."""
    t = type(v)
    if t is dict:
        return {(k if type(k) is str else str(k)): to_json(x) for k, x in v.items()}
    if t is list or t is tuple:
        return [to_json(x) for x in v]
    if t is bytes or t is bytearray or t is memoryview:
        return {"$bin": base64.b64encode(bytes(v)).decode("ascii")}
    if t is int and not -MAX_SAFE_INTEGER <= v <= MAX_SAFE_INTEGER:
        return {"$int": str(v)}
    if t is msgpack.ExtType:
        return {"$ext": [v.code, base64.b64encode(v.data).decode("ascii")]}
    if t is msgpack.Timestamp:
        return {"$ext": [-1, base64.b64encode(v.to_bytes()).decode("ascii")]}
    return v


def from_json(v: Any) -> Any:
    """The inverse of :func:`to_json`: {"$bin"} becomes `bytes`, {"$int"} an `int`."""
    if type(v) is dict:
        if len(v) == 1:
            if "$bin" in v:
                return base64.b64decode(v["$bin"])
            if "$int" in v:
                return int(v["$int"])
            if "$ext" in v:
                code, data = v["$ext"]
                return msgpack.ExtType(code, base64.b64decode(data))
        return {k: from_json(x) for k, x in v.items()}
    if type(v) is list:
        return [from_json(x) for x in v]
    return v


def describe(e: SidebusError) -> dict[str, Any]:
    """An error as the conformance suite and tools record it."""
    return {"code": e.code, "message": e.message, "details": to_json(e.details)}
