// This file owns subscriptions: Subscribe with a handler, the goroutine per delivery (bounded
// by the daemon's max_in_flight), ack on return and nack on error, explicit Ack/Nack/Extend,
// resubscription after a reconnection, and the graceful end of a subscription.

package sidebus

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
)

// SubscribeOptions are the optional fields of a subscribe; zero values take the daemon's
// defaults.
type SubscribeOptions struct {
	// MaxInFlight is how many deliveries the daemon pushes without their end (1 to 1024,
	// default 64): it bounds how many handlers of the subscription run at once.
	MaxInFlight uint64
	// MaxAttempts is how many failed attempts an event gets before the dead-letter queue
	// (1 to 1000, default 5).
	MaxAttempts uint64
	// AckTimeout is the lease of a delivery (100 ms to 24 h, default 30 s): end or Extend it
	// within this time, or it counts as a failed attempt.
	AckTimeout time.Duration
}

func subscribeRequest(typ, group string, o SubscribeOptions) *request {
	return newRequest("subscribe").str("type", typ).str("group", group).
		optUint("max_in_flight", o.MaxInFlight).optUint("max_attempts", o.MaxAttempts).
		optUint("ack_timeout_ms", uint64(o.AckTimeout/time.Millisecond))
}

// Handler handles one delivery. Returning nil acks it; returning an error nacks it with the
// error's text (the daemon retries it after its backoff, then dead-letters it). A handler
// that ended the delivery itself (Ack or Nack) has its return value ignored. ctx is cancelled
// when the delivery can no longer be ended: its connection broke (the daemon delivers the
// event again) or Close ran out of time. A panic is recovered and nacks the delivery.
type Handler func(ctx context.Context, d *Delivery) error

// Subscription is a live subscription. It survives reconnections: the client subscribes again
// with the same options on every new connection.
type Subscription struct {
	c       *Client
	typ     string
	group   string
	opts    SubscribeOptions
	handler Handler

	mu      sync.Mutex
	closing bool
	cn      *conn  // the connection it is subscribed on
	sub     uint64 // its number there
	running sync.WaitGroup
	// work hands a delivery to an idle handler goroutine: goroutines are reused (their grown
	// stacks with them) rather than started per delivery.
	work chan *Delivery

	stop       chan struct{}
	stopOnce   sync.Once
	keeperDone chan struct{}
	done       chan struct{}
	endOnce    sync.Once
	err        error
}

// Subscribe receives the events of typ as a consumer of group and runs handler on each
// delivery, in a goroutine of its own (the daemon's MaxInFlight bounds how many run at once).
// It returns once the daemon has confirmed the subscription.
func (c *Client) Subscribe(ctx context.Context, typ, group string, opts SubscribeOptions, handler Handler) (*Subscription, error) {
	if handler == nil {
		return nil, errors.New("sidebus: Subscribe needs a handler")
	}
	c.mu.Lock()
	starting := c.closeStarted
	c.mu.Unlock()
	if starting {
		return nil, ErrClosed
	}
	s := &Subscription{
		c: c, typ: typ, group: group, opts: opts, handler: handler,
		stop: make(chan struct{}), keeperDone: make(chan struct{}), done: make(chan struct{}),
		work: make(chan *Delivery),
	}
	cn, err := s.subscribe(ctx)
	if err != nil {
		s.abandon()
		return nil, err
	}
	c.mu.Lock()
	if c.closeStarted {
		c.mu.Unlock()
		close(s.keeperDone)
		_ = s.shutdown(ctx, nil)
		return nil, ErrClosed
	}
	c.subs[s] = struct{}{}
	c.mu.Unlock()
	go s.keep(cn)
	return s, nil
}

// Type is the subscription's event type.
func (s *Subscription) Type() string { return s.typ }

// Group is the subscription's consumer group.
func (s *Subscription) Group() string { return s.group }

// Done is closed when the subscription has ended: unsubscribed, its client closed, or the
// daemon refused to take it again after a reconnection (then Err says why).
func (s *Subscription) Done() <-chan struct{} { return s.done }

// Err is why the subscription ended, nil while it runs or when it was ended on purpose.
func (s *Subscription) Err() error {
	select {
	case <-s.done:
		return s.err
	default:
		return nil
	}
}

// subscribe sends the subscribe op on the live connection; the reply routes the
// subscription's deliveries before any of them is read. A reply that comes after the
// subscription was given up (its context ended first) is unsubscribed at once, so the daemon
// keeps no deliveries for it.
func (s *Subscription) subscribe(ctx context.Context) (*conn, error) {
	r := subscribeRequest(s.typ, s.group, s.opts)
	_, err := s.c.do(ctx, r, func(cn *conn, f *frame) {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.closing {
			go unsubscribeNow(cn, f.sub)
			return
		}
		cn.subs[f.sub] = s
		s.cn, s.sub = cn, f.sub
	})
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cn, nil
}

