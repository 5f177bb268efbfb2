// This file owns the Client: Dial and its options, the connection it currently uses, the
// reconnection with backoff after a break, requests that wait for the next connection, and the
// graceful Close.

package sidebus

import (
	"context"
	"errors"
	"fmt"
	"log"
	"math/rand"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultSocket is the daemon's socket when neither Options.Socket nor $SIDEBUS_SOCKET says
// otherwise.
const DefaultSocket = "/run/sidebus/sidebus.sock"

// Options configure a Client. The zero value of every field takes its default.
type Options struct {
	// Socket is the daemon's Unix socket; default $SIDEBUS_SOCKET, else DefaultSocket.
	Socket string
	// Name names the client in `hello`: it is the default `source` of its publishes.
	Name string
	// ReconnectTimeout is how long a request made while disconnected waits for the
	// connection to come back before it fails with ErrTimeout; default 30 s.
	ReconnectTimeout time.Duration
	// MinBackoff and MaxBackoff bound the wait between reconnection attempts, which doubles
	// from MinBackoff up to MaxBackoff (±20 % jitter); defaults 50 ms and 2 s.
	MinBackoff time.Duration
	MaxBackoff time.Duration
	// WriteQueue is how many frames may wait to be written; a request beyond it waits (within
	// its context) for room. Default 1024.
	WriteQueue int
	// Logger receives what the client cannot return to a caller: a lost connection and its
	// reconnection, error pushes, acks the daemon refused. Default: standard error with the
	// prefix "sidebus: "; use log.New(io.Discard, "", 0) to silence it.
	Logger *log.Logger
}

func (o *Options) setDefaults() {
	if o.Socket == "" {
		o.Socket = os.Getenv("SIDEBUS_SOCKET")
	}
	if o.Socket == "" {
		o.Socket = DefaultSocket
	}
	if o.ReconnectTimeout <= 0 {
		o.ReconnectTimeout = 30 * time.Second
	}
	if o.MinBackoff <= 0 {
		o.MinBackoff = 50 * time.Millisecond
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = 2 * time.Second
	}
	if o.MaxBackoff < o.MinBackoff {
		o.MaxBackoff = o.MinBackoff
	}
	if o.WriteQueue <= 0 {
		o.WriteQueue = 1024
	}
	if o.Logger == nil {
		o.Logger = log.New(os.Stderr, "sidebus: ", log.LstdFlags)
	}
}

// ServerInfo is the daemon's answer to `hello`.
type ServerInfo struct {
	Protocol      uint64 `msgpack:"protocol" json:"protocol"`
	Server        string `msgpack:"server" json:"server"`
	Node          string `msgpack:"node" json:"node"`
	MaxFrameBytes uint64 `msgpack:"max_frame_bytes" json:"max_frame_bytes"`
}

// Client is a connection to the daemon that reconnects by itself. It is safe for concurrent
// use: requests from many goroutines are pipelined on the one connection.
type Client struct {
	opts   Options
	nextID atomic.Uint64

	mu     sync.Mutex
	cur    *conn         // nil while disconnected
	ready  chan struct{} // closed while cur is set
	server ServerInfo
	subs   map[*Subscription]struct{}
	// closing is closed when Close starts: no reconnection, no new subscription; requests
	// still use a live connection (a handler finishing may publish). closed is set when
	// Close has let the subscriptions end: from then on every request is ErrClosed.
	closing        chan struct{}
	closeStarted   bool
	closed         bool
	closeDone      chan struct{}
	supervisorDone chan struct{}
}

// Dial connects to the daemon and says `hello`. It fails when the first connection cannot be
// made; after that the client reconnects by itself whenever the connection breaks.
func Dial(ctx context.Context, opts Options) (*Client, error) {
	opts.setDefaults()
	c := &Client{
		opts:           opts,
		ready:          make(chan struct{}),
		subs:           map[*Subscription]struct{}{},
		closing:        make(chan struct{}),
		closeDone:      make(chan struct{}),
		supervisorDone: make(chan struct{}),
	}
	cn, err := c.connect(ctx)
	if err != nil {
		return nil, err
	}
	c.cur = cn
	close(c.ready)
	go c.supervise(cn)
	return c, nil
}

func (c *Client) logf(format string, args ...any) {
	c.opts.Logger.Printf(format, args...)
}

// connect opens a connection and says hello on it.
func (c *Client) connect(ctx context.Context) (*conn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", c.opts.Socket)
	if err != nil {
		return nil, fmt.Errorf("sidebus: connecting to %s: %w", c.opts.Socket, err)
	}
	cn := newConn(c, nc)
	f, err := cn.roundTrip(ctx, helloRequest(c.opts.Name), nil)
	if err == nil {
		var info ServerInfo
		if err = f.decodeReply(&info); err == nil {
			if info.MaxFrameBytes > 0 {
				cn.maxFrame.Store(int64(info.MaxFrameBytes))
			}
			c.mu.Lock()
			c.server = info
			c.mu.Unlock()
			return cn, nil
		}
	}
	cn.fail(&lostError{cause: err})
	<-cn.readerDone
	return nil, err
}

func helloRequest(name string) *request {
	return newRequest("hello").uint("protocol", ProtocolVersion).optStr("client", name)
}

// Server is what the daemon said in its latest `hello` reply.
func (c *Client) Server() ServerInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.server
}

// markLost forgets a broken connection, so requests wait for the next one.
func (c *Client) markLost(cn *conn) {
	c.mu.Lock()
	if c.cur == cn {
		c.cur = nil
		c.ready = make(chan struct{})
	}
	c.mu.Unlock()
}

