// This file owns the client's unit tests against the fake daemon: pipelined publishes and
// their fields, typed errors, handlers (ack, nack, explicit nack, extend, panics, concurrency),
// pushes to ignore, the reconnection (in-flight failures, resubscription, waiting requests,
// its timeout) and the graceful close.

package sidebus

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func bg() context.Context { return context.Background() }

func closeClient(t *testing.T, c *Client, fc *fakeConn) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- c.Close(bg()) }()
	if fc != nil {
		fc.waitEOF()
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestDialSaysHelloWithTheName(t *testing.T) {
	d := newFakeDaemon(t)
	done := make(chan *Client, 1)
	go func() {
		c, err := Dial(bg(), Options{Socket: d.path, Name: "orders"})
		if err != nil {
			t.Error(err)
		}
		done <- c
	}()
	fc, name := d.acceptHello(4096)
	c := <-done
	if name != "orders" {
		t.Fatalf("hello named %q", name)
	}
	if s := c.Server(); s.Node != "fake" || s.MaxFrameBytes != 4096 || s.Server != "sidebus/test" {
		t.Fatalf("server info %+v", s)
	}
	closeClient(t, c, fc)
}

func TestDialFailsWithoutDaemon(t *testing.T) {
	_, err := Dial(bg(), Options{Socket: "/nonexistent/sidebus.sock"})
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/sidebus.sock") {
		t.Fatalf("err %v", err)
	}
}

func TestDefaultSocket(t *testing.T) {
	t.Setenv("SIDEBUS_SOCKET", "/tmp/from-env.sock")
	o := Options{}
	o.setDefaults()
	if o.Socket != "/tmp/from-env.sock" {
		t.Fatalf("socket %q", o.Socket)
	}
	t.Setenv("SIDEBUS_SOCKET", "")
	o = Options{}
	o.setDefaults()
	if o.Socket != DefaultSocket {
		t.Fatalf("socket %q", o.Socket)
	}
}

func TestPublishPipelinedInOrderWithEveryField(t *testing.T) {
	d := newFakeDaemon(t)
	c, fc := d.dial(Options{Name: "orders"})
	at := time.Date(2026, 11, 27, 10, 0, 0, 0, time.UTC)
	opts := PublishOptions{
		EventID: "evt-1", Durability: DurabilityCommitted, DeliverAt: at, PartitionKey: "customer-17",
		TraceParent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", CorrelationID: "checkout-77",
		Version: 2, Source: "billing",
	}
	var pending []*PendingPublish
	for i := 0; i < 5; i++ {
		o := opts
		o.EventID = fmt.Sprintf("evt-%d", i)
		if i == 4 {
			o = PublishOptions{Delay: 1500 * time.Millisecond}
		}
		p, err := c.PublishAsync(bg(), "order.created", map[string]any{"n": i, "big": uint64(1) << 60}, o)
		if err != nil {
			t.Fatal(err)
		}
		pending = append(pending, p)
	}
	var reqs []*checkedRequest
	for i := 0; i < 5; i++ {
		reqs = append(reqs, fc.expect("publish"))
	}
	for i, r := range reqs[:4] {
		if r.str("event_id") != fmt.Sprintf("evt-%d", i) {
			t.Fatalf("publish %d sent as %v: out of order", i, r.fields)
		}
		for k, want := range map[string]string{"type": "order.created", "durability": "committed",
			"deliver_at": "2026-11-27T10:00:00Z", "partitionkey": "customer-17", "correlationid": "checkout-77",
			"traceparent": opts.TraceParent, "source": "billing"} {
			if r.str(k) != want {
				t.Fatalf("%s = %q, want %q", k, r.str(k), want)
			}
		}
		if r.uint("version") != 2 || r.has("delay_ms") {
			t.Fatalf("fields %v", r.fields)
		}
		data, _ := r.fields.get("data")
		if err := sameValue(data, omap{{"n", int64(i)}, {"big", uint64(1) << 60}}); err != nil {
			t.Fatal(err)
		}
		if i > 0 && r.id <= reqs[i-1].id {
			t.Fatalf("ids not increasing: %d after %d", r.id, reqs[i-1].id)
		}
	}
	if r := reqs[4]; r.uint("delay_ms") != 1500 || r.has("durability") || r.has("event_id") || r.has("deliver_at") {
		t.Fatalf("delayed publish %v", r.fields)
	}
	// Replies come back in any order and find their publish by id.
	for i := 4; i >= 0; i-- {
		fields := []kv{{"event_id", fmt.Sprintf("evt-%d", i)}, {"status", "committed"}}
		if i == 2 {
			fields = append(fields, kv{"duplicate", true})
		}
		fc.reply(reqs[i], fields...)
	}
	for i, p := range pending {
		res, err := p.Wait(bg())
		if err != nil {
			t.Fatal(err)
		}
		if res.EventID != fmt.Sprintf("evt-%d", i) || res.Status != StatusCommitted || res.Duplicate != (i == 2) {
			t.Fatalf("publish %d answered %+v", i, res)
		}
	}
	closeClient(t, c, fc)
}