// unsubscribeNow ends a subscription nobody routes, without waiting for handlers.
func unsubscribeNow(cn *conn, sub uint64) {
	ctx, cancel := context.WithTimeout(cn.ctx, 10*time.Second)
	defer cancel()
	_, _ = cn.roundTrip(ctx, unsubscribeRequest(sub), unroute(sub))
}

// abandon ends a subscription whose first subscribe failed; if the daemon took it all the
// same (the caller's context ended just as the reply came), it is unsubscribed.
func (s *Subscription) abandon() {
	s.mu.Lock()
	s.closing = true
	cn, sub := s.cn, s.sub
	s.mu.Unlock()
	close(s.keeperDone)
	s.end(nil)
	if cn != nil && !cn.isDead() {
		go unsubscribeNow(cn, sub)
	}
}

func unsubscribeRequest(sub uint64) *request { return newRequest("unsubscribe").uint("sub", sub) }

// unroute forgets a subscription's number on its connection once the daemon confirmed the
// unsubscribe (deliveries until then are dropped: the daemon hands them back).
func unroute(sub uint64) func(*conn, *frame) {
	return func(cn *conn, _ *frame) { delete(cn.subs, sub) }
}

// keep subscribes again on every new connection until the subscription ends.
func (s *Subscription) keep(cn *conn) {
	defer close(s.keeperDone)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-s.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	for {
		select {
		case <-cn.dead:
		case <-s.stop:
			return
		}
		backoff := s.c.opts.MinBackoff
		for {
			next, err := s.subscribe(ctx)
			if err == nil {
				cn = next
				break
			}
			switch {
			case ctx.Err() != nil, errors.Is(err, ErrClosed):
				return
			case errors.Is(err, ErrConnectionLost), errors.Is(err, ErrTimeout):
				// The new connection broke too, or none came yet: wait for the next one.
				continue
			case errors.Is(err, ErrUnavailable):
				// The daemon's backends are still connecting after its restart.
				s.c.logf("subscribing again to %s as %s: %v; retrying", s.typ, s.group, err)
				t := time.NewTimer(backoff)
				select {
				case <-t.C:
				case <-s.stop:
					t.Stop()
					return
				}
				if backoff *= 2; backoff > s.c.opts.MaxBackoff {
					backoff = s.c.opts.MaxBackoff
				}
			default:
				s.c.logf("the daemon refused the subscription to %s as %s again: %v; it has ended", s.typ, s.group, err)
				s.mu.Lock()
				s.closing = true
				s.mu.Unlock()
				s.c.forget(s)
				s.end(err)
				return
			}
		}
	}
}

func (c *Client) forget(s *Subscription) {
	c.mu.Lock()
	delete(c.subs, s)
	c.mu.Unlock()
}

func (s *Subscription) end(err error) {
	s.endOnce.Do(func() {
		s.err = err
		close(s.done)
	})
}

// Unsubscribe ends the subscription gracefully: no new delivery is taken, the running handlers
// finish (and their deliveries are acked or nacked), then the daemon is told to unsubscribe
// (deliveries it pushed meanwhile go back to the group without counting an attempt). If ctx
// ends first it unsubscribes without waiting for the handlers and returns ctx.Err().
func (s *Subscription) Unsubscribe(ctx context.Context) error {
	return s.shutdown(ctx, nil)
}

func (s *Subscription) shutdown(ctx context.Context, reason error) error {
	s.mu.Lock()
	s.closing = true
	s.mu.Unlock()
	s.stopOnce.Do(func() { close(s.stop) })
	defer s.c.forget(s)
	defer s.end(reason)

	waitErr := waitChan(ctx, s.keeperDone)
	if waitErr == nil {
		handlers := make(chan struct{})
		go func() {
			s.running.Wait()
			close(handlers)
		}()
		waitErr = waitChan(ctx, handlers)
	}
	s.mu.Lock()
	cn, sub := s.cn, s.sub
	s.cn = nil
	s.mu.Unlock()
	if cn == nil || cn.isDead() {
		// The daemon dropped the subscription with its connection.
		return waitErr
	}
	uctx := ctx
	if waitErr != nil {
		// Still tell the daemon, briefly, so the deliveries go back at once.
		var cancel context.CancelFunc
		uctx, cancel = context.WithTimeout(context.Background(), time.Second)
		defer cancel()
	}
	_, err := cn.roundTrip(uctx, unsubscribeRequest(sub), unroute(sub))
	if waitErr != nil {
		return waitErr
	}
	if errors.Is(err, ErrConnectionLost) || errors.Is(err, errConnDead) || errors.Is(err, ErrClosed) {
		return nil
	}
	return err
}

