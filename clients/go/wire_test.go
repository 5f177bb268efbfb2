// This file owns the tests' view of the wire: MessagePack values decoded generically with
// their map order kept (so they re-encode byte for byte), the JSON forms of the vectors
// ($bin, $int), and a request checker that refuses what the daemon refuses, used by the
// vector tests and by the fake daemon.

package sidebus

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math"
	"math/big"
	"strconv"

	"github.com/vmihailenco/msgpack/v5"
	"github.com/vmihailenco/msgpack/v5/msgpcode"
)

// kv is one entry of an ordered map.
type kv struct {
	k any
	v any
}

// omap is a MessagePack map with its order kept.
type omap []kv

func (m omap) EncodeMsgpack(enc *msgpack.Encoder) error {
	if err := enc.EncodeMapLen(len(m)); err != nil {
		return err
	}
	for _, e := range m {
		if err := enc.Encode(e.k); err != nil {
			return err
		}
		if err := enc.Encode(e.v); err != nil {
			return err
		}
	}
	return nil
}

func (m omap) get(k string) (any, bool) {
	for _, e := range m {
		if e.k == k {
			return e.v, true
		}
	}
	return nil, false
}

// decodeValue decodes one MessagePack value: maps as omap, unsigned encodings as uint64,
// signed ones as int64, bin as []byte.
func decodeValue(dec *msgpack.Decoder) (any, error) {
	c, err := dec.PeekCode()
	if err != nil {
		return nil, err
	}
	switch {
	case isMapCode(c):
		n, err := dec.DecodeMapLen()
		if err != nil {
			return nil, err
		}
		m := make(omap, 0, n)
		for i := 0; i < n; i++ {
			k, err := decodeValue(dec)
			if err != nil {
				return nil, err
			}
			v, err := decodeValue(dec)
			if err != nil {
				return nil, err
			}
			m = append(m, kv{k, v})
		}
		return m, nil
	case msgpcode.IsFixedArray(c) || c == msgpcode.Array16 || c == msgpcode.Array32:
		n, err := dec.DecodeArrayLen()
		if err != nil {
			return nil, err
		}
		a := make([]any, 0, n)
		for i := 0; i < n; i++ {
			v, err := decodeValue(dec)
			if err != nil {
				return nil, err
			}
			a = append(a, v)
		}
		return a, nil
	case c == msgpcode.Nil:
		return nil, dec.DecodeNil()
	case c == msgpcode.True || c == msgpcode.False:
		return dec.DecodeBool()
	case msgpcode.IsFixedNum(c) && c <= msgpcode.PosFixedNumHigh,
		c == msgpcode.Uint8 || c == msgpcode.Uint16 || c == msgpcode.Uint32 || c == msgpcode.Uint64:
		return dec.DecodeUint64()
	case msgpcode.IsFixedNum(c),
		c == msgpcode.Int8 || c == msgpcode.Int16 || c == msgpcode.Int32 || c == msgpcode.Int64:
		return dec.DecodeInt64()
	case c == msgpcode.Float:
		return dec.DecodeFloat32()
	case c == msgpcode.Double:
		return dec.DecodeFloat64()
	case isStrCode(c):
		return dec.DecodeString()
	case c == msgpcode.Bin8 || c == msgpcode.Bin16 || c == msgpcode.Bin32:
		return dec.DecodeBytes()
	}
	return nil, fmt.Errorf("unsupported MessagePack code 0x%02x", c)
}

// decodeAll decodes exactly one value from b.
func decodeAll(b []byte) (any, error) {
	r := bytes.NewReader(b)
	dec := msgpack.NewDecoder(r)
	v, err := decodeValue(dec)
	if err != nil {
		return nil, err
	}
	if r.Len() != 0 {
		return nil, fmt.Errorf("%d trailing bytes", r.Len())
	}
	return v, nil
}

// encodeValue encodes v with the client's encoder.
func encodeValue(v any) ([]byte, error) { return Marshal(v) }

// fromJSON reads a vector's JSON with its map order kept: objects as omap, integers as
// int64/uint64 (or big ones from {"$int"}), {"$bin": base64} as []byte.
func fromJSON(b []byte) (any, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	v, err := readJSON(dec)
	if err != nil {
		return nil, err
	}
	if dec.More() {
		return nil, fmt.Errorf("trailing JSON")
	}
	return v, nil
}

