//! The Rust runner of the shared conformance suite (clients/conformance/README.md): reads
//! scenarios as JSON lines on stdin, runs their steps through sidebus-client's public API, and
//! writes what it observed as JSON lines on stdout. Logs go to stderr.
//!
//! Built by `cargo build -p sidebus-client --example conformance`, which puts it where
//! clients/conformance/run.py starts it: target/debug/examples/conformance.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value, json};
use sidebus_client::{
    Client, Compatibility, Delivery, Detail, DlqAction, DlqList, Durability, Error, Event, Publish, RegisterSchema, SubscribeOptions,
    SubscriptionHandle,
};
use sidebus_protocol::MapWriter;
use sidebus_protocol::reply::Body;
use tokio::sync::mpsc;

type Res<T> = Result<T, String>;

fn emit(v: Value) {
    println!("{v}");
}

// ---- JSON and MessagePack ----

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = (u32::from(chunk[0]) << 16) | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8) | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn b64_decode(s: &str) -> Res<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = B64.iter().position(|&b| b == c).ok_or_else(|| format!("not base64: {s}"))? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

/// The largest integer every JSON reader holds exactly.
const EXACT: i128 = (1 << 53) - 1;

/// A scenario's JSON as a MessagePack value: `{"$int": "…"}` is an integer, `{"$bin": "…"}` a
/// binary.
fn to_msgpack(v: &Value) -> Res<rmpv::Value> {
    Ok(match v {
        Value::Null => rmpv::Value::Nil,
        Value::Bool(b) => rmpv::Value::Boolean(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => rmpv::Value::from(u),
            (_, Some(i)) => rmpv::Value::from(i),
            _ => rmpv::Value::F64(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => rmpv::Value::from(s.as_str()),
        Value::Array(a) => rmpv::Value::Array(a.iter().map(to_msgpack).collect::<Res<_>>()?),
        Value::Object(m) if m.len() == 1 && m.contains_key("$int") => {
            let s = m["$int"].as_str().ok_or("$int must be a string")?;
            match (s.parse::<u64>(), s.parse::<i64>()) {
                (Ok(u), _) => rmpv::Value::from(u),
                (_, Ok(i)) => rmpv::Value::from(i),
                _ => return Err(format!("$int out of range: {s}")),
            }
        }
        Value::Object(m) if m.len() == 1 && m.contains_key("$bin") => {
            rmpv::Value::Binary(b64_decode(m["$bin"].as_str().ok_or("$bin must be a string")?)?)
        }
        Value::Object(m) => {
            rmpv::Value::Map(m.iter().map(|(k, v)| Ok((rmpv::Value::from(k.as_str()), to_msgpack(v)?))).collect::<Res<_>>()?)
        }
    })
}

fn encode_json(v: &Value) -> Res<Bytes> {
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, &to_msgpack(v)?).map_err(|e| e.to_string())?;
    Ok(Bytes::from(buf))
}

/// A MessagePack value as the suite's JSON.
fn to_json(v: &rmpv::Value) -> Value {
    match v {
        rmpv::Value::Nil => Value::Null,
        rmpv::Value::Boolean(b) => Value::Bool(*b),
        rmpv::Value::Integer(i) => {
            let n: i128 = i.as_i64().map(i128::from).or(i.as_u64().map(i128::from)).unwrap_or(0);
            if (-EXACT..=EXACT).contains(&n) { json!(n as i64) } else { json!({"$int": n.to_string()}) }
        }
        rmpv::Value::F32(f) => json!(f),
        rmpv::Value::F64(f) => json!(f),
        rmpv::Value::String(s) => {
            Value::String(s.as_str().map(str::to_owned).unwrap_or_else(|| String::from_utf8_lossy(s.as_bytes()).into_owned()))
        }
        rmpv::Value::Binary(b) => json!({"$bin": b64_encode(b)}),
        rmpv::Value::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        rmpv::Value::Map(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let key = match k {
                    rmpv::Value::String(s) => s.as_str().unwrap_or_default().to_owned(),
                    other => other.to_string(),
                };
                out.insert(key, to_json(v));
            }
            Value::Object(out)
        }
        rmpv::Value::Ext(t, b) => json!({"$ext": t, "data": b64_encode(b)}),
    }
}

