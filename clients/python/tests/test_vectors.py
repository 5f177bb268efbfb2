# Checks the client's encoder and decoder against every golden frame in protocol/vectors/: each
# .msgpack decodes to what its .json says and re-encodes to the same bytes; each invalid/ frame
# is refused with the error its .json names.
"""The golden vectors."""

from __future__ import annotations

import json
import os
import pathlib
import unittest
from typing import Any

from sidebus import errors
from sidebus.protocol import FrameReader, check_request, decode_body, encode_body, encode_frame, from_json

HERE = pathlib.Path(__file__).resolve().parent
VECTORS = pathlib.Path(os.environ.get("SIDEBUS_VECTORS", HERE.parent.parent.parent / "protocol" / "vectors"))


def vector_files() -> list[pathlib.Path]:
    """Every .json that has a .msgpack beside it, in every folder under vectors/."""
    return sorted(p for p in VECTORS.rglob("*.json") if p.with_suffix(".msgpack").exists())


def same(a: Any, b: Any) -> bool:
    """Equality that also compares types: True is not 1, 1.0 is not 1, bytes are not str."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return list(a.keys()) == list(b.keys()) and all(same(a[k], b[k]) for k in a)
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


class VectorsTest(unittest.TestCase):
    def test_the_vectors_are_there(self) -> None:
        files = vector_files()
        self.assertTrue(VECTORS.is_dir(), f"no vectors at {VECTORS}")
        # Every folder of the protocol is represented; a vector without its pair is a mistake.
        folders = {p.parent.name for p in files}
        self.assertTrue({"requests", "replies", "pushes", "invalid"} <= folders, folders)
        for p in VECTORS.rglob("*.msgpack"):
            self.assertTrue(p.with_suffix(".json").exists(), f"{p} has no .json")

    def test_valid_frames_decode_and_reencode_byte_for_byte(self) -> None:
        valid = [p for p in vector_files() if p.parent.name != "invalid"]
        self.assertGreater(len(valid), 30)
        for p in valid:
            with self.subTest(vector=str(p.relative_to(VECTORS))):
                raw = p.with_suffix(".msgpack").read_bytes()
                meant = from_json(json.loads(p.read_text()))
                decoded = decode_body(raw)
                self.assertTrue(same(decoded, meant), f"decoded {decoded!r}, the .json says {meant!r}")
                self.assertEqual(encode_body(decoded), raw, "re-encoding the decoded frame")
                self.assertEqual(encode_body(meant), raw, "encoding what the .json says")
                # Framed and split into single bytes, the stream reader gets the same frame.
                reader = FrameReader()
                frame = encode_frame(decoded)
                got: list[Any] = []
                for i in range(len(frame)):
                    got += reader.feed(frame[i : i + 1])
                self.assertEqual(len(got), 1)
                self.assertTrue(same(got[0], meant))
                self.assertEqual(reader.buffered, 0)

    def test_requests_pass_the_local_request_check(self) -> None:
        for p in vector_files():
            if p.parent.name != "requests":
                continue
            with self.subTest(vector=p.name):
                check_request(decode_body(p.with_suffix(".msgpack").read_bytes()))

    def test_invalid_frames_are_refused_with_their_error(self) -> None:
        invalid = [p for p in vector_files() if p.parent.name == "invalid"]
        self.assertGreater(len(invalid), 0)
        for p in invalid:
            with self.subTest(vector=p.name):
                raw = p.with_suffix(".msgpack").read_bytes()
                want = json.loads(p.read_text())
                code = want["error"]
                if code == "bad_frame":
                    with self.assertRaises(errors.BadFrame):
                        decode_body(raw)
                    # In a stream, the reader reports it and stays in step for the next frame.
                    reader = FrameReader()
                    out = reader.feed(len(raw).to_bytes(4, "big") + raw + encode_frame({"op": "ok", "id": 1}))
                    self.assertIsInstance(out[0], errors.BadFrame)
                    self.assertEqual(out[1], {"op": "ok", "id": 1})
                    continue
                # The other codes are about the request, not the frame: it decodes, and the
                # request check refuses it as the daemon does.
                frame = decode_body(raw)
                if "id" in want:
                    self.assertEqual(frame.get("id"), want["id"])
                with self.assertRaises(errors.SidebusError) as caught:
                    check_request(frame)
                self.assertEqual(caught.exception.code, code)
                if "field" in want:
                    self.assertEqual([d.get("field") for d in caught.exception.details], [want["field"]])

    def test_error_replies_become_their_typed_errors(self) -> None:
        for p in vector_files():
            meant = from_json(json.loads(p.read_text()))
            if p.parent.name == "invalid" or meant.get("op") != "error":
                continue
            with self.subTest(vector=p.name):
                e = errors.error_from_frame(decode_body(p.with_suffix(".msgpack").read_bytes()))
                self.assertEqual(e.code, meant["code"])
                self.assertEqual(e.message, meant["message"])
                self.assertEqual(e.details, meant["details"])
                self.assertNotIsInstance(e, errors.Internal)


if __name__ == "__main__":
    unittest.main()