func TestErrorRepliesAreTyped(t *testing.T) {
	d := newFakeDaemon(t)
	c, fc := d.dial(Options{})
	errs := make(chan error, 3)
	for i := 0; i < 3; i++ {
		go func() {
			_, err := c.Publish(bg(), "order.created", map[string]any{}, PublishOptions{})
			errs <- err
		}()
	}
	fc.fail(fc.expect("publish"), "validation_failed", "data does not match", omap{{"path", "/amount"}, {"message", "not a number"}})
	fc.fail(fc.expect("publish"), "backpressure", "the spool is full")
	fc.fail(fc.expect("publish"), "teapot", "short and stout")
	got := map[Code]*Error{}
	for i := 0; i < 3; i++ {
		err := <-errs
		var e *Error
		if !errors.As(err, &e) {
			t.Fatalf("%v is not an *Error", err)
		}
		got[e.Code] = e
		switch e.Code {
		case CodeValidationFailed:
			if !errors.Is(err, ErrValidationFailed) || errors.Is(err, ErrBackpressure) {
				t.Fatal("errors.Is does not follow the code")
			}
			if len(e.Details) != 1 || e.Details[0]["path"] != "/amount" || e.Details[0]["message"] != "not a number" {
				t.Fatalf("details %v", e.Details)
			}
		case CodeBackpressure:
			if !errors.Is(err, ErrBackpressure) || e.Message != "the spool is full" {
				t.Fatalf("%v", e)
			}
		case CodeInternal:
			// An unknown code is internal; the original code is kept in the message.
			if !errors.Is(err, ErrInternal) || !strings.Contains(e.Message, "teapot") {
				t.Fatalf("%v", e)
			}
		}
	}
	if len(got) != 3 {
		t.Fatalf("codes %v", got)
	}
	closeClient(t, c, fc)
}

func TestFrameTooLargeIsRefusedBeforeSending(t *testing.T) {
	d := newFakeDaemon(t)
	done := make(chan *Client, 1)
	go func() {
		c, err := Dial(bg(), Options{Socket: d.path})
		if err != nil {
			t.Error(err)
		}
		done <- c
	}()
	fc, _ := d.acceptHello(1024)
	c := <-done
	_, err := c.Publish(bg(), "order.created", strings.Repeat("x", 2000), PublishOptions{})
	if !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("err %v", err)
	}
	// The connection is intact.
	go func() { fc.reply(fc.expect("ping")) }()
	if err := c.Ping(bg()); err != nil {
		t.Fatal(err)
	}
	closeClient(t, c, fc)
}

// subscribe subscribes through the fake daemon, which answers with sub.
func subscribe(t *testing.T, c *Client, fc *fakeConn, opts SubscribeOptions, sub uint64, h Handler) (*Subscription, *checkedRequest) {
	t.Helper()
	done := make(chan *Subscription, 1)
	go func() {
		s, err := c.Subscribe(bg(), "order.created", "inventory", opts, h)
		if err != nil {
			t.Error(err)
		}
		done <- s
	}()
	r := fc.expect("subscribe")
	fc.reply(r, kv{"sub", sub})
	return <-done, r
}

