// This file owns the wire format: requests built as ordered field lists and encoded as
// length-prefixed MessagePack frames, and the decoder of the daemon's frames (one map with
// string keys, no key twice, nothing after it).

package sidebus

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"sync"

	"github.com/vmihailenco/msgpack/v5"
	"github.com/vmihailenco/msgpack/v5/msgpcode"
)

// ProtocolVersion is the wire protocol this client speaks.
const ProtocolVersion = 1

// RawMessage is one MessagePack value, already encoded. As publish data it is sent as it is;
// Event.Data holds the event's data in this form.
type RawMessage = msgpack.RawMessage

type fieldKind uint8

const (
	kindStr fieldKind = iota
	kindUint
	kindBool
	kindValue
)

// field is one key and value of a request, kept in a slice so that requests are encoded in a
// fixed order (the order of the protocol's own encoder, which the vectors show).
type field struct {
	key  string
	kind fieldKind
	s    string
	u    uint64
	b    bool
	v    any
}

// request is an op and its fields; the id is added when it is sent.
type request struct {
	op     string
	fields []field
}

func newRequest(op string) *request { return &request{op: op} }

func (r *request) str(k, v string) *request {
	r.fields = append(r.fields, field{key: k, kind: kindStr, s: v})
	return r
}

func (r *request) optStr(k, v string) *request {
	if v != "" {
		r.str(k, v)
	}
	return r
}

func (r *request) uint(k string, v uint64) *request {
	r.fields = append(r.fields, field{key: k, kind: kindUint, u: v})
	return r
}

func (r *request) optUint(k string, v uint64) *request {
	if v != 0 {
		r.uint(k, v)
	}
	return r
}

func (r *request) flag(k string, v bool) *request {
	if v {
		r.fields = append(r.fields, field{key: k, kind: kindBool, b: true})
	}
	return r
}

func (r *request) boolean(k string, v bool) *request {
	r.fields = append(r.fields, field{key: k, kind: kindBool, b: v})
	return r
}

func (r *request) value(k string, v any) *request {
	r.fields = append(r.fields, field{key: k, kind: kindValue, v: v})
	return r
}

var bufPool = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// newEncoder returns a pooled encoder writing to w, set up as every encoder of this client:
// integers in their smallest form (as the daemon writes them, so encodings compare byte for
// byte), structs by their `msgpack` tags.
func newEncoder(w *bytes.Buffer) *msgpack.Encoder {
	enc := msgpack.GetEncoder()
	enc.Reset(w)
	enc.UseCompactInts(true)
	return enc
}

