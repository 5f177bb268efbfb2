// This file owns one connection to the daemon: a writer goroutine that sends queued frames
// (batched, flushed when the queue is empty), a reader goroutine that matches replies to
// requests by id and hands deliveries to their subscription, and the failure of everything in
// flight when the connection breaks.

package sidebus

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// maxInboundFrame bounds a frame from the daemon: its max_frame_bytes can be configured up to
// 64 MiB.
const maxInboundFrame = 64 << 20

// call is a request waiting for its reply.
type call struct {
	id    uint64
	done  chan struct{}
	frame *frame
	err   error
	// onOK runs in the reader goroutine when an ok reply arrives, before any later frame is
	// read: a subscription is routed before its first delivery can come.
	onOK func(*conn, *frame)
}

type conn struct {
	client *Client
	nc     net.Conn
	// writeq holds the frames waiting to be written; its capacity bounds them.
	writeq chan *bytes.Buffer
	// dead is closed when the connection is broken or closed; ctx is cancelled then too (it
	// is the context of the handlers of this connection's deliveries).
	dead   chan struct{}
	ctx    context.Context
	cancel context.CancelFunc

	mu      sync.Mutex
	pending map[uint64]*call
	broken  bool
	cause   error

	// subs routes deliveries; only the reader goroutine touches it.
	subs map[uint64]*Subscription

	maxFrame   atomic.Int64
	readerDone chan struct{}
}

func newConn(c *Client, nc net.Conn) *conn {
	ctx, cancel := context.WithCancel(context.Background())
	cn := &conn{
		client:     c,
		nc:         nc,
		writeq:     make(chan *bytes.Buffer, c.opts.WriteQueue),
		dead:       make(chan struct{}),
		ctx:        ctx,
		cancel:     cancel,
		pending:    map[uint64]*call{},
		subs:       map[uint64]*Subscription{},
		readerDone: make(chan struct{}),
	}
	cn.maxFrame.Store(1 << 20)
	go cn.writeLoop()
	go cn.readLoop()
	return cn
}

func (cn *conn) isDead() bool {
	select {
	case <-cn.dead:
		return true
	default:
		return false
	}
}

// fail breaks the connection once: every request in flight fails with err, the socket is
// closed, and the handlers of its deliveries see their context cancelled.
func (cn *conn) fail(err error) {
	cn.mu.Lock()
	if cn.broken {
		cn.mu.Unlock()
		return
	}
	cn.broken = true
	cn.cause = err
	pending := cn.pending
	cn.pending = nil
	cn.mu.Unlock()
	close(cn.dead)
	cn.cancel()
	_ = cn.nc.Close()
	for _, c := range pending {
		c.err = err
		close(c.done)
	}
}

// failure is the error of requests on a broken connection.
func (cn *conn) failure() error {
	cn.mu.Lock()
	defer cn.mu.Unlock()
	if cn.cause != nil {
		return cn.cause
	}
	return &lostError{}
}

func (cn *conn) inFlight() int {
	cn.mu.Lock()
	defer cn.mu.Unlock()
	return len(cn.pending)
}

// send queues a request. With a call it is registered under a new id before it is queued
// (so its reply always finds it); without one it goes without id and gets no reply.
func (cn *conn) send(ctx context.Context, r *request, c *call) error {
	var id uint64
	if c != nil {
		id = cn.client.nextID.Add(1)
	}
	buf, err := encodeFrame(r, id, c != nil)
	if err != nil {
		return err
	}
	if max := cn.maxFrame.Load(); int64(buf.Len()-4) > max {
		size := buf.Len() - 4
		bufPool.Put(buf)
		// The daemon would close the connection (and so fail every request in flight);
		// refusing here fails only this one.
		return &Error{Code: CodeFrameTooLarge, Message: fmt.Sprintf("the %s request is %d bytes, over the daemon's max_frame_bytes %d", r.op, size, max)}
	}
	if c != nil {
		cn.mu.Lock()
		if cn.broken {
			cn.mu.Unlock()
			bufPool.Put(buf)
			return errConnDead
		}
		c.id = id
		cn.pending[id] = c
		cn.mu.Unlock()
	}
	select {
	case cn.writeq <- buf:
		return nil
	case <-cn.dead:
		bufPool.Put(buf)
		if c != nil {
			// fail() has already failed the call (it was pending); its error is the one to
			// report.
			<-c.done
			return c.err
		}
		return cn.failure()
	case <-ctx.Done():
		bufPool.Put(buf)
		if c != nil {
			cn.forget(id)
		}
		return ctx.Err()
	}
}

