// This file owns the Event type: a CloudEvents 1.0 event as the daemon delivers it, decoded
// from and encoded to its MessagePack map, with its data kept as raw MessagePack.

package sidebus

import (
	"encoding/json"
	"fmt"
	"sort"
	"time"

	"github.com/vmihailenco/msgpack/v5"
	"github.com/vmihailenco/msgpack/v5/msgpcode"
)

// Event is an event as delivered (PROTOCOL.md, "Events"). Optional attributes are zero when
// absent.
type Event struct {
	SpecVersion string
	ID          string
	Type        string
	Source      string
	// Time is when the event was stored, UTC, microseconds.
	Time time.Time
	// SchemaVersion is the schema version Data was validated against; 0 when the type has no
	// schema.
	SchemaVersion uint64
	CorrelationID string
	PartitionKey  string
	TraceParent   string
	// DeliverAt is set on an event published with a delay.
	DeliverAt time.Time
	// Replayed is true on deliveries from a replay.
	Replayed bool
	// Data is the publisher's value as MessagePack; decode it with DecodeData.
	Data RawMessage
	// Extensions holds the attributes this client does not know, decoded generically.
	Extensions map[string]any
}

// DecodeData decodes the event's data into v, as msgpack.Unmarshal does (maps into
// map[string]any, structs by their `msgpack` tags).
func (e *Event) DecodeData(v any) error {
	if len(e.Data) == 0 {
		return fmt.Errorf("sidebus: the event has no data")
	}
	return msgpack.Unmarshal(e.Data, v)
}

// timeLayout is the protocol's time format: RFC 3339, UTC, microseconds.
const timeLayout = "2006-01-02T15:04:05.000000Z07:00"

// FormatTime formats t as the protocol writes times (RFC 3339, UTC, microseconds).
func FormatTime(t time.Time) string { return t.UTC().Format(timeLayout) }

func decodeTime(dec *msgpack.Decoder) (time.Time, error) {
	s, err := dec.DecodeString()
	if err != nil || s == "" {
		return time.Time{}, err
	}
	return time.Parse(time.RFC3339Nano, s)
}

// DecodeMsgpack decodes the event map (msgpack.CustomDecoder), so an Event can sit in any
// struct decoded with msgpack.Unmarshal.
func (e *Event) DecodeMsgpack(dec *msgpack.Decoder) error {
	c, err := dec.PeekCode()
	if err != nil {
		return err
	}
	if !isMapCode(c) {
		return fmt.Errorf("an event is a map, not MessagePack code 0x%02x", c)
	}
	n, err := dec.DecodeMapLen()
	if err != nil {
		return err
	}
	*e = Event{}
	for i := 0; i < n; i++ {
		k, err := dec.DecodeString()
		if err != nil {
			return err
		}
		if c, err := dec.PeekCode(); err == nil && c == msgpcode.Nil && k != "data" {
			// nil counts as absent, except for data.
			if err := dec.Skip(); err != nil {
				return err
			}
			continue
		}
		switch k {
		case "specversion":
			e.SpecVersion, err = dec.DecodeString()
		case "id":
			e.ID, err = dec.DecodeString()
		case "type":
			e.Type, err = dec.DecodeString()
		case "source":
			e.Source, err = dec.DecodeString()
		case "time":
			e.Time, err = decodeTime(dec)
		case "schemaversion":
			e.SchemaVersion, err = dec.DecodeUint64()
		case "correlationid":
			e.CorrelationID, err = dec.DecodeString()
		case "partitionkey":
			e.PartitionKey, err = dec.DecodeString()
		case "traceparent":
			e.TraceParent, err = dec.DecodeString()
		case "deliverat":
			e.DeliverAt, err = decodeTime(dec)
		case "replayed":
			e.Replayed, err = dec.DecodeBool()
		case "data":
			e.Data, err = dec.DecodeRaw()
		default:
			var v any
			if v, err = dec.DecodeInterface(); err == nil {
				if e.Extensions == nil {
					e.Extensions = map[string]any{}
				}
				e.Extensions[k] = v
			}
		}
		if err != nil {
			return fmt.Errorf("event attribute %s: %w", k, err)
		}
	}
	return nil
}

// attributes lists the event's attributes in the protocol's order, absent ones left out,
// then its extensions by name; data is not included.
func (e Event) attributes() []field {
	var fs []field
	str := func(k, v string) {
		if v != "" {
			fs = append(fs, field{key: k, kind: kindStr, s: v})
		}
	}
	str("specversion", e.SpecVersion)
	str("id", e.ID)
	str("type", e.Type)
	str("source", e.Source)
	if !e.Time.IsZero() {
		str("time", FormatTime(e.Time))
	}
	if e.SchemaVersion != 0 {
		fs = append(fs, field{key: "schemaversion", kind: kindUint, u: e.SchemaVersion})
	}
	str("correlationid", e.CorrelationID)
	str("partitionkey", e.PartitionKey)
	str("traceparent", e.TraceParent)
	if !e.DeliverAt.IsZero() {
		str("deliverat", FormatTime(e.DeliverAt))
	}
	if e.Replayed {
		fs = append(fs, field{key: "replayed", kind: kindBool, b: true})
	}
	names := make([]string, 0, len(e.Extensions))
	for k := range e.Extensions {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		fs = append(fs, field{key: k, kind: kindValue, v: e.Extensions[k]})
	}
	return fs
}

// EncodeMsgpack encodes the event map as the daemon does (msgpack.CustomEncoder).
func (e Event) EncodeMsgpack(enc *msgpack.Encoder) error {
	fs := e.attributes()
	data := e.Data
	if len(data) == 0 {
		data = RawMessage{msgpcode.Nil}
	}
	fs = append(fs, field{key: "data", kind: kindValue, v: data})
	if err := enc.EncodeMapLen(len(fs)); err != nil {
		return err
	}
	for _, f := range fs {
		if err := encodeKV(enc, f.key, f); err != nil {
			return err
		}
	}
	return nil
}

// MarshalJSON writes the event in CloudEvents' JSON form: its attributes, and data decoded
// from MessagePack (binary data becomes a base64 string, as encoding/json writes []byte).
func (e Event) MarshalJSON() ([]byte, error) {
	m := map[string]any{}
	for _, f := range e.attributes() {
		switch f.kind {
		case kindStr:
			m[f.key] = f.s
		case kindUint:
			m[f.key] = f.u
		case kindBool:
			m[f.key] = f.b
		default:
			m[f.key] = f.v
		}
	}
	var data any
	if len(e.Data) > 0 {
		if err := msgpack.Unmarshal(e.Data, &data); err != nil {
			return nil, err
		}
	}
	m["data"] = data
	return json.Marshal(m)
}
