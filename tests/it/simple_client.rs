//! A plain single-threaded client, written as most thin clients in other languages are: one
//! blocking socket, no second thread; it reads a batch of deliveries, then writes one `ack`
//! frame per delivery (one write each), then reads again. With `max_in_flight: 1024` and
//! 500-byte events the daemon has far more to write than a socket buffer holds while the client
//! writes its acks: the daemon must go on reading them, or both wait for each other forever.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use sidebus_client::{Durability, Publish};
use sidebus_protocol::request::{Request, Subscribe};
use sidebus_protocol::{Event, RequestFrame, RequestId, ServerFrame};

use crate::harness::TestEnv;

const EVENTS: usize = 50_000;

fn write_frame(s: &mut UnixStream, body: &[u8]) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body);
    s.write_all(&frame)
}

/// One frame, or `None` when nothing arrived within the socket's read timeout.
fn read_frame(s: &mut UnixStream) -> std::io::Result<Option<ServerFrame>> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    // The rest of a frame that has begun comes without waiting for a timeout to matter.
    s.set_read_timeout(None)?;
    s.read_exact(&mut body)?;
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(Some(ServerFrame::parse(body.into()).expect("a frame the protocol crate reads")))
}

/// The client: subscribes, then reads batches and acks them until it has seen `EVENTS`
/// distinct events. Returns them, or says why it stopped.
fn consume(socket: std::path::PathBuf, deadline: Instant) -> Result<usize, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(100))).map_err(|e| e.to_string())?;
    let subscribe = Request::Subscribe(Subscribe {
        event_type: "bulk.item".into(),
        group: "simple".into(),
        max_in_flight: Some(1024),
        max_attempts: None,
        ack_timeout_ms: Some(120_000),
    });
    write_frame(&mut s, &RequestFrame { id: Some(RequestId::Num(1)), request: subscribe }.encode()).map_err(|e| e.to_string())?;
    let mut seen = std::collections::HashSet::new();
    let mut subscribed = false;
    while seen.len() < EVENTS {
        if Instant::now() > deadline {
            return Err(format!("stalled: {} of {EVENTS} events after the deadline", seen.len()));
        }
        // A batch: whatever arrives until a read waits 100 ms, at most 1024 deliveries.
        let mut tags = Vec::new();
        while tags.len() < 1024 {
            match read_frame(&mut s).map_err(|e| format!("the daemon closed the connection: {e}"))? {
                None => break,
                Some(ServerFrame::Deliver(d)) => {
                    let event = Event::decode(d.event).map_err(|e| e.to_string())?;
                    seen.insert(event.id);
                    tags.push(d.tag);
                }
                Some(ServerFrame::Ok { .. }) => subscribed = true,
                Some(ServerFrame::Error(e)) => return Err(format!("error from the daemon: {} {}", e.code, e.message)),
                Some(ServerFrame::Other { .. }) => {}
            }
        }
        // One ack frame per delivery, one write each, without reading in between.
        for tag in tags {
            write_frame(&mut s, &RequestFrame { id: None, request: Request::Ack { tag } }.encode())
                .map_err(|e| format!("writing an ack failed: {e}"))?;
        }
    }
    if !subscribed {
        return Err("no reply to the subscribe".into());
    }
    Ok(seen.len())
}

#[tokio::test]
async fn a_single_threaded_client_that_acks_in_batches_never_stalls() {
    let env = TestEnv::new();
    let daemon = env.daemon().start().await;
    let socket = daemon.socket.clone();
    let deadline = Instant::now() + Duration::from_secs(240);
    let consumer = tokio::task::spawn_blocking(move || consume(socket, deadline));
    // The group exists once the consumer's subscribe is answered; wait for it in the log.
    let streams = env.streams().await;
    crate::harness::eventually("the consumer's group", Duration::from_secs(30), || async {
        redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(streams.stream_key("bulk.item"))
            .query_async::<redis::Value>(&mut env.redis().await)
            .await
            .ok()
            .filter(|v| matches!(v, redis::Value::Array(g) if !g.is_empty()))
    })
    .await;
    let c = daemon.client().await;
    let pad = "x".repeat(440);
    let mut pending = Vec::with_capacity(1000);
    for i in 0..EVENTS {
        let mut p = Publish::new("bulk.item", sidebus_client::encode(&(i, &pad)).unwrap());
        p.durability = Durability::Local;
        pending.push(c.publish_start(p).await.expect("publish"));
        if pending.len() == 1000 {
            for p in pending.drain(..) {
                p.wait().await.expect("publish acknowledged");
            }
        }
    }
    for p in pending {
        p.wait().await.expect("publish acknowledged");
    }
    let got = consumer.await.expect("the consumer ran");
    assert_eq!(got, Ok(EVENTS), "the single-threaded client received every event without a stall or a disconnect");
    assert!(!daemon.log().contains("client stopped reading"), "the daemon never gave up on the client");
}