// conn returns the live connection, waiting for a reconnection (up to ReconnectTimeout)
// while there is none.
func (c *Client) conn(ctx context.Context) (*conn, error) {
	var deadline <-chan time.Time
	for {
		c.mu.Lock()
		closed, cn, ready := c.closed, c.cur, c.ready
		c.mu.Unlock()
		if closed {
			return nil, ErrClosed
		}
		if cn != nil {
			if !cn.isDead() {
				return cn, nil
			}
			c.markLost(cn)
			continue
		}
		select {
		case <-c.closing:
			return nil, ErrClosed
		default:
		}
		if deadline == nil {
			t := time.NewTimer(c.opts.ReconnectTimeout)
			defer t.Stop()
			deadline = t.C
		}
		select {
		case <-ready:
		case <-c.closing:
			return nil, ErrClosed
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-deadline:
			return nil, ErrTimeout
		}
	}
}

// do sends a request on the live connection and waits for its reply. A connection found
// broken before the request was sent is not a failure: the request waits for the next one.
func (c *Client) do(ctx context.Context, r *request, onOK func(*conn, *frame)) (*frame, error) {
	for {
		cn, err := c.conn(ctx)
		if err != nil {
			return nil, err
		}
		f, err := cn.roundTrip(ctx, r, onOK)
		if errors.Is(err, errConnDead) {
			c.markLost(cn)
			continue
		}
		return f, err
	}
}

// supervise reconnects after every break until the client is closed.
func (c *Client) supervise(cn *conn) {
	defer close(c.supervisorDone)
	for {
		select {
		case <-cn.dead:
		case <-c.closing:
			return
		}
		c.markLost(cn)
		c.logf("connection lost (%v); reconnecting", cn.failure())
		next := c.reconnect()
		if next == nil {
			return
		}
		c.mu.Lock()
		if c.closeStarted {
			c.mu.Unlock()
			next.fail(ErrClosed)
			return
		}
		c.cur = next
		close(c.ready)
		c.mu.Unlock()
		c.logf("reconnected to %s", c.opts.Socket)
		cn = next
	}
}

// reconnect dials with exponential backoff until it succeeds (nil once the client closes).
func (c *Client) reconnect() *conn {
	backoff := c.opts.MinBackoff
	for attempt := 1; ; attempt++ {
		jittered := time.Duration(float64(backoff) * (0.8 + 0.4*rand.Float64()))
		t := time.NewTimer(jittered)
		select {
		case <-t.C:
		case <-c.closing:
			t.Stop()
			return nil
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		stop := make(chan struct{})
		go func() {
			select {
			case <-c.closing:
				cancel()
			case <-stop:
			}
		}()
		next, err := c.connect(ctx)
		close(stop)
		cancel()
		if err == nil {
			return next
		}
		if attempt == 1 || attempt%20 == 0 {
			c.logf("reconnecting (attempt %d): %v", attempt, err)
		}
		if backoff *= 2; backoff > c.opts.MaxBackoff {
			backoff = c.opts.MaxBackoff
		}
	}
}

// Close closes the client gracefully: its subscriptions stop taking deliveries, let their
// running handlers finish (their acks are sent) and unsubscribe; requests in flight get their
// replies; then the connection is closed and reconnection stops. If ctx ends first, Close
// cancels the handlers' contexts, closes the connection at once (requests still in flight fail
// with ErrClosed) and returns ctx.Err(). Closing twice waits for the first Close.
func (c *Client) Close(ctx context.Context) error {
	c.mu.Lock()
	if c.closeStarted {
		c.mu.Unlock()
		select {
		case <-c.closeDone:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	c.closeStarted = true
	close(c.closing)
	subs := make([]*Subscription, 0, len(c.subs))
	for s := range c.subs {
		subs = append(subs, s)
	}
	c.mu.Unlock()
	defer close(c.closeDone)

	var wg sync.WaitGroup
	for _, s := range subs {
		wg.Add(1)
		go func(s *Subscription) {
			defer wg.Done()
			if err := s.shutdown(ctx, ErrClosed); err != nil && ctx.Err() == nil {
				c.logf("closing the subscription to %s as %s: %v", s.typ, s.group, err)
			}
		}(s)
	}
	wg.Wait()

	c.mu.Lock()
	c.closed = true
	cn := c.cur
	c.mu.Unlock()
	if cn != nil {
		// Requests in flight (publishes, acks of handlers that just finished) get their
		// replies before the connection closes.
		tick := time.NewTicker(5 * time.Millisecond)
		for cn.inFlight() > 0 && !cn.isDead() && ctx.Err() == nil {
			select {
			case <-tick.C:
			case <-ctx.Done():
			}
		}
		tick.Stop()
		cn.fail(ErrClosed)
		<-cn.readerDone
	}
	<-c.supervisorDone
	return ctx.Err()
}

// Ping is a round trip to the daemon.
func (c *Client) Ping(ctx context.Context) error {
	_, err := c.do(ctx, newRequest("ping"), nil)
	return err
}

// Request sends any op with the given fields and returns the fields of its ok reply (without
// `op` and `id`), decoded generically: for ops this client has no method for yet.
func (c *Client) Request(ctx context.Context, op string, fields map[string]any) (map[string]any, error) {
	r := newRequest(op)
	for k, v := range fields {
		if k == "op" || k == "id" {
			continue
		}
		r.value(k, v)
	}
	f, err := c.do(ctx, r, nil)
	if err != nil {
		return nil, err
	}
	out := map[string]any{}
	if err := f.decodeReply(&out); err != nil {
		return nil, err
	}
	delete(out, "op")
	delete(out, "id")
	return out, nil
}