// Marshal encodes v as MessagePack the way this client encodes publish data.
func Marshal(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := newEncoder(&b)
	defer msgpack.PutEncoder(enc)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// encodeFrame encodes the request with id (none when hasID is false) as a whole frame: the
// 4-byte big-endian length and the body. The buffer comes from bufPool.
func encodeFrame(r *request, id uint64, hasID bool) (*bytes.Buffer, error) {
	buf := bufPool.Get().(*bytes.Buffer)
	buf.Reset()
	buf.Write([]byte{0, 0, 0, 0})
	enc := newEncoder(buf)
	defer msgpack.PutEncoder(enc)
	n := 1 + len(r.fields)
	if hasID {
		n++
	}
	err := enc.EncodeMapLen(n)
	if err == nil {
		err = encodeKV(enc, "op", field{kind: kindStr, s: r.op})
	}
	if err == nil && hasID {
		err = encodeKV(enc, "id", field{kind: kindUint, u: id})
	}
	for _, f := range r.fields {
		if err != nil {
			break
		}
		err = encodeKV(enc, f.key, f)
	}
	if err != nil {
		bufPool.Put(buf)
		return nil, fmt.Errorf("sidebus: encoding %s: %w", r.op, err)
	}
	binary.BigEndian.PutUint32(buf.Bytes()[:4], uint32(buf.Len()-4))
	return buf, nil
}

func encodeKV(enc *msgpack.Encoder, k string, f field) error {
	if err := enc.EncodeString(k); err != nil {
		return err
	}
	switch f.kind {
	case kindStr:
		return enc.EncodeString(f.s)
	case kindUint:
		return enc.EncodeUint(f.u)
	case kindBool:
		return enc.EncodeBool(f.b)
	default:
		return enc.Encode(f.v)
	}
}

// frame is what the client reads from one of the daemon's frames. Fields the client reads
// often are decoded here; an ok reply with other fields keeps its body for a typed decode.
type frame struct {
	op      string
	id      uint64
	hasID   bool
	code    string
	message string
	details []map[string]any
	// subscribe and deliver
	sub     uint64
	tag     uint64
	attempt uint64
	event   *Event
	// publish
	eventID   string
	status    string
	duplicate bool
	// body is a copy of the whole body of an ok reply with fields, for a typed decode.
	body []byte
}

func isMapCode(c byte) bool {
	return msgpcode.IsFixedMap(c) || c == msgpcode.Map16 || c == msgpcode.Map32
}

func isStrCode(c byte) bool {
	return msgpcode.IsFixedString(c) || c == msgpcode.Str8 || c == msgpcode.Str16 || c == msgpcode.Str32
}

// badFrame is the error of a body that is not one MessagePack map with string keys.
func badFrame(format string, args ...any) *Error {
	return &Error{Code: CodeBadFrame, Message: fmt.Sprintf(format, args...)}
}

// parseFrame decodes one frame body from the daemon. A body that is not exactly one map with
// string keys, each once, is a bad_frame *Error.
func parseFrame(body []byte) (*frame, error) {
	r := bytes.NewReader(body)
	dec := msgpack.GetDecoder()
	dec.Reset(r)
	defer msgpack.PutDecoder(dec)
	c, err := dec.PeekCode()
	if err != nil {
		return nil, badFrame("empty body")
	}
	if !isMapCode(c) {
		return nil, badFrame("the body is not a map (MessagePack code 0x%02x)", c)
	}
	n, err := dec.DecodeMapLen()
	if err != nil {
		return nil, badFrame("%v", err)
	}
	f := &frame{}
	var seen [16]string
	keys := seen[:0]
	for i := 0; i < n; i++ {
		c, err := dec.PeekCode()
		if err != nil {
			return nil, badFrame("truncated body")
		}
		if !isStrCode(c) {
			return nil, badFrame("a key is not a string (MessagePack code 0x%02x)", c)
		}
		k, err := dec.DecodeString()
		if err != nil {
			return nil, badFrame("%v", err)
		}
		for _, s := range keys {
			if s == k {
				return nil, badFrame("the key %q is given twice", k)
			}
		}
		keys = append(keys, k)
		if err := f.decodeField(dec, k); err != nil {
			return nil, badFrame("field %s: %v", k, err)
		}
	}
	if r.Len() != 0 {
		return nil, badFrame("%d bytes follow the map", r.Len())
	}
	if f.op == "ok" && n > 2 {
		f.body = append([]byte(nil), body...)
	}
	return f, nil
}

func (f *frame) decodeField(dec *msgpack.Decoder, k string) error {
	var err error
	switch k {
	case "op":
		f.op, err = dec.DecodeString()
	case "id":
		var c byte
		if c, err = dec.PeekCode(); err != nil {
			return err
		}
		switch {
		case c == msgpcode.Nil:
			err = dec.Skip()
		case isStrCode(c):
			// A string id only answers a publish keyed by its event id, which this client
			// never sends; such a reply matches no request.
			_, err = dec.DecodeString()
		default:
			f.id, err = dec.DecodeUint64()
			f.hasID = err == nil
		}
	case "code":
		f.code, err = dec.DecodeString()
	case "message":
		f.message, err = dec.DecodeString()
	case "details":
		f.details, err = decodeDetails(dec)
	case "sub":
		f.sub, err = dec.DecodeUint64()
	case "tag":
		f.tag, err = dec.DecodeUint64()
	case "attempt":
		f.attempt, err = dec.DecodeUint64()
	case "event":
		f.event = new(Event)
		err = f.event.DecodeMsgpack(dec)
	case "event_id":
		f.eventID, err = dec.DecodeString()
	case "status":
		f.status, err = dec.DecodeString()
	case "duplicate":
		f.duplicate, err = dec.DecodeBool()
	default:
		err = dec.Skip()
	}
	return err
}

func decodeDetails(dec *msgpack.Decoder) ([]map[string]any, error) {
	v, err := dec.DecodeInterface()
	if err != nil || v == nil {
		return nil, err
	}
	list, ok := v.([]any)
	if !ok {
		return nil, fmt.Errorf("details is a %T, not an array", v)
	}
	out := make([]map[string]any, 0, len(list))
	for _, d := range list {
		m, ok := d.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("a detail is a %T, not a map", d)
		}
		out = append(out, m)
	}
	return out, nil
}

// replyError returns the *Error of an error reply, nil for an ok reply.
func (f *frame) replyError() error {
	switch f.op {
	case "ok":
		return nil
	case "error":
		details := f.details
		if details == nil {
			details = []map[string]any{}
		}
		return newError(f.code, f.message, details)
	default:
		return protocolError("a reply with op %q", f.op)
	}
}

// decodeReply decodes the fields of an ok reply into v (a pointer to a struct with msgpack
// tags); fields v does not name are ignored.
func (f *frame) decodeReply(v any) error {
	if f.body == nil {
		return nil
	}
	if err := msgpack.Unmarshal(f.body, v); err != nil {
		return protocolError("decoding the reply: %v", err)
	}
	return nil
}