fn bytes_json(b: &[u8]) -> Value {
    rmpv::decode::read_value(&mut &b[..]).map(|v| to_json(&v)).unwrap_or(Value::Null)
}

/// A typed reply as the protocol names its fields: written back with the protocol's own encoder.
fn body_json(b: &impl Body) -> Value {
    let mut w = MapWriter::new();
    b.write(&mut w);
    bytes_json(&w.finish())
}

fn event_json(e: &Event) -> Value {
    let mut m = Map::new();
    m.insert("specversion".into(), json!("1.0"));
    m.insert("id".into(), json!(e.id));
    m.insert("type".into(), json!(e.event_type));
    m.insert("source".into(), json!(e.source));
    m.insert("time".into(), json!(e.time));
    if let Some(v) = e.schemaversion {
        m.insert("schemaversion".into(), json!(v));
    }
    m.insert("correlationid".into(), json!(e.correlationid));
    for (k, v) in [("partitionkey", &e.partitionkey), ("traceparent", &e.traceparent), ("deliverat", &e.deliverat)] {
        if let Some(v) = v {
            m.insert(k.into(), json!(v));
        }
    }
    if e.replayed {
        m.insert("replayed".into(), json!(true));
    }
    m.insert("data".into(), bytes_json(&e.data));
    Value::Object(m)
}

/// An error as a record: the code comes from the typed error, not from its message.
fn error_json(e: &Error) -> Value {
    let (code, message, details) = match e {
        Error::Server { code, message, details } => (code.as_str(), message.clone(), details.iter().map(detail_json).collect()),
        Error::ConnectionLost(m) => ("connection_lost", m.clone(), vec![]),
        Error::Closed => ("closed", e.to_string(), vec![]),
        Error::Timeout(_) => ("timeout", e.to_string(), vec![]),
        other => ("client_error", other.to_string(), vec![]),
    };
    json!({"error": {"code": code, "message": message, "details": details}})
}

fn detail_json(d: &Detail) -> Value {
    match d {
        Detail::Field { field, message } => json!({"field": field, "message": message}),
        Detail::Path { path, message } => json!({"path": path, "message": message}),
        Detail::Reason { message } => json!({"message": message}),
    }
}

// ---- reading a step ----

fn s<'a>(step: &'a Value, key: &str) -> Res<&'a str> {
    step.get(key).and_then(Value::as_str).ok_or_else(|| format!("the step has no string {key}"))
}