func readJSON(dec *json.Decoder) (any, error) {
	t, err := dec.Token()
	if err != nil {
		return nil, err
	}
	switch t := t.(type) {
	case json.Delim:
		switch t {
		case '{':
			m := omap{}
			for dec.More() {
				k, err := dec.Token()
				if err != nil {
					return nil, err
				}
				v, err := readJSON(dec)
				if err != nil {
					return nil, err
				}
				m = append(m, kv{k.(string), v})
			}
			if _, err := dec.Token(); err != nil {
				return nil, err
			}
			if len(m) == 1 && m[0].k == "$bin" {
				s, _ := m[0].v.(string)
				return base64.StdEncoding.DecodeString(s)
			}
			if len(m) == 1 && m[0].k == "$int" {
				s, _ := m[0].v.(string)
				return parseInt(s)
			}
			return m, nil
		case '[':
			a := []any{}
			for dec.More() {
				v, err := readJSON(dec)
				if err != nil {
					return nil, err
				}
				a = append(a, v)
			}
			if _, err := dec.Token(); err != nil {
				return nil, err
			}
			return a, nil
		}
	case json.Number:
		if v, err := parseInt(string(t)); err == nil {
			return v, nil
		}
		return t.Float64()
	case string, bool, nil:
		return t, nil
	}
	return nil, fmt.Errorf("unexpected JSON token %v", t)
}

func parseInt(s string) (any, error) {
	if i, err := strconv.ParseInt(s, 10, 64); err == nil {
		return i, nil
	}
	return strconv.ParseUint(s, 10, 64)
}

// bigOf returns an integer value as a big.Int (nil for a non-integer).
func bigOf(v any) *big.Int {
	switch n := v.(type) {
	case int64:
		return big.NewInt(n)
	case uint64:
		return new(big.Int).SetUint64(n)
	case int:
		return big.NewInt(int64(n))
	}
	return nil
}

func floatOf(v any) (float64, bool) {
	switch n := v.(type) {
	case float64:
		return n, true
	case float32:
		return float64(n), true
	}
	if b := bigOf(v); b != nil {
		f, _ := new(big.Float).SetInt(b).Float64()
		return f, true
	}
	return 0, false
}

// sameValue compares a decoded value with a JSON one by meaning: maps by keys (any order),
// integers exactly, floats by value.
func sameValue(a, b any) error {
	if ai, bi := bigOf(a), bigOf(b); ai != nil && bi != nil {
		if ai.Cmp(bi) != 0 {
			return fmt.Errorf("%v != %v", a, b)
		}
		return nil
	}
	if af, ok := floatOf(a); ok {
		if bf, ok := floatOf(b); ok && (af == bf || (math.IsNaN(af) && math.IsNaN(bf))) {
			return nil
		}
		return fmt.Errorf("%v (%T) != %v (%T)", a, a, b, b)
	}
	switch av := a.(type) {
	case omap:
		bv, ok := b.(omap)
		if !ok || len(av) != len(bv) {
			return fmt.Errorf("map %v != %v", a, b)
		}
		for _, e := range av {
			x, ok := bv.get(fmt.Sprint(e.k))
			if !ok {
				return fmt.Errorf("key %v missing from %v", e.k, b)
			}
			if err := sameValue(e.v, x); err != nil {
				return fmt.Errorf("%v: %w", e.k, err)
			}
		}
		return nil
	case []any:
		bv, ok := b.([]any)
		if !ok || len(av) != len(bv) {
			return fmt.Errorf("array %v != %v", a, b)
		}
		for i := range av {
			if err := sameValue(av[i], bv[i]); err != nil {
				return fmt.Errorf("[%d]: %w", i, err)
			}
		}
		return nil
	case []byte:
		bv, ok := b.([]byte)
		if !ok || !bytes.Equal(av, bv) {
			return fmt.Errorf("bin %x != %v", av, b)
		}
		return nil
	case string, bool, nil:
		if a != b {
			return fmt.Errorf("%#v != %#v", a, b)
		}
		return nil
	}
	return fmt.Errorf("cannot compare %T with %T", a, b)
}

// checkedRequest is a request as the fake daemon reads it.
type checkedRequest struct {
	op     string
	id     uint64
	hasID  bool
	fields omap
}

func (r *checkedRequest) str(k string) string {
	v, _ := r.fields.get(k)
	s, _ := v.(string)
	return s
}

func (r *checkedRequest) uint(k string) uint64 {
	v, _ := r.fields.get(k)
	switch n := v.(type) {
	case uint64:
		return n
	case int64:
		return uint64(n)
	}
	return 0
}

func (r *checkedRequest) has(k string) bool {
	_, ok := r.fields.get(k)
	return ok
}

// requestError is what the daemon answers a request it refuses.
type requestError struct {
	code  Code
	field string
}

func (e *requestError) Error() string { return string(e.code) + " " + e.field }