// errConnDead says a connection was found broken before anything was sent on it; the caller
// may wait for the next connection.
var errConnDead = errors.New("sidebus: connection broken before the request was sent")

func (cn *conn) forget(id uint64) {
	cn.mu.Lock()
	if cn.pending != nil {
		delete(cn.pending, id)
	}
	cn.mu.Unlock()
}

// roundTrip sends a request and waits for its reply; an error reply is returned as *Error.
func (cn *conn) roundTrip(ctx context.Context, r *request, onOK func(*conn, *frame)) (*frame, error) {
	c := &call{done: make(chan struct{}), onOK: onOK}
	if err := cn.send(ctx, r, c); err != nil {
		return nil, err
	}
	return c.wait(ctx, cn)
}

func (c *call) wait(ctx context.Context, cn *conn) (*frame, error) {
	select {
	case <-c.done:
	case <-ctx.Done():
		// The daemon may still carry the request out. Its reply will find nothing, unless
		// the call has a hook, which must see it (a late subscribe reply is unsubscribed).
		if c.onOK == nil {
			cn.forget(c.id)
		}
		select {
		case <-c.done:
		default:
			return nil, ctx.Err()
		}
	}
	if c.err != nil {
		return nil, c.err
	}
	if err := c.frame.replyError(); err != nil {
		return nil, err
	}
	return c.frame, nil
}

func (cn *conn) writeLoop() {
	w := bufio.NewWriterSize(cn.nc, 64<<10)
	for {
		var buf *bytes.Buffer
		select {
		case buf = <-cn.writeq:
		case <-cn.dead:
			return
		}
		// Write what is queued now and flush once: one system call for a burst of
		// pipelined requests.
		for buf != nil {
			_, err := w.Write(buf.Bytes())
			bufPool.Put(buf)
			if err != nil {
				cn.fail(&lostError{cause: err})
				return
			}
			select {
			case buf = <-cn.writeq:
			default:
				buf = nil
			}
		}
		if err := w.Flush(); err != nil {
			cn.fail(&lostError{cause: err})
			return
		}
	}
}

func (cn *conn) readLoop() {
	defer close(cn.readerDone)
	r := bufio.NewReaderSize(cn.nc, 64<<10)
	var head [4]byte
	var body []byte
	for {
		if _, err := io.ReadFull(r, head[:]); err != nil {
			if err == io.EOF {
				err = errors.New("the daemon closed the connection")
			}
			cn.fail(&lostError{cause: err})
			return
		}
		n := binary.BigEndian.Uint32(head[:])
		if n > maxInboundFrame {
			cn.fail(&lostError{cause: fmt.Errorf("the daemon sent a frame of %d bytes", n)})
			return
		}
		if cap(body) < int(n) {
			body = make([]byte, n)
		}
		body = body[:n]
		if _, err := io.ReadFull(r, body); err != nil {
			cn.fail(&lostError{cause: err})
			return
		}
		f, err := parseFrame(body)
		if err != nil {
			// The length was read, so the next frame is still found; a reply that cannot be
			// read leaves its request to its context.
			cn.client.logf("ignoring a frame from the daemon: %v", err)
			continue
		}
		cn.dispatch(f)
	}
}

func (cn *conn) dispatch(f *frame) {
	switch {
	case f.hasID && (f.op == "ok" || f.op == "error"):
		cn.mu.Lock()
		c := cn.pending[f.id]
		delete(cn.pending, f.id)
		cn.mu.Unlock()
		if c == nil {
			return
		}
		c.frame = f
		if f.op == "ok" && c.onOK != nil {
			c.onOK(cn, f)
		}
		close(c.done)
	case f.op == "deliver":
		if f.event == nil {
			cn.client.logf("ignoring a deliver without event (tag %d)", f.tag)
			return
		}
		s := cn.subs[f.sub]
		if s == nil {
			// Unsubscribed meanwhile: the daemon hands the delivery back itself.
			return
		}
		s.dispatch(cn, f)
	case f.op == "error":
		cn.client.logf("error from the daemon: %v", newError(f.code, f.message, f.details))
	default:
		// An unknown push: newer daemons may send pushes this client does not know.
	}
}
