// This file owns the fake daemon of the unit tests: a Unix socket listener whose connections
// the test drives frame by frame (read the client's next request, checked as the daemon
// checks it; write replies and pushes; break the connection).

package sidebus

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

type fakeDaemon struct {
	t     *testing.T
	path  string
	ln    net.Listener
	conns chan *fakeConn
}

func newFakeDaemon(t *testing.T) *fakeDaemon {
	dir, err := os.MkdirTemp("", "sidebus-go-test")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	d := &fakeDaemon{t: t, path: filepath.Join(dir, "d.sock"), conns: make(chan *fakeConn, 16)}
	d.listen()
	t.Cleanup(func() { d.ln.Close() })
	return d
}

func (d *fakeDaemon) listen() {
	ln, err := net.Listen("unix", d.path)
	if err != nil {
		d.t.Fatal(err)
	}
	d.ln = ln
	go func() {
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			fc := &fakeConn{t: d.t, nc: nc, reqs: make(chan *checkedRequest, 256), eof: make(chan struct{})}
			go fc.readLoop()
			d.conns <- fc
		}
	}()
}

// stop closes the listener and removes the socket: the daemon is gone.
func (d *fakeDaemon) stop() {
	d.ln.Close()
	os.Remove(d.path)
}

// accept waits for the client's next connection.
func (d *fakeDaemon) accept() *fakeConn {
	d.t.Helper()
	select {
	case fc := <-d.conns:
		d.t.Cleanup(func() { fc.nc.Close() })
		return fc
	case <-time.After(5 * time.Second):
		d.t.Fatal("the client did not connect")
		return nil
	}
}

// acceptHello accepts a connection and answers its hello; it returns the connection and the
// client's name.
func (d *fakeDaemon) acceptHello(maxFrame uint64) (*fakeConn, string) {
	d.t.Helper()
	fc := d.accept()
	r := fc.expect("hello")
	if r.uint("protocol") != ProtocolVersion {
		d.t.Fatalf("hello with protocol %d", r.uint("protocol"))
	}
	fc.reply(r, kv{"protocol", 1}, kv{"server", "sidebus/test"}, kv{"node", "fake"}, kv{"max_frame_bytes", maxFrame})
	return fc, r.str("client")
}

// dial connects a client to the fake daemon and answers its hello.
func (d *fakeDaemon) dial(opts Options) (*Client, *fakeConn) {
	d.t.Helper()
	opts.Socket = d.path
	if opts.Logger == nil {
		opts.Logger = log.New(newTestWriter(d.t), "client: ", 0)
	}
	type result struct {
		c   *Client
		err error
	}
	done := make(chan result, 1)
	go func() {
		c, err := Dial(context.Background(), opts)
		done <- result{c, err}
	}()
	fc, _ := d.acceptHello(1 << 20)
	res := <-done
	if res.err != nil {
		d.t.Fatal(res.err)
	}
	// A test that failed half way leaves its client open: close it, briefly.
	d.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = res.c.Close(ctx)
	})
	return res.c, fc
}

// testWriter sends the client's log to the test's log while the test runs (a goroutine of
// the client may still log after it ended, which the testing package does not allow).
type testWriter struct {
	t    *testing.T
	mu   sync.Mutex
	over bool
}

func newTestWriter(t *testing.T) *testWriter {
	w := &testWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		w.over = true
		w.mu.Unlock()
	})
	return w
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.over {
		w.t.Log(string(bytes.TrimRight(p, "\n")))
	}
	return len(p), nil
}

type fakeConn struct {
	t    *testing.T
	nc   net.Conn
	wmu  sync.Mutex
	reqs chan *checkedRequest
	eof  chan struct{}
}

func (fc *fakeConn) readLoop() {
	defer close(fc.eof)
	var head [4]byte
	for {
		if _, err := io.ReadFull(fc.nc, head[:]); err != nil {
			return
		}
		body := make([]byte, binary.BigEndian.Uint32(head[:]))
		if _, err := io.ReadFull(fc.nc, body); err != nil {
			return
		}
		r, err := checkRequest(body)
		if err != nil {
			fc.t.Errorf("the client sent a request the daemon refuses (%v): %x", err, body)
			return
		}
		fc.reqs <- r
	}
}

// next returns the client's next request.
func (fc *fakeConn) next() *checkedRequest {
	fc.t.Helper()
	select {
	case r := <-fc.reqs:
		return r
	case <-time.After(5 * time.Second):
		fc.t.Fatal("no request from the client")
		return nil
	}
}

// expect returns the next request and checks its op.
func (fc *fakeConn) expect(op string) *checkedRequest {
	fc.t.Helper()
	r := fc.next()
	if r.op != op {
		fc.t.Fatalf("the client sent %s %v, expected %s", r.op, r.fields, op)
	}
	return r
}

// quiet checks that the client sends nothing for a while.
func (fc *fakeConn) quiet(d time.Duration) {
	fc.t.Helper()
	select {
	case r := <-fc.reqs:
		fc.t.Fatalf("unexpected %s %v", r.op, r.fields)
	case <-time.After(d):
	}
}

func (fc *fakeConn) write(m omap) {
	fc.t.Helper()
	b, err := encodeValue(m)
	if err != nil {
		fc.t.Fatal(err)
	}
	frame := make([]byte, 4, 4+len(b))
	binary.BigEndian.PutUint32(frame, uint32(len(b)))
	fc.wmu.Lock()
	defer fc.wmu.Unlock()
	if _, err := fc.nc.Write(append(frame, b...)); err != nil && !errors.Is(err, net.ErrClosed) {
		fc.t.Logf("fake daemon write: %v", err)
	}
}

// reply answers r with ok and the given fields.
func (fc *fakeConn) reply(r *checkedRequest, fields ...kv) {
	fc.t.Helper()
	if !r.hasID {
		fc.t.Fatalf("replying to %s without id", r.op)
	}
	fc.write(append(omap{{"op", "ok"}, {"id", r.id}}, fields...))
}

// fail answers r with an error.
func (fc *fakeConn) fail(r *checkedRequest, code, message string, details ...omap) {
	fc.t.Helper()
	ds := []any{}
	for _, d := range details {
		ds = append(ds, d)
	}
	fc.write(omap{{"op", "error"}, {"id", r.id}, {"code", code}, {"message", message}, {"details", ds}})
}

// deliver pushes a delivery.
func (fc *fakeConn) deliver(sub, tag, attempt uint64, id string, data any) {
	fc.t.Helper()
	fc.write(omap{{"op", "deliver"}, {"sub", sub}, {"tag", tag}, {"attempt", attempt}, {"event", omap{
		{"specversion", "1.0"}, {"id", id}, {"type", "order.created"}, {"source", "orders"},
		{"time", "2026-11-27T09:30:00.123456Z"}, {"correlationid", id}, {"data", data},
	}}})
}

// breakConn closes the connection as a dying daemon does.
func (fc *fakeConn) breakConn() { fc.nc.Close() }

// waitEOF waits until the client has closed the connection.
func (fc *fakeConn) waitEOF() {
	fc.t.Helper()
	select {
	case <-fc.eof:
	case <-time.After(5 * time.Second):
		fc.t.Fatal("the client did not close the connection")
	}
}
