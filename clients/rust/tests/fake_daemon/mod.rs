//! The fake daemon of the client's tests: a Unix socket listener whose connections a test drives
//! frame by frame (read the client's next request, parsed as the daemon parses it; write
//! replies and pushes; break the connection; stop listening and listen again).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use sidebus_protocol::reply::{Body, HelloOk, encode_ok};
use sidebus_protocol::{Deliver, Detail, ErrorCode, ErrorReply, MapWriter, Request, RequestFrame};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// How long a test waits for something the client should do.
pub const WAIT: Duration = Duration::from_secs(5);

pub struct FakeDaemon {
    pub path: PathBuf,
    dir: PathBuf,
    listener: Option<UnixListener>,
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl FakeDaemon {
    pub fn new() -> FakeDaemon {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!("sidebus-client-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&dir).unwrap();
        let mut d = FakeDaemon { path: dir.join("d.sock"), dir, listener: None };
        d.listen();
        d
    }

    pub fn listen(&mut self) {
        self.listener = Some(UnixListener::bind(&self.path).unwrap());
    }

    /// The daemon is gone: nothing listens on the socket any more.
    pub fn stop(&mut self) {
        self.listener = None;
        let _ = std::fs::remove_file(&self.path);
    }

    /// The client's next connection.
    pub async fn accept(&self) -> FakeConn {
        let l = self.listener.as_ref().expect("listening");
        let (stream, _) = tokio::time::timeout(WAIT, l.accept()).await.expect("the client did not connect").unwrap();
        FakeConn { framed: Framed::new(stream, LengthDelimitedCodec::new()) }
    }

    /// Accepts a connection and answers its `hello` (with `max_frame_bytes`); returns the
    /// connection and the name the client gave.
    pub async fn accept_hello(&self, max_frame_bytes: u64) -> (FakeConn, Option<String>) {
        let mut c = self.accept().await;
        let r = c.expect("hello").await;
        let Request::Hello { protocol, client } = &r.request else { unreachable!() };
        assert_eq!(*protocol, 1);
        let name = client.clone();
        c.ok(&r, &HelloOk { protocol: 1, server: "sidebus/test".into(), node: "fake".into(), max_frame_bytes }).await;
        (c, name)
    }
}

pub struct FakeConn {
    framed: Framed<UnixStream, LengthDelimitedCodec>,
}

/// An `ok` reply's fields written by hand.
pub struct Raw(pub Vec<(&'static str, rmpv::Value)>);

impl Body for Raw {
    fn write(&self, w: &mut MapWriter) {
        for (k, v) in &self.0 {
            let mut buf = Vec::new();
            rmpv::encode::write_value(&mut buf, v).unwrap();
            w.raw(k, &buf);
        }
    }
    fn read(_: &sidebus_protocol::Fields) -> Result<Self, sidebus_protocol::FieldError> {
        unreachable!()
    }
}

impl FakeConn {
    /// The client's next request, which must be `op`.
    pub async fn expect(&mut self, op: &str) -> RequestFrame {
        let frame = tokio::time::timeout(WAIT, self.framed.next())
            .await
            .unwrap_or_else(|_| panic!("no {op} from the client"))
            .unwrap_or_else(|| panic!("the client hung up, expecting {op}"))
            .unwrap();
        let r = RequestFrame::parse(frame.freeze()).unwrap_or_else(|e| panic!("the client sent an invalid frame: {e:?}"));
        assert_eq!(r.request.op(), op, "{r:?}");
        r
    }

    /// Asserts that the client sends nothing for `window`.
    pub async fn quiet(&mut self, window: Duration) {
        if let Ok(Some(frame)) = tokio::time::timeout(window, self.framed.next()).await {
            panic!("the client sent {:?}", RequestFrame::parse(frame.unwrap().freeze()));
        }
    }

    /// Waits until the client closes the connection (frames it sends first are skipped).
    pub async fn wait_eof(&mut self) {
        tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = self.framed.next().await {} })
            .await
            .expect("the client did not close the connection");
    }

    /// Sends any frame body.
    pub async fn send(&mut self, body: Vec<u8>) {
        self.framed.send(Bytes::from(body)).await.unwrap();
    }

    pub async fn ok(&mut self, r: &RequestFrame, body: &impl Body) {
        self.send(encode_ok(r.id.as_ref(), body)).await;
    }

    pub async fn ok_empty(&mut self, r: &RequestFrame) {
        self.ok(r, &()).await;
    }

    pub async fn published(&mut self, r: &RequestFrame, event_id: &str) {
        self.ok(r, &Raw(vec![("event_id", event_id.into()), ("status", "spooled".into())])).await;
    }

    pub async fn subscribed(&mut self, r: &RequestFrame, sub: u64) {
        self.ok(r, &Raw(vec![("sub", sub.into())])).await;
    }

    pub async fn fail(&mut self, r: &RequestFrame, code: ErrorCode, message: &str, details: Vec<Detail>) {
        self.send(ErrorReply { id: r.id.clone(), code, message: message.into(), details, tag: None, sub: None }.encode()).await;
    }

    /// Pushes a delivery of an event `id` whose data is `n`.
    pub async fn deliver(&mut self, sub: u64, tag: u64, attempt: u64, id: &str, n: u64) {
        let event = sidebus_protocol::Event {
            id: id.into(),
            event_type: "order.created".into(),
            source: "test".into(),
            time: "2026-11-27T09:30:00.123456Z".into(),
            schemaversion: None,
            correlationid: id.into(),
            partitionkey: None,
            traceparent: None,
            deliverat: None,
            replayed: false,
            data: sidebus_client::encode(&n).unwrap(),
        };
        self.send(Deliver { sub, tag, attempt, event: Bytes::from(event.encode()) }.encode()).await;
    }
}