func TestHandlerOutcomes(t *testing.T) {
	d := newFakeDaemon(t)
	c, fc := d.dial(Options{})
	_, r := subscribe(t, c, fc, SubscribeOptions{MaxInFlight: 8, MaxAttempts: 3, AckTimeout: 2 * time.Second}, 1,
		func(ctx context.Context, d *Delivery) error {
			var data map[string]any
			if err := d.DecodeData(&data); err != nil {
				return err
			}
			switch data["do"] {
			case "fail":
				return errors.New("malformed email")
			case "dead":
				if err := d.Nack(ctx, NackOptions{Error: "poison", Delay: 2 * time.Second, Dead: true}); err != nil {
					t.Error(err)
				}
				return errors.New("ignored: the handler already nacked")
			case "extend":
				if err := d.Extend(ctx); err != nil {
					t.Error(err)
				}
			case "panic":
				panic("boom")
			}
			return nil
		})
	if r.str("type") != "order.created" || r.str("group") != "inventory" || r.uint("max_in_flight") != 8 ||
		r.uint("max_attempts") != 3 || r.uint("ack_timeout_ms") != 2000 {
		t.Fatalf("subscribe %v", r.fields)
	}
	ended := func(op string, tag uint64) *checkedRequest {
		t.Helper()
		r := fc.expect(op)
		if r.uint("tag") != tag || !r.hasID {
			t.Fatalf("%s %v (id %v), want tag %d with an id", op, r.fields, r.hasID, tag)
		}
		fc.reply(r)
		return r
	}
	fc.deliver(1, 10, 1, "e-ok", omap{{"do", "ack"}})
	ended("ack", 10)
	fc.deliver(1, 11, 1, "e-fail", omap{{"do", "fail"}})
	if r := ended("nack", 11); r.str("error") != "malformed email" || r.has("dead") || r.has("delay_ms") {
		t.Fatalf("nack %v", r.fields)
	}
	fc.deliver(1, 12, 2, "e-dead", omap{{"do", "dead"}})
	if r := ended("nack", 12); r.str("error") != "poison" || r.uint("delay_ms") != 2000 {
		t.Fatalf("nack %v", r.fields)
	} else if dead, _ := r.fields.get("dead"); dead != true {
		t.Fatalf("nack %v", r.fields)
	}
	fc.deliver(1, 13, 1, "e-extend", omap{{"do", "extend"}})
	ended("extend", 13)
	ended("ack", 13)
	fc.deliver(1, 14, 1, "e-panic", omap{{"do", "panic"}})
	if r := ended("nack", 14); !strings.Contains(r.str("error"), "boom") {
		t.Fatalf("nack %v", r.fields)
	}
	// Error pushes, unknown pushes and deliveries to an unknown subscription are ignored.
	fc.write(omap{{"op", "error"}, {"code", "unknown_tag"}, {"message", "tag 99"}, {"details", []any{}}})
	fc.write(omap{{"op", "shiny_new_push"}, {"x", 1}})
	fc.deliver(7, 15, 1, "e-nobody", omap{{"do", "ack"}})
	fc.quiet(100 * time.Millisecond)
	go func() { fc.reply(fc.expect("ping")) }()
	if err := c.Ping(bg()); err != nil {
		t.Fatal(err)
	}
	go func() { fc.reply(fc.expect("unsubscribe")) }()
	closeClient(t, c, fc)
}

func TestHandlersRunConcurrently(t *testing.T) {
	d := newFakeDaemon(t)
	c, fc := d.dial(Options{})
	var running, most atomic.Int32
	release := make(chan struct{})
	subscribe(t, c, fc, SubscribeOptions{MaxInFlight: 4}, 3, func(ctx context.Context, d *Delivery) error {
		n := running.Add(1)
		for {
			m := most.Load()
			if n <= m || most.CompareAndSwap(m, n) {
				break
			}
		}
		<-release
		running.Add(-1)
		return nil
	})
	for tag := uint64(1); tag <= 4; tag++ {
		fc.deliver(3, tag, 1, fmt.Sprintf("e-%d", tag), nil)
	}
	deadline := time.Now().Add(5 * time.Second)
	for running.Load() < 4 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if running.Load() != 4 {
		t.Fatalf("%d handlers ran at once, want 4", running.Load())
	}
	close(release)
	tags := map[uint64]bool{}
	for i := 0; i < 4; i++ {
		r := fc.expect("ack")
		tags[r.uint("tag")] = true
		fc.reply(r)
	}
	if len(tags) != 4 || most.Load() != 4 {
		t.Fatalf("acked %v, at most %d at once", tags, most.Load())
	}
	go func() { fc.reply(fc.expect("unsubscribe")) }()
	closeClient(t, c, fc)
}