// fieldKinds lists, per op, its fields in the order the daemon checks them: "str", "uint",
// "bool", "any", "strs" (array of strings), "schema" (map or bool); "!" marks a required one.
var fieldKinds = map[string][][2]string{
	"hello":           {{"protocol", "uint!"}, {"client", "str"}},
	"ping":            {},
	"publish":         {{"type", "str!"}, {"data", "any!"}, {"event_id", "str"}, {"durability", "str"}, {"version", "uint"}, {"source", "str"}, {"correlationid", "str"}, {"partitionkey", "str"}, {"traceparent", "str"}, {"deliver_at", "str"}, {"delay_ms", "uint"}},
	"subscribe":       {{"type", "str!"}, {"group", "str!"}, {"max_in_flight", "uint"}, {"max_attempts", "uint"}, {"ack_timeout_ms", "uint"}},
	"ack":             {{"tag", "uint!"}},
	"nack":            {{"tag", "uint!"}, {"error", "str"}, {"delay_ms", "uint"}, {"dead", "bool"}},
	"extend":          {{"tag", "uint!"}},
	"unsubscribe":     {{"sub", "uint!"}},
	"register_schema": {{"type", "str!"}, {"schema", "schema!"}, {"compatibility", "str"}, {"strict", "bool"}, {"dry_run", "bool"}},
	"get_schema":      {{"type", "str!"}, {"version", "uint"}},
	"list_schemas":    {},
	"replay":          {{"type", "str!"}, {"group", "str!"}, {"since", "str!"}, {"until", "str"}},
	"replay_cancel":   {{"replay", "str!"}},
	"replays":         {{"all", "bool"}},
	"dlq_list":        {{"type", "str!"}, {"group", "str!"}, {"limit", "uint"}, {"after", "uint"}, {"ids", "strs"}},
	"dlq_redrive":     {{"type", "str!"}, {"group", "str!"}, {"ids", "strs"}, {"rate", "uint"}},
	"dlq_purge":       {{"type", "str!"}, {"group", "str!"}, {"ids", "strs"}},
	"stats":           {},
	// Group lifecycle: no client methods yet; read so that their vectors are checked.
	"groups":       {{"type", "str"}},
	"group_delete": {{"type", "str!"}, {"group", "str!"}, {"force", "bool"}},
	"group_reset":  {{"type", "str!"}, {"group", "str!"}, {"to", "str!"}},
}

// checkRequest reads a request frame body as the daemon does: a bad_frame for a body that is
// not one map with string keys, then bad_request or unknown_op naming what is wrong.
func checkRequest(body []byte) (*checkedRequest, error) {
	if _, err := parseFrame(body); err != nil {
		return nil, err
	}
	v, err := decodeAll(body)
	if err != nil {
		return nil, &requestError{code: CodeBadFrame}
	}
	m := v.(omap)
	r := &checkedRequest{fields: omap{}}
	idv, hasID := m.get("id")
	if hasID && idv != nil {
		switch n := idv.(type) {
		case uint64:
			r.id, r.hasID = n, true
		case int64:
			if n < 0 {
				return nil, &requestError{CodeBadRequest, "id"}
			}
			r.id, r.hasID = uint64(n), true
		case string:
		default:
			return nil, &requestError{CodeBadRequest, "id"}
		}
	}
	opv, _ := m.get("op")
	op, ok := opv.(string)
	if !ok {
		return nil, &requestError{CodeBadRequest, "op"}
	}
	r.op = op
	kinds, known := fieldKinds[op]
	if !known {
		return nil, &requestError{code: CodeUnknownOp}
	}
	for _, fk := range kinds {
		name, kind := fk[0], fk[1]
		required := kind[len(kind)-1] == '!'
		if required {
			kind = kind[:len(kind)-1]
		}
		v, present := m.get(name)
		if !present || (v == nil && name != "data") {
			if required {
				return nil, &requestError{CodeBadRequest, name}
			}
			continue
		}
		okKind := false
		switch kind {
		case "str":
			_, okKind = v.(string)
		case "uint":
			b := bigOf(v)
			okKind = b != nil && b.Sign() >= 0
		case "bool":
			_, okKind = v.(bool)
		case "any":
			okKind = true
		case "schema":
			_, isMap := v.(omap)
			_, isBool := v.(bool)
			okKind = isMap || isBool
		case "strs":
			a, isArr := v.([]any)
			okKind = isArr
			for _, x := range a {
				if _, s := x.(string); !s {
					okKind = false
				}
			}
		}
		if !okKind {
			return nil, &requestError{CodeBadRequest, name}
		}
		r.fields = append(r.fields, kv{name, v})
	}
	_, isStr := idv.(string)
	if !r.hasID && !(op == "ack" || op == "nack" || op == "extend") && !(isStr && op == "publish") {
		return nil, &requestError{CodeBadRequest, "id"}
	}
	if isStr && op != "publish" {
		return nil, &requestError{CodeBadRequest, "id"}
	}
	return r, nil
}