fn opt_s(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn opt_u(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

fn durability(v: Option<&str>) -> Res<Durability> {
    match v {
        None | Some("local") => Ok(Durability::Local),
        Some("committed") => Ok(Durability::Committed),
        Some(other) => Err(format!("unknown durability {other}")),
    }
}

fn ids(args: &Value) -> Vec<String> {
    args.get("ids").and_then(Value::as_array).map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

// ---- subscriptions ----

/// What one subscription step observed, and how its handler behaves.
struct Sub {
    spec: Value,
    deliveries: Mutex<Vec<Value>>,
    running: AtomicUsize,
    max_concurrent: AtomicUsize,
    handle: SubscriptionHandle,
}

impl Sub {
    fn count(&self) -> usize {
        self.deliveries.lock().unwrap().len()
    }

    fn distinct(&self) -> Vec<String> {
        self.deliveries.lock().unwrap().iter().filter_map(|d| d["event"]["id"].as_str().map(str::to_owned)).collect()
    }

    async fn handle(self: Arc<Self>, d: Delivery) -> Result<(), String> {
        self.deliveries.lock().unwrap().push(json!({"attempt": d.attempt, "event": event_json(&d.event)}));
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_concurrent.fetch_max(now, Ordering::SeqCst);
        let result = self.behave(&d).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        result
    }

    async fn behave(&self, d: &Delivery) -> Result<(), String> {
        let h = &self.spec;
        let sleep_ms = opt_u(h, "sleep_ms").unwrap_or(0);
        match opt_u(h, "extend_every_ms") {
            Some(every) if sleep_ms > 0 => {
                let mut left = sleep_ms;
                while left > 0 {
                    let step = left.min(every.max(1));
                    tokio::time::sleep(Duration::from_millis(step)).await;
                    left -= step;
                    if left > 0 {
                        let _ = d.extend().await;
                    }
                }
            }
            _ if sleep_ms > 0 => tokio::time::sleep(Duration::from_millis(sleep_ms)).await,
            _ => {}
        }
        if d.attempt <= opt_u(h, "fail_attempts").unwrap_or(0) {
            let error = opt_s(h, "error").unwrap_or_else(|| "handler failed".into());
            if h.get("dead").and_then(Value::as_bool).unwrap_or(false) {
                let _ = d.nack_with(Some(&error), None, true).await;
            } else if let Some(delay) = opt_u(h, "nack_delay_ms") {
                let _ = d.nack_with(Some(&error), Some(delay), false).await;
            } else {
                return Err(error);
            }
        }
        Ok(())
    }
}

// ---- scenarios ----

struct Scenario<'a> {
    lines: &'a mut mpsc::UnboundedReceiver<String>,
    clients: HashMap<String, Client>,
    subs: HashMap<String, Arc<Sub>>,
    records: Map<String, Value>,
}

impl Scenario<'_> {
    fn record(&mut self, step: &Value, v: Value) {
        if let Some(name) = opt_s(step, "record") {
            self.records.insert(name, v);
        }
    }

    fn client(&self, step: &Value) -> Res<Client> {
        let name = s(step, "client")?;
        self.clients.get(name).cloned().ok_or_else(|| format!("no client {name}"))
    }

    async fn run(&mut self, steps: &[Value]) -> Res<()> {
        for step in steps {
            match s(step, "do")? {
                "connect" => self.connect(step).await?,
                "publish" => self.publish(step).await?,
                "publish_many" => self.publish_many(step).await?,
                "subscribe" => self.subscribe(step).await?,
                "wait" => self.wait(step).await?,
                "count" => {
                    let n = self.subs.get(s(step, "sub")?).ok_or("no such subscription")?.count();
                    self.record(step, json!({"deliveries": n}));
                }
                "sleep" => tokio::time::sleep(Duration::from_millis(opt_u(step, "ms").unwrap_or(0))).await,
                "unsubscribe" => {
                    let sub = self.subs.get(s(step, "sub")?).ok_or("no such subscription")?;
                    sub.handle.unsubscribe().await.map_err(|e| e.to_string())?;
                }
                "call" => self.call(step).await?,
                "close" => self.client(step)?.close().await.map_err(|e| e.to_string())?,
                "restart_daemon" => {
                    emit(json!({"control": "restart_daemon"}));
                    let line = self.lines.recv().await.ok_or("stdin ended")?;
                    let msg: Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
                    if msg.get("control").and_then(Value::as_str) != Some("done") {
                        return Err(format!("expected the control line done, got {line}"));
                    }
                }
                other => return Err(format!("unknown step kind {other:?}")),
            }
        }
        Ok(())
    }

    async fn connect(&mut self, step: &Value) -> Res<()> {
        let var = if step.get("socket").and_then(Value::as_str) == Some("degraded") { "SIDEBUS_DEGRADED_SOCKET" } else { "SIDEBUS_SOCKET" };
        let path = std::env::var(var).map_err(|_| format!("{var} is not set"))?;
        let c = Client::connect_as(&path, s(step, "name")?).await.map_err(|e| e.to_string())?;
        self.clients.insert(s(step, "client")?.to_owned(), c);
        Ok(())
    }

    async fn publish(&mut self, step: &Value) -> Res<()> {
        let client = self.client(step)?;
        let mut p = Publish::new(s(step, "type")?, encode_json(step.get("data").unwrap_or(&Value::Null))?);
        if let Some(opts) = step.get("opts").and_then(Value::as_object) {
            for (k, v) in opts {
                let text = || v.as_str().map(str::to_owned).ok_or(format!("{k} must be a string"));
                match k.as_str() {
                    "event_id" => p.event_id = Some(text()?),
                    "durability" => p.durability = durability(v.as_str())?,
                    "delay_ms" => p.delay_ms = v.as_u64(),
                    "deliver_at" => p.deliver_at = Some(text()?),
                    "partitionkey" => p.partitionkey = Some(text()?),
                    "traceparent" => p.traceparent = Some(text()?),
                    "correlationid" => p.correlationid = Some(text()?),
                    "version" => p.version = v.as_u64(),
                    "source" => p.source = Some(text()?),
                    other => return Err(format!("unknown publish option {other}")),
                }
            }
        }
        let r = match client.publish_with(p).await {
            Ok(p) => json!({"event_id": p.event_id, "status": p.status.as_str(), "duplicate": p.duplicate}),
            Err(e) => error_json(&e),
        };
        self.record(step, r);
        Ok(())
    }

    async fn publish_many(&mut self, step: &Value) -> Res<()> {
        let client = self.client(step)?;
        let event_type = s(step, "type")?;
        let count = opt_u(step, "count").unwrap_or(0);
        let pad = opt_u(step, "pad_bytes").map(|n| "x".repeat(n as usize));
        let durability = durability(step.get("durability").and_then(Value::as_str))?;
        // Every publish is sent, in order, before any answer is awaited.
        let mut pending = Vec::with_capacity(count as usize);
        for i in 0..count {
            let data = match &pad {
                Some(pad) => json!({"n": i, "pad": pad}),
                None => json!({"n": i}),
            };
            let mut p = Publish::new(event_type, encode_json(&data)?);
            p.durability = durability;
            pending.push(client.publish_start(p).await);
        }
        let (mut ids, mut statuses, mut errors) = (vec![], Map::new(), Map::new());
        for p in pending {
            let r = match p {
                Ok(p) => p.wait().await,
                Err(e) => Err(e),
            };
            match r {
                Ok(p) => {
                    ids.push(json!(p.event_id));
                    let n = statuses.entry(p.status.as_str()).or_insert(json!(0));
                    *n = json!(n.as_u64().unwrap_or(0) + 1);
                }
                Err(e) => {
                    let code = error_json(&e)["error"]["code"].as_str().unwrap_or("unknown").to_owned();
                    let n = errors.entry(code).or_insert(json!(0));
                    *n = json!(n.as_u64().unwrap_or(0) + 1);
                }
            }
        }
        self.record(step, json!({"ids": ids, "statuses": statuses, "errors": errors}));
        Ok(())
    }

    async fn subscribe(&mut self, step: &Value) -> Res<()> {
        let client = self.client(step)?;
        let mut opts = SubscribeOptions::default();
        if let Some(o) = step.get("opts").and_then(Value::as_object) {
            for (k, v) in o {
                match k.as_str() {
                    "max_in_flight" => opts.max_in_flight = v.as_u64(),
                    "max_attempts" => opts.max_attempts = v.as_u64(),
                    "ack_timeout_ms" => opts.ack_timeout_ms = v.as_u64(),
                    other => return Err(format!("unknown subscribe option {other}")),
                }
            }
        }
        let sub = client.subscribe(s(step, "type")?, s(step, "group")?, opts).await.map_err(|e| e.to_string())?;
        let rec = Arc::new(Sub {
            spec: step.get("handler").cloned().unwrap_or(Value::Null),
            deliveries: Mutex::new(vec![]),
            running: AtomicUsize::new(0),
            max_concurrent: AtomicUsize::new(0),
            handle: sub.handle(),
        });
        let handler = rec.clone();
        tokio::spawn(sub.consume_deliveries(move |d| handler.clone().handle(d)));
        self.subs.insert(s(step, "sub")?.to_owned(), rec);
        Ok(())
    }

    async fn wait(&mut self, step: &Value) -> Res<()> {
        let names: Vec<String> = match step.get("sub") {
            Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
            Some(Value::String(one)) => vec![one.clone()],
            _ => return Err("wait needs sub".into()),
        };
        let subs: Vec<Arc<Sub>> =
            names.iter().map(|n| self.subs.get(n).cloned().ok_or(format!("no subscription {n}"))).collect::<Res<_>>()?;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(opt_u(step, "timeout_ms").unwrap_or(10_000));
        while tokio::time::Instant::now() < deadline {
            let done = match opt_u(step, "distinct") {
                Some(want) => {
                    let ids: std::collections::HashSet<String> = subs.iter().flat_map(|s| s.distinct()).collect();
                    ids.len() as u64 >= want
                }
                None => subs.iter().map(|s| s.count() as u64).sum::<u64>() >= opt_u(step, "deliveries").unwrap_or(0),
            };
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    async fn call(&mut self, step: &Value) -> Res<()> {
        let client = self.client(step)?;
        let empty = json!({});
        let args = step.get("args").unwrap_or(&empty);
        let ty = || s(args, "type").map(str::to_owned);
        let group = || s(args, "group").map(str::to_owned);
        let result = match s(step, "op")? {
            "stats" => client.stats().await.map(|r| body_json(&r)),
            "register_schema" => {
                let compatibility = match opt_s(args, "compatibility") {
                    Some(c) => Some(Compatibility::parse(&c).ok_or(format!("unknown compatibility {c}"))?),
                    None => None,
                };
                let r = RegisterSchema {
                    event_type: ty()?,
                    schema: encode_json(args.get("schema").ok_or("register_schema needs schema")?)?,
                    compatibility,
                    strict: args.get("strict").and_then(Value::as_bool),
                    dry_run: args.get("dry_run").and_then(Value::as_bool).unwrap_or(false),
                };
                client.register_schema_with(r).await.map(|r| body_json(&r))
            }
            "get_schema" => client.get_schema(&ty()?, opt_u(args, "version")).await.map(|r| body_json(&r)),
            "list_schemas" => client.list_schemas().await.map(|r| body_json(&r)),
            "replay" => client.replay(&ty()?, &group()?, s(args, "since")?, opt_s(args, "until").as_deref()).await.map(|r| body_json(&r)),
            "replay_cancel" => client.replay_cancel(s(args, "replay")?).await.map(|()| json!({})),
            "replays" => client.replays(args.get("all").and_then(Value::as_bool).unwrap_or(false)).await.map(|r| body_json(&r)),
            "dlq_list" => {
                let l = DlqList {
                    event_type: ty()?,
                    group: group()?,
                    limit: opt_u(args, "limit"),
                    after: opt_u(args, "after"),
                    ids: ids(args),
                };
                client.dlq_list(l).await.map(|r| body_json(&r))
            }
            "dlq_redrive" => {
                let a = DlqAction { event_type: ty()?, group: group()?, ids: ids(args), rate: opt_u(args, "rate") };
                client.dlq_redrive(a).await.map(|n| json!({"count": n}))
            }
            "dlq_purge" => {
                let a = DlqAction { event_type: ty()?, group: group()?, ids: ids(args), rate: None };
                client.dlq_purge(a).await.map(|n| json!({"count": n}))
            }
            other => return Err(format!("unknown admin op {other:?}")),
        };
        let r = result.unwrap_or_else(|e| error_json(&e));
        self.record(step, r);
        Ok(())
    }

    async fn close_all(&mut self) {
        let closing = self.clients.values().map(|c| c.close());
        for r in futures::future::join_all(closing).await {
            if let Err(e) = r {
                eprintln!("runner: closing a client: {e}");
            }
        }
    }

    fn observed(&self) -> Value {
        let subs: Map<String, Value> = self
            .subs
            .iter()
            .map(|(n, s)| {
                let deliveries = s.deliveries.lock().unwrap().clone();
                (n.clone(), json!({"deliveries": deliveries, "max_concurrent": s.max_concurrent.load(Ordering::SeqCst)}))
            })
            .collect();
        json!({"records": self.records, "subs": subs})
    }
}

#[tokio::main]
async fn main() {
    // stdin is read by a thread of its own, so that the runtime keeps running meanwhile.
    let (tx, mut lines) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = lines.recv().await {
        let msg: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("runner: ignoring a line that is not JSON ({e}): {line}");
                continue;
            }
        };
        let Some(name) = msg.get("scenario").and_then(Value::as_str).map(str::to_owned) else {
            eprintln!("runner: ignoring a line that is not a scenario: {line}");
            continue;
        };
        eprintln!("runner: scenario {name}");
        let steps = msg.get("steps").and_then(Value::as_array).cloned().unwrap_or_default();
        let mut sc = Scenario { lines: &mut lines, clients: HashMap::new(), subs: HashMap::new(), records: Map::new() };
        let result = sc.run(&steps).await;
        sc.close_all().await;
        match result {
            Ok(()) => emit(json!({"scenario": name, "observed": sc.observed()})),
            Err(e) => {
                eprintln!("runner: scenario {name} failed: {e}");
                emit(json!({"scenario": name, "error": e}));
            }
        }
    }
}