func TestReconnectFailsInFlightAndResubscribes(t *testing.T) {
	d := newFakeDaemon(t)
	c, fc := d.dial(Options{Name: "inventory", MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond})
	handled := make(chan string, 16)
	block := make(chan struct{})
	handlerCtxDone := make(chan struct{})
	opts := SubscribeOptions{MaxInFlight: 8, MaxAttempts: 4, AckTimeout: 5 * time.Second}
	s, _ := subscribe(t, c, fc, opts, 1, func(ctx context.Context, d *Delivery) error {
		handled <- d.Event.ID
		if d.Event.ID == "e-running" {
			<-ctx.Done()
			close(handlerCtxDone)
			<-block
		}
		return nil
	})
	// A delivery whose handler runs at the break, and a publish in flight.
	fc.deliver(1, 1, 1, "e-running", nil)
	if id := <-handled; id != "e-running" {
		t.Fatal(id)
	}
	pub := make(chan error, 1)
	go func() {
		_, err := c.Publish(bg(), "order.created", 1, PublishOptions{})
		pub <- err
	}()
	fc.expect("publish")
	fc.breakConn()
	if err := <-pub; !errors.Is(err, ErrConnectionLost) {
		t.Fatalf("the publish in flight gave %v, want ErrConnectionLost", err)
	}
	// The handler of the delivery of the old connection sees its context cancelled.
	select {
	case <-handlerCtxDone:
	case <-time.After(5 * time.Second):
		t.Fatal("the handler's context was not cancelled at the break")
	}
	// The client reconnects, says hello again and resubscribes with the same options.
	fc2, name := d.acceptHello(1 << 20)
	if name != "inventory" {
		t.Fatalf("hello again as %q", name)
	}
	r := fc2.expect("subscribe")
	if r.str("type") != "order.created" || r.str("group") != "inventory" || r.uint("max_in_flight") != 8 ||
		r.uint("max_attempts") != 4 || r.uint("ack_timeout_ms") != 5000 {
		t.Fatalf("resubscribed with %v", r.fields)
	}
	fc2.reply(r, kv{"sub", 9})
	// The handler that ran at the break finishes: its ack is dropped, not sent on the new
	// connection (its tag belonged to the old one).
	close(block)
	fc2.quiet(100 * time.Millisecond)
	// The same subscription receives on the new connection.
	fc2.deliver(9, 1, 1, "e-after", nil)
	if id := <-handled; id != "e-after" {
		t.Fatal(id)
	}
	if a := fc2.expect("ack"); a.uint("tag") != 1 {
		t.Fatalf("ack %v", a.fields)
	} else {
		fc2.reply(a)
	}
	select {
	case <-s.Done():
		t.Fatalf("the subscription ended: %v", s.Err())
	default:
	}
	go func() { fc2.reply(fc2.expect("unsubscribe")) }()
	closeClient(t, c, fc2)
}

func TestRequestWhileDisconnectedWaitsForTheReconnection(t *testing.T) {
	d := newFakeDaemon(t)
	c, fc := d.dial(Options{MinBackoff: 10 * time.Millisecond})
	d.stop()
	fc.breakConn()
	// Wait until the client noticed the break.
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		c.mu.Lock()
		disconnected := c.cur == nil
		c.mu.Unlock()
		if disconnected {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	pub := make(chan error, 1)
	go func() {
		res, err := c.Publish(bg(), "order.created", 1, PublishOptions{EventID: "e-1"})
		if err == nil && res.EventID != "e-1" {
			err = fmt.Errorf("answered %+v", res)
		}
		pub <- err
	}()
	time.Sleep(200 * time.Millisecond)
	select {
	case err := <-pub:
		t.Fatalf("the publish did not wait for the reconnection: %v", err)
	default:
	}
	d.listen()
	fc2, _ := d.acceptHello(1 << 20)
	r := fc2.expect("publish")
	fc2.reply(r, kv{"event_id", "e-1"}, kv{"status", "spooled"})
	if err := <-pub; err != nil {
		t.Fatal(err)
	}
	closeClient(t, c, fc2)
}

func TestRequestWhileDisconnectedTimesOut(t *testing.T) {
	d := newFakeDaemon(t)
	c, fc := d.dial(Options{ReconnectTimeout: 300 * time.Millisecond, MinBackoff: 10 * time.Millisecond})
	d.stop()
	fc.breakConn()
	start := time.Now()
	var err error
	for err == nil || errors.Is(err, ErrConnectionLost) {
		// A ping may still catch the old connection before the client noticed the break.
		err = c.Ping(bg())
	}
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("err %v, want ErrTimeout", err)
	}
	if took := time.Since(start); took < 250*time.Millisecond || took > 3*time.Second {
		t.Fatalf("timed out after %v", took)
	}
	// A context ending first wins.
	ctx, cancel := context.WithTimeout(bg(), 50*time.Millisecond)
	defer cancel()
	if err := c.Ping(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err %v", err)
	}
	if err := c.Close(bg()); err != nil {
		t.Fatal(err)
	}
	if err := c.Ping(bg()); !errors.Is(err, ErrClosed) {
		t.Fatalf("after Close: %v", err)
	}
}