func waitChan(ctx context.Context, ch <-chan struct{}) error {
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// dispatch starts the handler of a delivery (in the reader goroutine of cn).
func (s *Subscription) dispatch(cn *conn, f *frame) {
	s.mu.Lock()
	if s.closing || s.cn != cn {
		s.mu.Unlock()
		return
	}
	s.running.Add(1)
	s.mu.Unlock()
	d := &Delivery{Tag: f.tag, Attempt: f.attempt, Event: *f.event, sub: s, cn: cn}
	select {
	case s.work <- d:
	default:
		go s.worker(d)
	}
}

// workerIdle is how long a handler goroutine waits for another delivery before it exits.
const workerIdle = time.Second

// worker runs d's handler, then the handlers of the deliveries handed to it while it waits;
// there are never more workers than deliveries in flight (the daemon's max_in_flight).
func (s *Subscription) worker(d *Delivery) {
	var idle *time.Timer
	for {
		s.run(d)
		if idle == nil {
			idle = time.NewTimer(workerIdle)
		} else {
			idle.Reset(workerIdle)
		}
		select {
		case d = <-s.work:
			if !idle.Stop() {
				<-idle.C
			}
		case <-idle.C:
			return
		case <-s.stop:
			// The subscription ends: no delivery will be handed over any more.
			idle.Stop()
			return
		}
	}
}

func (s *Subscription) run(d *Delivery) {
	defer s.running.Done()
	err := s.call(d)
	if d.settled.Load() {
		return
	}
	if err == nil {
		err = d.Ack(d.cn.ctx)
	} else {
		err = d.Nack(d.cn.ctx, NackOptions{Error: err.Error()})
	}
	switch {
	case err == nil:
	case errors.Is(err, ErrConnectionLost), errors.Is(err, ErrClosed), errors.Is(err, context.Canceled):
		// The delivery belonged to a connection that is gone; the daemon has released it
		// and delivers it again.
	default:
		s.c.logf("ending the delivery of event %s (%s as %s): %v; the daemon delivers it again after its ack timeout",
			d.Event.ID, s.typ, s.group, err)
	}
}

func (s *Subscription) call(d *Delivery) (err error) {
	defer func() {
		if p := recover(); p != nil {
			s.c.logf("the handler of %s as %s panicked: %v\n%s", s.typ, s.group, p, debug.Stack())
			err = fmt.Errorf("handler panicked: %v", p)
		}
	}()
	return s.handler(d.cn.ctx, d)
}

// Delivery is one delivery of an event to a subscription.
type Delivery struct {
	// Tag names the delivery on its connection.
	Tag uint64
	// Attempt is 1 on the first delivery of the event to this group, n+1 after n failures.
	Attempt uint64
	// Event is the event delivered.
	Event Event

	sub     *Subscription
	cn      *conn
	settled atomic.Bool
}

// Subscription is the subscription the delivery came to.
func (d *Delivery) Subscription() *Subscription { return d.sub }

// DecodeData decodes the event's data into v.
func (d *Delivery) DecodeData(v any) error { return d.Event.DecodeData(v) }

// NackOptions say how a delivery failed.
type NackOptions struct {
	// Error is kept with the event (cut to 4096 bytes by the daemon).
	Error string
	// Delay retries after this long instead of the daemon's backoff (at most 24 h).
	Delay time.Duration
	// Dead sends the event straight to the dead-letter queue.
	Dead bool
}

// Ack ends the delivery as a success and waits for the daemon to confirm it.
func (d *Delivery) Ack(ctx context.Context) error {
	if !d.settled.CompareAndSwap(false, true) {
		return ErrAlreadySettled
	}
	return d.send(ctx, ackRequest(d.Tag))
}

func ackRequest(tag uint64) *request    { return newRequest("ack").uint("tag", tag) }
func extendRequest(tag uint64) *request { return newRequest("extend").uint("tag", tag) }

func nackRequest(tag uint64, o NackOptions) *request {
	r := newRequest("nack").uint("tag", tag).optStr("error", o.Error)
	if o.Delay > 0 {
		ms := uint64(o.Delay / time.Millisecond)
		if ms == 0 {
			ms = 1
		}
		r.uint("delay_ms", ms)
	}
	return r.flag("dead", o.Dead)
}

// Nack ends the delivery as a failure and waits for the daemon to confirm it.
func (d *Delivery) Nack(ctx context.Context, o NackOptions) error {
	if !d.settled.CompareAndSwap(false, true) {
		return ErrAlreadySettled
	}
	return d.send(ctx, nackRequest(d.Tag, o))
}

// Extend restarts the delivery's lease (AckTimeout): the handler is still working on it.
func (d *Delivery) Extend(ctx context.Context) error {
	return d.send(ctx, extendRequest(d.Tag))
}

// send goes on the delivery's own connection: its tag means nothing on another one.
func (d *Delivery) send(ctx context.Context, r *request) error {
	_, err := d.cn.roundTrip(ctx, r, nil)
	if errors.Is(err, errConnDead) {
		return &lostError{cause: errors.New("the delivery's connection is gone")}
	}
	return err
}
