// Command conformance is the Go client's runner of the shared conformance suite
// (clients/conformance/README.md): it reads scenarios as JSON lines on stdin, runs their steps
// through the client's public API, and writes what it observed as JSON lines on stdout.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"math/big"
	"os"
	"strconv"
	"sync"
	"time"

	sidebus "github.com/sidebus/sidebus/clients/go"
	"github.com/vmihailenco/msgpack/v5"
)

var (
	out   = bufio.NewWriter(os.Stdout)
	outMu sync.Mutex
	lines = make(chan string)
)

func emit(v any) {
	b, err := json.Marshal(v)
	if err != nil {
		log.Fatalf("cannot write %v: %v", v, err)
	}
	outMu.Lock()
	defer outMu.Unlock()
	out.Write(b)
	out.WriteByte('\n')
	out.Flush()
}

func main() {
	log.SetOutput(os.Stderr)
	log.SetPrefix("runner: ")
	go func() {
		sc := bufio.NewScanner(os.Stdin)
		sc.Buffer(make([]byte, 1<<20), 64<<20)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	for line := range lines {
		if len(bytes.TrimSpace([]byte(line))) == 0 {
			continue
		}
		var msg map[string]any
		if err := decodeJSON([]byte(line), &msg); err != nil {
			log.Printf("not a JSON object: %v", err)
			continue
		}
		name, _ := msg["scenario"].(string)
		steps, _ := msg["steps"].([]any)
		if name == "" {
			log.Printf("ignoring %s", line)
			continue
		}
		sc := &scenario{name: name, clients: map[string]*sidebus.Client{}, subs: map[string]*subState{}, records: map[string]any{}}
		emit(sc.run(steps))
	}
}

func decodeJSON(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	return dec.Decode(v)
}

type scenario struct {
	name    string
	clients map[string]*sidebus.Client
	order   []string
	subs    map[string]*subState
	records map[string]any
}

// subState is what a subscription's handler recorded.
type subState struct {
	sub           *sidebus.Subscription
	mu            sync.Mutex
	deliveries    []any
	ids           map[string]bool
	running       int
	maxConcurrent int
}

func (sc *scenario) run(steps []any) map[string]any {
	var stepErr error
	for i, s := range steps {
		step, _ := s.(map[string]any)
		if err := sc.step(step); err != nil {
			stepErr = fmt.Errorf("step %d (%v): %w", i, step["do"], err)
			break
		}
	}
	// Every client of the scenario is closed gracefully before what was observed is written.
	for _, name := range sc.order {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := sc.clients[name].Close(ctx); err != nil {
			log.Printf("%s: closing %s: %v", sc.name, name, err)
		}
		cancel()
	}
	if stepErr != nil {
		return map[string]any{"scenario": sc.name, "error": stepErr.Error()}
	}
	subs := map[string]any{}
	for name, st := range sc.subs {
		st.mu.Lock()
		deliveries := st.deliveries
		if deliveries == nil {
			deliveries = []any{} // JSON [] rather than null: a subscription that got nothing
		}
		subs[name] = map[string]any{"deliveries": deliveries, "max_concurrent": st.maxConcurrent}
		st.mu.Unlock()
	}
	return map[string]any{"scenario": sc.name, "observed": map[string]any{"records": sc.records, "subs": subs}}
}

func str(m map[string]any, k string) string {
	s, _ := m[k].(string)
	return s
}

func num(m map[string]any, k string) uint64 {
	switch n := m[k].(type) {
	case json.Number:
		v, _ := strconv.ParseUint(n.String(), 10, 64)
		return v
	}
	return 0
}

func (sc *scenario) client(step map[string]any) (*sidebus.Client, error) {
	c := sc.clients[str(step, "client")]
	if c == nil {
		return nil, fmt.Errorf("no client %q", str(step, "client"))
	}
	return c, nil
}

func callCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 60*time.Second)
}