func TestCloseIsGraceful(t *testing.T) {
	d := newFakeDaemon(t)
	c, fc := d.dial(Options{})
	started := make(chan struct{})
	var calls atomic.Int32
	subscribe(t, c, fc, SubscribeOptions{}, 5, func(ctx context.Context, d *Delivery) error {
		calls.Add(1)
		close(started)
		time.Sleep(300 * time.Millisecond)
		return nil
	})
	fc.deliver(5, 1, 1, "e-1", nil)
	<-started
	pub, err := c.PublishAsync(bg(), "order.created", 1, PublishOptions{})
	if err != nil {
		t.Fatal(err)
	}
	preq := fc.expect("publish")
	closed := make(chan error, 1)
	go func() { closed <- c.Close(bg()) }()
	time.Sleep(50 * time.Millisecond)
	// A delivery pushed while closing is not handled (the unsubscribe hands it back).
	fc.deliver(5, 2, 1, "e-2", nil)
	// The running handler finishes and is acked, then the subscription ends.
	a := fc.expect("ack")
	if a.uint("tag") != 1 {
		t.Fatalf("ack %v", a.fields)
	}
	fc.reply(a)
	u := fc.expect("unsubscribe")
	if u.uint("sub") != 5 {
		t.Fatalf("unsubscribe %v", u.fields)
	}
	fc.reply(u)
	// The publish in flight still gets its answer before the connection closes.
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) with a publish in flight", err)
	case <-time.After(50 * time.Millisecond):
	}
	fc.reply(preq, kv{"event_id", "p-1"}, kv{"status", "spooled"})
	if res, err := pub.Wait(bg()); err != nil || res.EventID != "p-1" {
		t.Fatalf("%+v %v", res, err)
	}
	fc.waitEOF()
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	if calls.Load() != 1 {
		t.Fatalf("%d handler calls, want 1", calls.Load())
	}
	if _, err := c.Publish(bg(), "order.created", 1, PublishOptions{}); !errors.Is(err, ErrClosed) {
		t.Fatalf("publish after close: %v", err)
	}
	if _, err := c.Subscribe(bg(), "t", "g", SubscribeOptions{}, func(context.Context, *Delivery) error { return nil }); !errors.Is(err, ErrClosed) {
		t.Fatalf("subscribe after close: %v", err)
	}
}

func TestCloseGivesUpWhenItsContextEnds(t *testing.T) {
	d := newFakeDaemon(t)
	c, fc := d.dial(Options{})
	cancelled := make(chan struct{})
	started := make(chan struct{})
	subscribe(t, c, fc, SubscribeOptions{}, 1, func(ctx context.Context, d *Delivery) error {
		close(started)
		<-ctx.Done()
		close(cancelled)
		return ctx.Err()
	})
	fc.deliver(1, 1, 1, "e-1", nil)
	<-started
	ctx, cancel := context.WithTimeout(bg(), 100*time.Millisecond)
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		// The client still tells the daemon to unsubscribe, briefly.
		if u := fc.expect("unsubscribe"); u.uint("sub") != 1 {
			t.Errorf("unsubscribe %v", u.fields)
		}
	}()
	if err := c.Close(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Close: %v", err)
	}
	select {
	case <-cancelled:
	case <-time.After(5 * time.Second):
		t.Fatal("the handler's context was not cancelled")
	}
	wg.Wait()
	fc.waitEOF()
}

func TestUnsubscribeWaitsForHandlers(t *testing.T) {
	d := newFakeDaemon(t)
	c, fc := d.dial(Options{})
	release := make(chan struct{})
	started := make(chan struct{})
	s, _ := subscribe(t, c, fc, SubscribeOptions{}, 2, func(ctx context.Context, d *Delivery) error {
		close(started)
		<-release
		return errors.New("failed late")
	})
	fc.deliver(2, 1, 1, "e-1", nil)
	<-started
	done := make(chan error, 1)
	go func() { done <- s.Unsubscribe(bg()) }()
	fc.quiet(100 * time.Millisecond)
	close(release)
	n := fc.expect("nack")
	if n.str("error") != "failed late" {
		t.Fatalf("nack %v", n.fields)
	}
	fc.reply(n)
	fc.reply(fc.expect("unsubscribe"))
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	<-s.Done()
	if s.Err() != nil {
		t.Fatal(s.Err())
	}
	closeClient(t, c, fc)
}

