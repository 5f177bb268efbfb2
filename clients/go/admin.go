// This file owns the admin and schema operations as plain calls: stats, replay,
// replay_cancel, replays, dlq_list, dlq_redrive, dlq_purge, register_schema, get_schema and
// list_schemas, with their replies as typed structs (tagged with the protocol's field names).

package sidebus

import (
	"context"
	"time"
)

// Stats is the daemon's counters, spool and groups.
type Stats struct {
	Node    string `msgpack:"node" json:"node"`
	UptimeS uint64 `msgpack:"uptime_s" json:"uptime_s"`
	// Counters count what this daemon did since it started: published, spooled, flushed,
	// delivered, acked, nacked, retried, expired_leases, dead_lettered, redriven, replayed,
	// validation_failures, protocol_errors, redis_losses, recovered.
	Counters  map[string]uint64 `msgpack:"counters" json:"counters"`
	Spool     SpoolStats        `msgpack:"spool" json:"spool"`
	Groups    []GroupStats      `msgpack:"groups" json:"groups"`
	Truncated bool              `msgpack:"truncated,omitempty" json:"truncated,omitempty"`
	// Backends says how the daemon last found Redis and Postgres (empty from older daemons).
	Backends []BackendStats `msgpack:"backends,omitempty" json:"backends,omitempty"`
}

// BackendStats is one backend as the daemon last found it.
type BackendStats struct {
	Name    string `msgpack:"name" json:"name"`       // "redis" or "postgres"
	Address string `msgpack:"address" json:"address"` // the URL without its password
	Up      bool   `msgpack:"up" json:"up"`
	Since   string `msgpack:"since" json:"since"`                     // RFC 3339: when Up last changed
	Error   string `msgpack:"error,omitempty" json:"error,omitempty"` // the last error while down
}

// SpoolStats describe the daemon's local spool.
type SpoolStats struct {
	Events      uint64 `msgpack:"events" json:"events"`
	Bytes       uint64 `msgpack:"bytes" json:"bytes"`
	OldestAgeMS uint64 `msgpack:"oldest_age_ms" json:"oldest_age_ms"`
}

// GroupStats describe one consumer group of one type.
type GroupStats struct {
	Type            string `msgpack:"type" json:"type"`
	Group           string `msgpack:"group" json:"group"`
	Lag             uint64 `msgpack:"lag" json:"lag"`
	Pending         uint64 `msgpack:"pending" json:"pending"`
	OldestPendingMS uint64 `msgpack:"oldest_pending_ms" json:"oldest_pending_ms"`
	DeadLetters     uint64 `msgpack:"dead_letters" json:"dead_letters"`
	Consumers       uint64 `msgpack:"consumers" json:"consumers"`
	// Scheduled counts entries waiting in the retry schedule (not in Pending).
	Scheduled uint64 `msgpack:"scheduled" json:"scheduled"`
}