func (sc *scenario) step(step map[string]any) error {
	switch step["do"] {
	case "connect":
		socket := os.Getenv("SIDEBUS_SOCKET")
		if str(step, "socket") == "degraded" {
			socket = os.Getenv("SIDEBUS_DEGRADED_SOCKET")
		}
		name := str(step, "client")
		ctx, cancel := callCtx()
		defer cancel()
		c, err := sidebus.Dial(ctx, sidebus.Options{
			Socket: socket, Name: str(step, "name"),
			Logger: log.New(os.Stderr, fmt.Sprintf("sidebus[%s/%s]: ", sc.name, name), log.Lmicroseconds),
		})
		if err != nil {
			return err
		}
		sc.clients[name] = c
		sc.order = append(sc.order, name)
	case "publish":
		c, err := sc.client(step)
		if err != nil {
			return err
		}
		opts, err := publishOptions(step["opts"])
		if err != nil {
			return err
		}
		ctx, cancel := callCtx()
		defer cancel()
		res, err := c.Publish(ctx, str(step, "type"), fromJSON(step["data"]), opts)
		sc.record(step, publishRecord(res, err))
	case "publish_many":
		return sc.publishMany(step)
	case "subscribe":
		return sc.subscribe(step)
	case "wait":
		sc.wait(step)
	case "count":
		st := sc.subs[str(step, "sub")]
		if st == nil {
			return fmt.Errorf("no subscription %q", str(step, "sub"))
		}
		st.mu.Lock()
		n := len(st.deliveries)
		st.mu.Unlock()
		sc.record(step, map[string]any{"deliveries": n})
	case "sleep":
		time.Sleep(time.Duration(num(step, "ms")) * time.Millisecond)
	case "unsubscribe":
		st := sc.subs[str(step, "sub")]
		if st == nil {
			return fmt.Errorf("no subscription %q", str(step, "sub"))
		}
		ctx, cancel := callCtx()
		defer cancel()
		return st.sub.Unsubscribe(ctx)
	case "call":
		c, err := sc.client(step)
		if err != nil {
			return err
		}
		args, _ := step["args"].(map[string]any)
		v, err := call(c, str(step, "op"), args)
		if err != nil {
			v = errorRecord(err)
		}
		sc.record(step, v)
	case "close":
		c, err := sc.client(step)
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		return c.Close(ctx)
	case "restart_daemon":
		emit(map[string]any{"control": "restart_daemon"})
		for line := range lines {
			var msg map[string]any
			if decodeJSON([]byte(line), &msg) == nil && msg["control"] == "done" {
				return nil
			}
			log.Printf("ignoring %s while the daemon restarts", line)
		}
		return errors.New("stdin ended during a daemon restart")
	default:
		return fmt.Errorf("unknown step %v", step["do"])
	}
	return nil
}

func (sc *scenario) record(step map[string]any, v any) {
	if name := str(step, "record"); name != "" {
		sc.records[name] = v
	}
}

func publishOptions(v any) (sidebus.PublishOptions, error) {
	m, _ := v.(map[string]any)
	o := sidebus.PublishOptions{
		EventID: str(m, "event_id"), Durability: sidebus.Durability(str(m, "durability")),
		Delay:        time.Duration(num(m, "delay_ms")) * time.Millisecond,
		PartitionKey: str(m, "partitionkey"), TraceParent: str(m, "traceparent"),
		CorrelationID: str(m, "correlationid"), Version: num(m, "version"), Source: str(m, "source"),
	}
	if s := str(m, "deliver_at"); s != "" {
		t, err := time.Parse(time.RFC3339Nano, s)
		if err != nil {
			return o, err
		}
		o.DeliverAt = t
	}
	return o, nil
}

func publishRecord(res *sidebus.PublishResult, err error) any {
	if err != nil {
		return errorRecord(err)
	}
	return map[string]any{"event_id": res.EventID, "status": res.Status, "duplicate": res.Duplicate}
}

// errorCode is the wire code of a daemon error, or a name for the client's own errors.
func errorCode(err error) string {
	var e *sidebus.Error
	switch {
	case errors.As(err, &e):
		return string(e.Code)
	case errors.Is(err, sidebus.ErrConnectionLost):
		return "connection_lost"
	case errors.Is(err, sidebus.ErrTimeout), errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, sidebus.ErrClosed):
		return "closed"
	}
	return "client_error"
}

