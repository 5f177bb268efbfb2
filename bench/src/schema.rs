//! What validation adds to a publish: the daemon's own publish-time check
//! (`Registry::check`: lookup, MessagePack to JSON, validation) of a typical 10-field event,
//! against the same call for a type without a schema, in this process on one core.

use std::time::{Duration, Instant};

use ::sidebus::backend::pg::SchemaRow;
use ::sidebus::bus::schema::{Checked, Registry};
use ::sidebus::config::UnknownTypes;
use anyhow::Result;
use serde_json::json;

use crate::stats::Result as Row;

/// A typical event schema: ten fields, six required, the usual constraints.
fn schema() -> serde_json::Value {
    json!({
        "type": "object",
        "required": ["orderId", "customerId", "amount", "currency", "createdAt", "status"],
        "properties": {
            "orderId": {"type": "string", "minLength": 1, "maxLength": 64},
            "customerId": {"type": "string", "minLength": 1, "maxLength": 64},
            "amount": {"type": "number", "minimum": 0},
            "currency": {"enum": ["EUR", "USD", "GBP", "JPY"]},
            "createdAt": {"type": "string", "format": "date-time"},
            "status": {"enum": ["new", "paid", "shipped", "cancelled"]},
            "items": {"type": "integer", "minimum": 1, "maximum": 1000},
            "express": {"type": "boolean"},
            "coupon": {"type": ["string", "null"], "maxLength": 32},
            "note": {"type": "string", "maxLength": 500}
        }
    })
}

fn data() -> Vec<u8> {
    let v = json!({
        "orderId": "o-1001", "customerId": "c-77", "amount": 42.5, "currency": "EUR",
        "createdAt": "2026-11-27T09:30:00Z", "status": "paid", "items": 3, "express": false,
        "coupon": null, "note": "leave at the door"
    });
    rmp_serde::to_vec_named(&v).expect("encode")
}

/// Calls `f` for `secs`; nanoseconds per call.
fn per_call(secs: Duration, mut f: impl FnMut()) -> (f64, u64) {
    let until = Instant::now() + secs;
    let start = Instant::now();
    let mut n = 0u64;
    while Instant::now() < until {
        for _ in 0..1000 {
            f();
        }
        n += 1000;
    }
    (start.elapsed().as_nanos() as f64 / n as f64, n)
}

pub fn validation_cost(secs: Duration) -> Result<Vec<Row>> {
    let dir = std::env::temp_dir().join(format!("sidebus-bench-schema-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let registry = Registry::open(&dir, UnknownTypes::Allow);
    registry.preload(vec![SchemaRow {
        event_type: "bench.validated".into(),
        version: 1,
        schema: schema(),
        compatibility: "backward".into(),
        strict: false,
    }]);
    let data = data();
    assert!(matches!(registry.check("bench.validated", None, &data), Ok(Checked::Valid(Some(1)))), "the event is valid");
    let (without, n0) = per_call(secs, || {
        std::hint::black_box(registry.check("bench.raw", None, std::hint::black_box(&data)).ok());
    });
    let (with, n1) = per_call(secs, || {
        std::hint::black_box(registry.check("bench.validated", None, std::hint::black_box(&data)).ok());
    });
    std::fs::remove_dir_all(&dir).ok();
    let added_us = (with - without) / 1000.0;
    Ok(vec![
        Row::rate(
            "schema.check.none",
            "publish-time check of a type without a schema (a lookup), calls per second on one core",
            n0,
            Duration::from_nanos((without * n0 as f64) as u64),
        )
        .with("ns_per_event", (without * 10.0).round() / 10.0),
        Row::rate(
            "schema.check.10_fields",
            "publish-time validation of a valid 10-field event (MessagePack to JSON, jsonschema), calls per second on one core",
            n1,
            Duration::from_nanos((with * n1 as f64) as u64),
        )
        .with("ns_per_event", (with * 10.0).round() / 10.0)
        .with("added_us_per_event", (added_us * 1000.0).round() / 1000.0),
    ])
}
