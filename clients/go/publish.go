// This file owns publishing: the publish options (every field of the op), Publish, and
// PublishAsync, which sends at once and is awaited later (pipelining in call order).

package sidebus

import (
	"context"
	"errors"
	"time"
)

// Durability says when a publish is answered.
type Durability string

const (
	// DurabilityLocal (the default): answered once fsynced in the daemon's spool.
	DurabilityLocal Durability = "local"
	// DurabilityCommitted: answered once the log and Redis hold the event.
	DurabilityCommitted Durability = "committed"
)

// Status is where a published event is when the daemon answers.
type Status string

const (
	StatusSpooled   Status = "spooled"
	StatusCommitted Status = "committed"
)

// PublishOptions are the optional fields of a publish; zero values are left out.
type PublishOptions struct {
	// EventID is the event id and idempotency key: a publish repeating the id of a stored
	// event is stored and delivered once. Default: a UUIDv7 chosen by the daemon. Set it to
	// retry safely after ErrConnectionLost, ErrUnavailable or ErrTimeout.
	EventID string
	// Durability: DurabilityLocal (default) or DurabilityCommitted.
	Durability Durability
	// Delay delivers the event this long after the publish (milliseconds on the wire, at most
	// 90 days). Not with DeliverAt.
	Delay time.Duration
	// DeliverAt delivers the event from then on.
	DeliverAt time.Time
	// PartitionKey, TraceParent (W3C trace context) and CorrelationID (default: the event id)
	// are carried on the event.
	PartitionKey  string
	TraceParent   string
	CorrelationID string
	// Version is the schema version to validate against; 0 means the latest.
	Version uint64
	// Source overrides the client's name as the event's source.
	Source string
}

// PublishResult is the daemon's answer to a publish.
type PublishResult struct {
	EventID string `json:"event_id"`
	Status  Status `json:"status"`
	// Duplicate is true when the event id was already stored (nothing new was stored).
	Duplicate bool `json:"duplicate"`
}

// publishRequest builds the publish op with its fields in the protocol encoder's order.
func publishRequest(typ string, data any, o PublishOptions) *request {
	r := newRequest("publish").str("type", typ).value("data", data).optUint("version", o.Version)
	r.optStr("source", o.Source).optStr("event_id", o.EventID)
	r.optStr("correlationid", o.CorrelationID).optStr("partitionkey", o.PartitionKey).optStr("traceparent", o.TraceParent)
	r.optStr("durability", string(o.Durability))
	if !o.DeliverAt.IsZero() {
		r.str("deliver_at", o.DeliverAt.UTC().Format(time.RFC3339Nano))
	}
	if o.Delay > 0 {
		ms := uint64(o.Delay / time.Millisecond)
		if ms == 0 {
			ms = 1
		}
		r.uint("delay_ms", ms)
	}
	return r
}

// PendingPublish is a publish sent and not yet answered.
type PendingPublish struct {
	c  *call
	cn *conn
}

// Done is closed when the answer (or the connection's failure) is in.
func (p *PendingPublish) Done() <-chan struct{} { return p.c.done }

// Wait waits for the daemon's answer. An error reply is an *Error (e.g. ErrBackpressure,
// ErrValidationFailed); a connection that broke meanwhile is ErrConnectionLost.
func (p *PendingPublish) Wait(ctx context.Context) (*PublishResult, error) {
	f, err := p.c.wait(ctx, p.cn)
	if err != nil {
		return nil, err
	}
	return &PublishResult{EventID: f.eventID, Status: Status(f.status), Duplicate: f.duplicate}, nil
}

// PublishAsync sends a publish and returns without waiting for its answer. Publishes started
// one after another from one goroutine are sent, and so stored, in that order. It waits only
// while the write queue is full or the client is reconnecting; ctx bounds that wait.
// data is any value the MessagePack library encodes (maps, slices, structs with `msgpack`
// tags, []byte as binary), or a RawMessage sent as it is.
func (c *Client) PublishAsync(ctx context.Context, typ string, data any, opts PublishOptions) (*PendingPublish, error) {
	r := publishRequest(typ, data, opts)
	for {
		cn, err := c.conn(ctx)
		if err != nil {
			return nil, err
		}
		call := &call{done: make(chan struct{})}
		err = cn.send(ctx, r, call)
		if errors.Is(err, errConnDead) {
			c.markLost(cn)
			continue
		}
		if err != nil {
			return nil, err
		}
		return &PendingPublish{c: call, cn: cn}, nil
	}
}

// Publish stores an event of type typ and waits for the daemon's answer. Call it from many
// goroutines, or use PublishAsync, to have many publishes in flight.
func (c *Client) Publish(ctx context.Context, typ string, data any, opts PublishOptions) (*PublishResult, error) {
	p, err := c.PublishAsync(ctx, typ, data, opts)
	if err != nil {
		return nil, err
	}
	return p.Wait(ctx)
}