func errorRecord(err error) any {
	rec := map[string]any{"code": errorCode(err), "message": err.Error(), "details": []any{}}
	var e *sidebus.Error
	if errors.As(err, &e) {
		rec["message"] = e.Message
		details := make([]any, 0, len(e.Details))
		for _, d := range e.Details {
			details = append(details, toJSON(d))
		}
		rec["details"] = details
	}
	return map[string]any{"error": rec}
}

func (sc *scenario) publishMany(step map[string]any) error {
	c, err := sc.client(step)
	if err != nil {
		return err
	}
	count := int(num(step, "count"))
	pad := int(num(step, "pad_bytes"))
	opts := sidebus.PublishOptions{Durability: sidebus.Durability(str(step, "durability"))}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	ids := []any{}
	statuses := map[string]int{}
	errs := map[string]int{}
	pending := make([]*sidebus.PendingPublish, 0, count)
	for i := 0; i < count; i++ {
		data := map[string]any{"n": i}
		if pad > 0 {
			data["pad"] = string(bytes.Repeat([]byte("x"), pad))
		}
		p, err := c.PublishAsync(ctx, str(step, "type"), data, opts)
		if err != nil {
			errs[errorCode(err)]++
			continue
		}
		pending = append(pending, p)
	}
	for _, p := range pending {
		res, err := p.Wait(ctx)
		if err != nil {
			errs[errorCode(err)]++
			continue
		}
		ids = append(ids, res.EventID)
		statuses[string(res.Status)]++
	}
	sc.record(step, map[string]any{"ids": ids, "statuses": statuses, "errors": errs})
	return nil
}

func (sc *scenario) subscribe(step map[string]any) error {
	c, err := sc.client(step)
	if err != nil {
		return err
	}
	o, _ := step["opts"].(map[string]any)
	opts := sidebus.SubscribeOptions{
		MaxInFlight: num(o, "max_in_flight"), MaxAttempts: num(o, "max_attempts"),
		AckTimeout: time.Duration(num(o, "ack_timeout_ms")) * time.Millisecond,
	}
	h, _ := step["handler"].(map[string]any)
	sleep := time.Duration(num(h, "sleep_ms")) * time.Millisecond
	extendEvery := time.Duration(num(h, "extend_every_ms")) * time.Millisecond
	failAttempts := num(h, "fail_attempts")
	errText := "handler failed"
	if s, ok := h["error"].(string); ok {
		errText = s
	}
	dead, _ := h["dead"].(bool)
	_, hasNackDelay := h["nack_delay_ms"]
	nackDelay := time.Duration(num(h, "nack_delay_ms")) * time.Millisecond

	st := &subState{ids: map[string]bool{}}
	handler := func(ctx context.Context, d *sidebus.Delivery) error {
		st.mu.Lock()
		st.deliveries = append(st.deliveries, map[string]any{"attempt": d.Attempt, "event": eventJSON(d.Event)})
		st.ids[d.Event.ID] = true
		st.running++
		if st.running > st.maxConcurrent {
			st.maxConcurrent = st.running
		}
		st.mu.Unlock()
		defer func() {
			st.mu.Lock()
			st.running--
			st.mu.Unlock()
		}()
		if sleep > 0 {
			if err := sleepExtending(ctx, d, sleep, extendEvery); err != nil {
				return err
			}
		}
		if d.Attempt <= failAttempts {
			switch {
			case dead:
				return d.Nack(ctx, sidebus.NackOptions{Error: errText, Dead: true})
			case hasNackDelay:
				return d.Nack(ctx, sidebus.NackOptions{Error: errText, Delay: nackDelay})
			default:
				return errors.New(errText)
			}
		}
		return nil
	}
	ctx, cancel := callCtx()
	defer cancel()
	s, err := c.Subscribe(ctx, str(step, "type"), str(step, "group"), opts, handler)
	if err != nil {
		return err
	}
	st.sub = s
	sc.subs[str(step, "sub")] = st
	return nil
}