func TestResubscribeRefusedEndsTheSubscription(t *testing.T) {
	d := newFakeDaemon(t)
	c, fc := d.dial(Options{MinBackoff: 10 * time.Millisecond})
	s, _ := subscribe(t, c, fc, SubscribeOptions{MaxInFlight: 10}, 1, func(context.Context, *Delivery) error { return nil })
	fc.breakConn()
	fc2, _ := d.acceptHello(1 << 20)
	// Backends still connecting: the client tries again.
	fc2.fail(fc2.expect("subscribe"), "unavailable", "backends not ready")
	// A refusal for good ends the subscription with that error.
	fc2.fail(fc2.expect("subscribe"), "bad_request", "max_in_flight over the connection's limit",
		omap{{"field", "max_in_flight"}, {"message", "too many"}})
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the subscription did not end")
	}
	if !errors.Is(s.Err(), ErrBadRequest) {
		t.Fatalf("Err %v", s.Err())
	}
	closeClient(t, c, fc2)
}

func TestAdminCallsAndGenericRequest(t *testing.T) {
	d := newFakeDaemon(t)
	c, fc := d.dial(Options{})
	go func() {
		r := fc.expect("dlq_redrive")
		if r.str("type") != "user.signup" || r.str("group") != "mail" || r.uint("rate") != 10 {
			t.Errorf("dlq_redrive %v", r.fields)
		}
		if ids, _ := r.fields.get("ids"); sameValue(ids, []any{"a", "b"}) != nil {
			t.Errorf("ids %v", ids)
		}
		fc.reply(r, kv{"count", 2})
		r = fc.expect("replays")
		if all, _ := r.fields.get("all"); all != true {
			t.Errorf("replays %v", r.fields)
		}
		fc.reply(r, kv{"replays", []any{omap{{"replay", "r-1"}, {"type", "t"}, {"group", "g"}, {"status", "done"},
			{"reason", "request"}, {"added", 3}, {"total", 3}, {"created_at", "2026-11-27T09:30:00.000Z"}}}})
		r = fc.expect("replay_cancel")
		fc.fail(r, "not_found", "no such replay")
		r = fc.expect("get_schema")
		if r.str("type") != "order.created" || r.uint("version") != 3 {
			t.Errorf("get_schema %v", r.fields)
		}
		fc.reply(r, kv{"type", "order.created"}, kv{"version", 3}, kv{"schema", true})
	}()
	n, err := c.DLQRedrive(bg(), DLQRequest{Type: "user.signup", Group: "mail", IDs: []string{"a", "b"}, Rate: 10})
	if err != nil || n != 2 {
		t.Fatalf("%d %v", n, err)
	}
	rs, err := c.Replays(bg(), true)
	if err != nil || len(rs) != 1 || rs[0].Replay != "r-1" || rs[0].Added != 3 || rs[0].CreatedAt == "" {
		t.Fatalf("%+v %v", rs, err)
	}
	if err := c.ReplayCancel(bg(), "r-9"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("%v", err)
	}
	out, err := c.Request(bg(), "get_schema", map[string]any{"type": "order.created", "version": 3})
	if err != nil {
		t.Fatal(err)
	}
	if err := sameValue(toOrdered(t, out), omap{{"type", "order.created"}, {"version", 3}, {"schema", true}}); err != nil {
		t.Fatalf("generic reply %v: %v", out, err)
	}
	closeClient(t, c, fc)
}

func TestSubscribeGivenUpIsUnsubscribedWhenItsReplyComes(t *testing.T) {
	d := newFakeDaemon(t)
	c, fc := d.dial(Options{})
	ctx, cancel := context.WithTimeout(bg(), 100*time.Millisecond)
	defer cancel()
	_, err := c.Subscribe(ctx, "order.created", "inventory", SubscribeOptions{}, func(context.Context, *Delivery) error {
		t.Error("the handler of a subscription given up ran")
		return nil
	})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Subscribe: %v", err)
	}
	// The daemon answers late: the client ends that subscription rather than leave the
	// daemon pushing deliveries nobody handles.
	fc.reply(fc.expect("subscribe"), kv{"sub", 4})
	fc.deliver(4, 1, 1, "e-1", nil)
	u := fc.expect("unsubscribe")
	if u.uint("sub") != 4 {
		t.Fatalf("unsubscribe %v", u.fields)
	}
	fc.reply(u)
	fc.quiet(100 * time.Millisecond)
	closeClient(t, c, fc)
}
