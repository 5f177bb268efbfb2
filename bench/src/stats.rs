//! Latency histograms, results, and the stdout table.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// A latency histogram in microseconds (1 µs to 100 s, 3 significant digits).
pub struct Latency(Histogram<u64>);

impl Latency {
    /// An empty histogram.
    pub fn new() -> Latency {
        Latency(Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds"))
    }

    /// Records one latency.
    pub fn record(&mut self, d: Duration) {
        self.0.saturating_record((d.as_micros() as u64).max(1));
    }

    /// Adds another histogram.
    pub fn merge(&mut self, other: &Latency) {
        let _ = self.0.add(&other.0);
    }

    fn q(&self, q: f64) -> Option<f64> {
        (!self.0.is_empty()).then(|| self.0.value_at_quantile(q) as f64 / 1000.0)
    }
}

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Result {
    /// Short id, e.g. `publish.committed.c4`.
    pub name: String,
    /// What it measures, for people.
    pub what: String,
    /// Events, rows or entries per second.
    pub rate: Option<f64>,
    /// Latency percentiles in milliseconds.
    pub p50_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
    /// 99.9th percentile.
    pub p999_ms: Option<f64>,
    /// Samples or operations counted.
    pub count: u64,
    /// Other values (memory in MiB, CPU cores, offered rate…).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Result {
    /// A result with a rate.
    pub fn rate(name: &str, what: &str, count: u64, elapsed: Duration) -> Result {
        Result {
            name: name.to_owned(),
            what: what.to_owned(),
            rate: Some(count as f64 / elapsed.as_secs_f64()),
            p50_ms: None,
            p99_ms: None,
            p999_ms: None,
            count,
            extra: Default::default(),
        }
    }

    /// A result with only extra values.
    pub fn value(name: &str, what: &str) -> Result {
        Result {
            name: name.to_owned(),
            what: what.to_owned(),
            rate: None,
            p50_ms: None,
            p99_ms: None,
            p999_ms: None,
            count: 0,
            extra: Default::default(),
        }
    }

    /// Adds latency percentiles.
    pub fn latency(mut self, l: &Latency) -> Result {
        self.p50_ms = l.q(0.5);
        self.p99_ms = l.q(0.99);
        self.p999_ms = l.q(0.999);
        self
    }

    /// Adds an extra value.
    pub fn with(mut self, key: &str, v: impl Into<serde_json::Value>) -> Result {
        self.extra.insert(key.to_owned(), v.into());
        self
    }

    /// Prints it as a table row.
    pub fn print(&self) {
        let f = |v: Option<f64>, prec: usize| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.prec$}"));
        // Long series (samples) stay in the JSON.
        let extra: Vec<String> = self.extra.iter().filter(|(_, v)| !v.is_array()).map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "| {:<34} | {:>10} | {:>8} | {:>8} | {:>8} | {} |",
            self.name,
            f(self.rate, 0),
            f(self.p50_ms, 2),
            f(self.p99_ms, 2),
            f(self.p999_ms, 2),
            extra.join(" ")
        );
    }
}

/// Prints the table header.
pub fn header() {
    println!("| {:<34} | {:>10} | {:>8} | {:>8} | {:>8} | notes |", "measurement", "per second", "p50 ms", "p99 ms", "p99.9 ms");
    println!("|{:-<36}|{:->12}|{:->10}|{:->10}|{:->10}|{:-<8}|", "", "", "", "", "", "");
}