// sleepExtending waits d, extending the delivery every `every` (when set).
func sleepExtending(ctx context.Context, d *sidebus.Delivery, total, every time.Duration) error {
	end := time.NewTimer(total)
	defer end.Stop()
	var tick <-chan time.Time
	if every > 0 {
		t := time.NewTicker(every)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case <-end.C:
			return nil
		case <-tick:
			if err := d.Extend(ctx); err != nil {
				log.Printf("extend: %v", err)
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (sc *scenario) wait(step map[string]any) {
	var names []string
	switch s := step["sub"].(type) {
	case string:
		names = []string{s}
	case []any:
		for _, x := range s {
			if n, ok := x.(string); ok {
				names = append(names, n)
			}
		}
	}
	_, distinct := step["distinct"]
	want := int(num(step, "deliveries"))
	if distinct {
		want = int(num(step, "distinct"))
	}
	deadline := time.Now().Add(time.Duration(num(step, "timeout_ms")) * time.Millisecond)
	for {
		n := 0
		ids := map[string]bool{}
		for _, name := range names {
			st := sc.subs[name]
			if st == nil {
				continue
			}
			st.mu.Lock()
			n += len(st.deliveries)
			for id := range st.ids {
				ids[id] = true
			}
			st.mu.Unlock()
		}
		if distinct {
			n = len(ids)
		}
		if n >= want || time.Now().After(deadline) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// call runs an admin op through the client's method for it; the result uses the protocol's
// field names.
func call(c *sidebus.Client, op string, a map[string]any) (any, error) {
	ctx, cancel := callCtx()
	defer cancel()
	strs := func(k string) []string {
		var out []string
		list, _ := a[k].([]any)
		for _, x := range list {
			if s, ok := x.(string); ok {
				out = append(out, s)
			}
		}
		return out
	}
	parseTime := func(k string) (time.Time, error) {
		if str(a, k) == "" {
			return time.Time{}, nil
		}
		return time.Parse(time.RFC3339Nano, str(a, k))
	}
	switch op {
	case "stats":
		return c.Stats(ctx)
	case "register_schema":
		q := sidebus.RegisterSchemaRequest{Type: str(a, "type"), Schema: fromJSON(a["schema"]),
			Compatibility: sidebus.Compatibility(str(a, "compatibility"))}
		if s, ok := a["strict"].(bool); ok {
			q.Strict = &s
		}
		q.DryRun, _ = a["dry_run"].(bool)
		return c.RegisterSchema(ctx, q)
	case "get_schema":
		return c.GetSchema(ctx, str(a, "type"), num(a, "version"))
	case "list_schemas":
		types, err := c.ListSchemas(ctx)
		return map[string]any{"types": types}, err
	case "replay":
		since, err := parseTime("since")
		if err != nil {
			return nil, err
		}
		until, err := parseTime("until")
		if err != nil {
			return nil, err
		}
		return c.Replay(ctx, sidebus.ReplayRequest{Type: str(a, "type"), Group: str(a, "group"), Since: since, Until: until})
	case "replay_cancel":
		return map[string]any{}, c.ReplayCancel(ctx, str(a, "replay"))
	case "replays":
		all, _ := a["all"].(bool)
		rs, err := c.Replays(ctx, all)
		return map[string]any{"replays": rs}, err
	case "dlq_list":
		page, err := c.DLQList(ctx, sidebus.DLQListRequest{Type: str(a, "type"), Group: str(a, "group"),
			Limit: num(a, "limit"), After: num(a, "after"), IDs: strs("ids")})
		if err != nil {
			return nil, err
		}
		entries := []any{}
		for _, e := range page.Entries {
			entries = append(entries, map[string]any{"id": e.ID, "event": eventJSON(e.Event), "error": e.Error,
				"attempts": e.Attempts, "failed_at": e.FailedAt, "history": e.History})
		}
		rec := map[string]any{"entries": entries}
		if page.Next != 0 {
			rec["next"] = page.Next
		}
		return rec, nil
	case "dlq_redrive", "dlq_purge":
		q := sidebus.DLQRequest{Type: str(a, "type"), Group: str(a, "group"), IDs: strs("ids"), Rate: num(a, "rate")}
		var n uint64
		var err error
		if op == "dlq_redrive" {
			n, err = c.DLQRedrive(ctx, q)
		} else {
			n, err = c.DLQPurge(ctx, q)
		}
		return map[string]any{"count": n}, err
	}
	return nil, fmt.Errorf("unknown admin op %q", op)
}

// fromJSON turns a scenario's JSON value into what the client publishes: {"$bin"} as []byte,
// {"$int"} and integer literals as integers, other numbers as float64.
func fromJSON(v any) any {
	switch x := v.(type) {
	case map[string]any:
		if len(x) == 1 {
			if s, ok := x["$bin"].(string); ok {
				b, err := base64.StdEncoding.DecodeString(s)
				if err == nil {
					return b
				}
			}
			if s, ok := x["$int"].(string); ok {
				return integer(s)
			}
		}
		out := make(map[string]any, len(x))
		for k, e := range x {
			out[k] = fromJSON(e)
		}
		return out
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = fromJSON(e)
		}
		return out
	case json.Number:
		if i := integer(x.String()); i != nil {
			return i
		}
		f, _ := x.Float64()
		return f
	}
	return v
}

func integer(s string) any {
	if i, err := strconv.ParseInt(s, 10, 64); err == nil {
		return i
	}
	if u, err := strconv.ParseUint(s, 10, 64); err == nil {
		return u
	}
	return nil
}

// eventJSON is an event as the suite observes it: every attribute, data as JSON.
func eventJSON(e sidebus.Event) map[string]any {
	m := map[string]any{}
	set := func(k, v string) {
		if v != "" {
			m[k] = v
		}
	}
	set("specversion", e.SpecVersion)
	set("id", e.ID)
	set("type", e.Type)
	set("source", e.Source)
	if !e.Time.IsZero() {
		m["time"] = sidebus.FormatTime(e.Time)
	}
	if e.SchemaVersion != 0 {
		m["schemaversion"] = e.SchemaVersion
	}
	set("correlationid", e.CorrelationID)
	set("partitionkey", e.PartitionKey)
	set("traceparent", e.TraceParent)
	if !e.DeliverAt.IsZero() {
		m["deliverat"] = sidebus.FormatTime(e.DeliverAt)
	}
	if e.Replayed {
		m["replayed"] = true
	}
	for k, v := range e.Extensions {
		m[k] = toJSON(v)
	}
	m["data"] = dataJSON(e.Data)
	return m
}

func dataJSON(raw sidebus.RawMessage) any {
	if len(raw) == 0 {
		return nil
	}
	dec := msgpack.NewDecoder(bytes.NewReader(raw))
	dec.SetMapDecoder(func(d *msgpack.Decoder) (any, error) { return d.DecodeUntypedMap() })
	v, err := dec.DecodeInterface()
	if err != nil {
		return map[string]any{"$undecodable": err.Error()}
	}
	return toJSON(v)
}

const maxExact = 1<<53 - 1

// toJSON writes MessagePack values in the suite's JSON forms: bin as {"$bin"}, integers
// beyond ±(2^53 − 1) as {"$int"}.
func toJSON(v any) any {
	switch x := v.(type) {
	case map[any]any:
		out := make(map[string]any, len(x))
		for k, e := range x {
			out[fmt.Sprint(k)] = toJSON(e)
		}
		return out
	case map[string]any:
		out := make(map[string]any, len(x))
		for k, e := range x {
			out[k] = toJSON(e)
		}
		return out
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = toJSON(e)
		}
		return out
	case []byte:
		return map[string]any{"$bin": base64.StdEncoding.EncodeToString(x)}
	case int8, int16, int32, int64, int, uint8, uint16, uint32, uint64, uint:
		n, _ := new(big.Int).SetString(fmt.Sprint(x), 10)
		if n.CmpAbs(big.NewInt(maxExact)) > 0 {
			return map[string]any{"$int": n.String()}
		}
		return x
	case float32:
		return float64(x)
	}
	return v
}