// Stats returns the daemon's counters, spool and the groups the fleet knows.
func (c *Client) Stats(ctx context.Context) (*Stats, error) {
	var s Stats
	if err := c.call(ctx, newRequest("stats"), &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// call sends a request and decodes its ok reply into out.
func (c *Client) call(ctx context.Context, r *request, out any) error {
	f, err := c.do(ctx, r, nil)
	if err != nil || out == nil {
		return err
	}
	return f.decodeReply(out)
}

// ReplayRequest asks for the events of Type logged in [Since, Until) again, for Group only.
type ReplayRequest struct {
	Type  string
	Group string
	Since time.Time
	// Until is exclusive; zero means now.
	Until time.Time
}

// ReplayStarted is the answer to a replay: Replay is empty when Count is 0 (nothing started).
type ReplayStarted struct {
	Count  uint64 `msgpack:"count" json:"count"`
	Replay string `msgpack:"replay,omitempty" json:"replay,omitempty"`
}

func rfc3339(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }

func replayRequest(q ReplayRequest) *request {
	r := newRequest("replay").str("type", q.Type).str("group", q.Group).str("since", rfc3339(q.Since))
	if !q.Until.IsZero() {
		r.str("until", rfc3339(q.Until))
	}
	return r
}

// Replay starts a replay.
func (c *Client) Replay(ctx context.Context, q ReplayRequest) (*ReplayStarted, error) {
	var out ReplayStarted
	if err := c.call(ctx, replayRequest(q), &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// ReplayCancel stops a running replay (ErrNotFound when it is not running).
func (c *Client) ReplayCancel(ctx context.Context, replay string) error {
	return c.call(ctx, replayCancelRequest(replay), nil)
}

func replayCancelRequest(replay string) *request {
	return newRequest("replay_cancel").str("replay", replay)
}

func replaysRequest(all bool) *request { return newRequest("replays").flag("all", all) }

// ReplayInfo describes a replay.
type ReplayInfo struct {
	Replay string `msgpack:"replay" json:"replay"`
	Type   string `msgpack:"type" json:"type"`
	Group  string `msgpack:"group" json:"group"`
	// Status is running, done or cancelled.
	Status string `msgpack:"status" json:"status"`
	// Reason is request, or recovery for a replay a daemon started after Redis lost its data.
	Reason string `msgpack:"reason" json:"reason"`
	Added  uint64 `msgpack:"added" json:"added"`
	// Total is 0 for a recovery replay.
	Total     uint64 `msgpack:"total,omitempty" json:"total,omitempty"`
	CreatedAt string `msgpack:"created_at" json:"created_at"`
}

// Replays lists the running replays; with all, also those that ended in the last day.
func (c *Client) Replays(ctx context.Context, all bool) ([]ReplayInfo, error) {
	var out struct {
		Replays []ReplayInfo `msgpack:"replays"`
	}
	err := c.call(ctx, replaysRequest(all), &out)
	return out.Replays, err
}

// DLQListRequest asks for a page of a group's dead letters.
type DLQListRequest struct {
	Type  string
	Group string
	// Limit is 1 to 1000 (default 100).
	Limit uint64
	// After is the Next of the previous page.
	After uint64
	// IDs keeps only these event ids.
	IDs []string
}

// DLQPage is a page of dead letters, oldest first; Next is set when there may be more.
type DLQPage struct {
	Entries []DeadLetter `msgpack:"entries" json:"entries"`
	Next    uint64       `msgpack:"next,omitempty" json:"next,omitempty"`
}

// DeadLetter is an event in the dead-letter queue.
type DeadLetter struct {
	// ID is the dead letter's number.
	ID    uint64 `msgpack:"id" json:"id"`
	Event Event  `msgpack:"event" json:"event"`
	// Error is the last error; Attempts the failed attempts; FailedAt RFC 3339.
	Error    string          `msgpack:"error" json:"error"`
	Attempts uint64          `msgpack:"attempts" json:"attempts"`
	FailedAt string          `msgpack:"failed_at" json:"failed_at"`
	History  []FailedAttempt `msgpack:"history" json:"history"`
}

// FailedAttempt is one failed attempt of a dead letter (At is RFC 3339).
type FailedAttempt struct {
	Attempt uint64 `msgpack:"attempt" json:"attempt"`
	Error   string `msgpack:"error" json:"error"`
	At      string `msgpack:"at" json:"at"`
}

func dlqListRequest(q DLQListRequest) *request {
	r := newRequest("dlq_list").str("type", q.Type).str("group", q.Group).optUint("limit", q.Limit).optUint("after", q.After)
	if len(q.IDs) > 0 {
		r.value("ids", q.IDs)
	}
	return r
}

// DLQList returns a page of a group's dead letters.
func (c *Client) DLQList(ctx context.Context, q DLQListRequest) (*DLQPage, error) {
	var out DLQPage
	if err := c.call(ctx, dlqListRequest(q), &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// DLQRequest names dead letters of a group: IDs, or all of them when IDs is empty.
type DLQRequest struct {
	Type  string
	Group string
	IDs   []string
	// Rate (per second) paces a redrive; the reply then comes when all are back.
	Rate uint64
}

func dlqActionRequest(op string, q DLQRequest) *request {
	r := newRequest(op).str("type", q.Type).str("group", q.Group)
	if len(q.IDs) > 0 {
		r.value("ids", q.IDs)
	}
	if op == "dlq_redrive" {
		r.optUint("rate", q.Rate)
	}
	return r
}

// DLQRedrive puts dead letters back in front of their group's consumers (attempt 1 again)
// and returns how many.
func (c *Client) DLQRedrive(ctx context.Context, q DLQRequest) (uint64, error) {
	var out struct {
		Count uint64 `msgpack:"count"`
	}
	err := c.call(ctx, dlqActionRequest("dlq_redrive", q), &out)
	return out.Count, err
}

// DLQPurge discards dead letters and returns how many.
func (c *Client) DLQPurge(ctx context.Context, q DLQRequest) (uint64, error) {
	var out struct {
		Count uint64 `msgpack:"count"`
	}
	err := c.call(ctx, dlqActionRequest("dlq_purge", q), &out)
	return out.Count, err
}

// Compatibility is a type's schema compatibility mode.
type Compatibility string

const (
	CompatibilityBackward           Compatibility = "backward"
	CompatibilityBackwardTransitive Compatibility = "backward_transitive"
	CompatibilityForward            Compatibility = "forward"
	CompatibilityForwardTransitive  Compatibility = "forward_transitive"
	CompatibilityFull               Compatibility = "full"
	CompatibilityFullTransitive     Compatibility = "full_transitive"
	CompatibilityNone               Compatibility = "none"
)

// RegisterSchemaRequest registers Schema (a JSON Schema: a map, a struct, or a bool) as the
// next version of Type's schema.
type RegisterSchemaRequest struct {
	Type   string
	Schema any
	// Compatibility, when set, sets the type's mode (default for a new type: backward).
	Compatibility Compatibility
	// Strict, when set, sets the type's reading of open content models.
	Strict *bool
	// DryRun only checks; nothing is stored.
	DryRun bool
}

// SchemaRegistered is the answer to register_schema: Created is false when the schema was
// identical to the latest version.
type SchemaRegistered struct {
	Type    string `msgpack:"type" json:"type"`
	Version uint64 `msgpack:"version" json:"version"`
	Created bool   `msgpack:"created" json:"created"`
}

func registerSchemaRequest(q RegisterSchemaRequest) *request {
	r := newRequest("register_schema").str("type", q.Type).value("schema", q.Schema).optStr("compatibility", string(q.Compatibility))
	if q.Strict != nil {
		r.boolean("strict", *q.Strict)
	}
	return r.flag("dry_run", q.DryRun)
}

// RegisterSchema registers a schema version (ErrIncompatibleSchema, with one detail per
// breaking change, when it breaks the type's mode).
func (c *Client) RegisterSchema(ctx context.Context, q RegisterSchemaRequest) (*SchemaRegistered, error) {
	var out SchemaRegistered
	if err := c.call(ctx, registerSchemaRequest(q), &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// SchemaInfo is a version of a type's schema.
type SchemaInfo struct {
	Type          string        `msgpack:"type" json:"type"`
	Version       uint64        `msgpack:"version" json:"version"`
	Schema        any           `msgpack:"schema" json:"schema"`
	Compatibility Compatibility `msgpack:"compatibility" json:"compatibility"`
	Strict        bool          `msgpack:"strict" json:"strict"`
}

// GetSchema returns a version of a type's schema; version 0 means the latest.
func (c *Client) GetSchema(ctx context.Context, typ string, version uint64) (*SchemaInfo, error) {
	var out SchemaInfo
	if err := c.call(ctx, getSchemaRequest(typ, version), &out); err != nil {
		return nil, err
	}
	return &out, nil
}

func getSchemaRequest(typ string, version uint64) *request {
	return newRequest("get_schema").str("type", typ).optUint("version", version)
}

// SchemaSummary is one type with a schema.
type SchemaSummary struct {
	Type          string        `msgpack:"type" json:"type"`
	Latest        uint64        `msgpack:"latest" json:"latest"`
	Compatibility Compatibility `msgpack:"compatibility" json:"compatibility"`
}

// ListSchemas lists every type with a schema, by name.
func (c *Client) ListSchemas(ctx context.Context) ([]SchemaSummary, error) {
	var out struct {
		Types []SchemaSummary `msgpack:"types"`
	}
	err := c.call(ctx, newRequest("list_schemas"), &out)
	return out.Types, err
}
