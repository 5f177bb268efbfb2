//! `sidebus-bench`: measures sidebus and what a user would compare it with, in one run on one
//! machine: publish throughput and end-to-end latency through the daemon, the ceilings of its
//! backends (Postgres, Redis) with the same rows, NATS JetStream doing the same job, and the
//! daemon's memory. Prints a table and writes the figures as JSON; BENCHMARKS.md reports them.
//!
//! `cargo run --release -p sidebus-bench -- --help`
#![forbid(unsafe_code)]

mod ceilings;
mod daemon;
mod jetstream;
mod replay;
mod schema;
mod sidebus;
mod stats;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;
use sidebus_client::Durability;

use crate::daemon::Daemon;
use crate::sidebus::Load;

#[derive(Parser, Debug)]
#[command(
    about = "Benchmark sidebus against its backends' ceilings and NATS JetStream",
    after_help = "Example:\n  cargo run --release -p sidebus-bench -- --out bench-results.json"
)]
struct Args {
    /// Redis for the daemon and the Redis ceilings.
    #[arg(long, env = "BENCH_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// A Postgres URL whose user may create databases; the bench creates (and drops) its own.
    /// The daemon and the ceilings use the same URL (so the same TLS setting: none on loopback).
    #[arg(long, env = "BENCH_POSTGRES_URL", default_value = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable")]
    postgres_url: String,
    /// NATS with JetStream.
    #[arg(long, env = "BENCH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// A sidebus binary to use instead of building target/release/sidebus.
    #[arg(long)]
    sidebus_bin: Option<PathBuf>,
    /// Seconds per throughput run.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Seconds per end-to-end run.
    #[arg(long, default_value_t = 10)]
    e2e_secs: u64,
    /// Also run a steady 10,000/s load this long and sample the daemon's memory every 10 s.
    #[arg(long, default_value_t = 0)]
    soak_secs: u64,
    /// Events in the backlog the drain run builds up and then drains.
    #[arg(long, default_value_t = 1_000_000)]
    drain_events: u64,
    /// Events replayed in the replay run (and first received live).
    #[arg(long, default_value_t = 200_000)]
    replay_events: u64,
    /// Only these parts: publish, e2e, memory, replay, drain, schema, ceilings, jetstream
    /// (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "bench-results.json")]
    out: PathBuf,
}

impl Args {
    fn runs(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

fn mib(bytes: u64) -> f64 {
    (bytes as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0
}

fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")).map(|m| m.trim().to_owned());
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "memory": mem,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

/// Measures `f` and notes how many cores the daemon used meanwhile.
async fn with_cpu<T>(d: &Daemon, f: impl Future<Output = Result<T>>) -> Result<(T, f64)> {
    let (cpu0, t0) = (d.cpu_secs(), Instant::now());
    let v = f.await?;
    Ok((v, (d.cpu_secs() - cpu0) / t0.elapsed().as_secs_f64()))
}

/// Builds a backlog in a daemon whose Redis is away (everything it accepts stays in its spool),
/// stops it, starts it again with Redis there, and measures how fast it drains into the log and
/// the stream.
async fn drain(
    bin: &std::path::Path,
    dir: &std::path::Path,
    args: &Args,
    db_url: &str,
    namespace: &str,
    n: u64,
) -> Result<Vec<stats::Result>> {
    let event_type = "bench.drain";
    let config = dir.join("drain.toml");
    std::fs::create_dir_all(dir)?;
    // A declared group keeps the entries in the stream, so the stream's length says how far the
    // drain got.
    std::fs::write(&config, format!("[[groups]]\ntype = \"{event_type}\"\nname = \"g\"\n"))?;
    let config = config.display().to_string();
    let away = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let d = Daemon::start(
        bin,
        dir,
        &format!("redis://127.0.0.1:{away}"),
        db_url,
        namespace,
        &["--config", &config, "--spool-max-bytes", "4294967296"],
    )
    .await?;
    let (acked, took) = sidebus::publish_count(&d.socket, event_type, 4, n, Durability::Local).await?;
    let spooled = stats::Result::rate(
        "publish.local.outage.c4",
        "publishes acknowledged per second while Redis is away (all spooled), 4 connections",
        acked,
        took,
    );
    d.stop();
    let d = Daemon::start(bin, dir, &args.redis_url, db_url, namespace, &["--config", &config]).await?;
    let start = Instant::now();
    let pool = sqlx::PgPool::connect(db_url).await?;
    let mut redis = redis::Client::open(args.redis_url.as_str())?.get_multiplexed_async_connection().await?;
    let key = format!("{namespace}:s:{event_type}");
    let (mut logged, mut streamed) = (0i64, 0u64);
    while (logged as u64) < acked || streamed < acked {
        tokio::time::sleep(Duration::from_millis(250)).await;
        logged = sqlx::query_scalar("SELECT count(*) FROM events WHERE type = $1").bind(event_type).fetch_one(&pool).await?;
        streamed = redis::cmd("XLEN").arg(&key).query_async(&mut redis).await?;
        if start.elapsed() > Duration::from_secs(1800) {
            anyhow::bail!("the drain did not finish in 30 minutes ({logged} logged, {streamed} streamed of {acked})");
        }
    }
    let drained = stats::Result::rate(
        &format!("drain.{}k", n / 1000),
        &format!("a backlog of {acked} spooled events drained into the log and the stream, per second"),
        acked,
        start.elapsed(),
    )
    .with("daemon_cores", ((d.cpu_secs() / start.elapsed().as_secs_f64()) * 100.0).round() / 100.0);
    d.stop();
    Ok(vec![spooled, drained])
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let run_id = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string();
    let secs = Duration::from_secs(args.secs);
    let e2e_secs = Duration::from_secs(args.e2e_secs);
    let mut results: Vec<stats::Result> = Vec::new();
    let mut versions = serde_json::Map::new();
    let tmp = std::env::temp_dir().join(format!("sidebus-bench-{run_id}"));
    std::fs::create_dir_all(&tmp)?;
    let admin = sqlx::PgPool::connect(&args.postgres_url).await.context("connect to Postgres")?;
    let pg_version: String = sqlx::query_scalar("SHOW server_version").fetch_one(&admin).await?;
    versions.insert("postgres".into(), pg_version.into());
    let redis = redis::Client::open(args.redis_url.as_str())?.get_multiplexed_async_connection().await.context("connect to Redis")?;
    let info: String = redis::cmd("INFO").arg("server").query_async(&mut redis.clone()).await?;
    if let Some(v) = info.lines().find_map(|l| l.strip_prefix("redis_version:")) {
        versions.insert("redis".into(), v.trim().into());
    }
    let db_url = |name: &str| -> Result<String> {
        let (base, rest) = args.postgres_url.rsplit_once('/').context("postgres url")?;
        let query = rest.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
        Ok(format!("{base}/{name}{query}"))
    };
    let daemon_db = format!("sidebus_bench_{run_id}");
    let ceiling_db = format!("sidebus_bench_ceiling_{run_id}");
    stats::header();
    let emit = |r: stats::Result, results: &mut Vec<stats::Result>| {
        r.print();
        results.push(r);
    };

    if args.runs("publish") || args.runs("e2e") || args.runs("memory") || args.runs("replay") {
        let bin = daemon::build(args.sidebus_bin.clone())?;
        let d = Daemon::start(&bin, &tmp, &args.redis_url, &db_url(&daemon_db)?, &format!("bench{run_id}"), &[]).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        emit(stats::Result::value("memory.idle", "daemon resident memory, idle after start").with("rss_mib", mib(d.rss())), &mut results);
        if args.runs("publish") {
            for durability in [Durability::Local, Durability::Committed] {
                for c in [1, 4, 16] {
                    let (r, cores) = with_cpu(&d, sidebus::publish_throughput(&d.socket, c, secs, durability)).await?;
                    emit(r.with("daemon_cores", (cores * 100.0).round() / 100.0), &mut results);
                }
                // Let the spool drain before the next runs.
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
        if args.runs("e2e") {
            let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let sampler = {
                let (peak, pid) = (peak.clone(), d.pid());
                tokio::spawn(async move {
                    loop {
                        peak.fetch_max(daemon::rss(pid), std::sync::atomic::Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                })
            };
            for (groups, load) in
                [(1, Load::Fixed(1000)), (1, Load::Fixed(10_000)), (3, Load::Fixed(10_000)), (1, Load::Saturate(4)), (3, Load::Saturate(4))]
            {
                let ((r, _), cores) = with_cpu(&d, sidebus::end_to_end(&d.socket, groups, load, e2e_secs)).await?;
                emit(r.with("daemon_cores", (cores * 100.0).round() / 100.0), &mut results);
            }
            sampler.abort();
            let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
            emit(
                stats::Result::value("memory.under_load", "daemon peak resident memory during the end-to-end runs")
                    .with("rss_mib", mib(peak)),
                &mut results,
            );
        }
        if args.runs("memory") {
            let clients = sidebus::connect_many(&d.socket, 1000).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            emit(
                stats::Result::value("memory.clients_1000", "daemon resident memory with 1,000 connected clients")
                    .with("rss_mib", mib(d.rss())),
                &mut results,
            );
            drop(clients);
            tokio::time::sleep(Duration::from_secs(2)).await;
            emit(
                stats::Result::value("memory.after_clients", "daemon resident memory after the 1,000 clients left")
                    .with("rss_mib", mib(d.rss())),
                &mut results,
            );
        }
        if args.runs("replay") {
            for r in replay::replay_vs_live(&d.socket, args.replay_events).await? {
                emit(r, &mut results);
            }
        }
        if args.soak_secs > 0 {
            let soak = Duration::from_secs(args.soak_secs);
            let (pid, samples) = (d.pid(), std::sync::Arc::new(std::sync::Mutex::new(Vec::new())));
            let sampler = {
                let samples = samples.clone();
                tokio::spawn(async move {
                    let t0 = Instant::now();
                    loop {
                        let rss = mib(daemon::rss(pid));
                        samples.lock().unwrap_or_else(|p| p.into_inner()).push(json!([t0.elapsed().as_secs(), rss]));
                        tokio::time::sleep(Duration::from_secs(10)).await;
                    }
                })
            };
            let (r, _) = sidebus::end_to_end(&d.socket, 1, Load::Fixed(10_000), soak).await?;
            sampler.abort();
            let samples = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let rss: Vec<f64> = samples.iter().filter_map(|s| s[1].as_f64()).collect();
            let first_minute = rss.iter().take(7).cloned().fold(0.0, f64::max);
            let last = rss.last().copied().unwrap_or(0.0);
            let mut s = stats::Result::value(
                "memory.soak",
                &format!("daemon resident memory over a {}-second steady run at 10,000/s", args.soak_secs),
            );
            s.p50_ms = r.p50_ms;
            s.p99_ms = r.p99_ms;
            s.p999_ms = r.p999_ms;
            s.rate = r.rate;
            emit(s.with("rss_first_minute_max_mib", first_minute).with("rss_last_mib", last).with("samples", samples), &mut results);
        }
        d.stop();
    }

    if args.runs("drain") {
        let bin = daemon::build(args.sidebus_bin.clone())?;
        for r in drain(&bin, &tmp.join("drain"), &args, &db_url(&daemon_db)?, &format!("bench{run_id}"), args.drain_events).await? {
            emit(r, &mut results);
        }
    }

    if args.runs("schema") {
        for r in schema::validation_cost(secs)? {
            emit(r, &mut results);
        }
    }

    if args.runs("ceilings") {
        let log = sidebus::log_for(&db_url(&ceiling_db)?).await?;
        let pool = sqlx::PgPool::connect(&db_url(&ceiling_db)?).await?;
        for w in [1, 2] {
            emit(ceilings::pg_insert(&pool, w, secs).await?, &mut results);
        }
        for w in [1, 2] {
            emit(ceilings::pg_copy(&pool, w, secs).await?, &mut results);
        }
        for w in [1, 2] {
            emit(ceilings::pg_sidebus(&log, &pool, w, false, secs).await?, &mut results);
        }
        for w in [1, 2] {
            emit(ceilings::pg_sidebus(&log, &pool, w, true, secs).await?, &mut results);
        }
        pool.close().await;
        log.close().await;
        let key = format!("sidebus-bench-{run_id}");
        emit(ceilings::redis_xadd(&redis, &key, secs).await?, &mut results);
        emit(ceilings::redis_read_ack(&redis, &key).await?, &mut results);
        redis::cmd("DEL").arg(&key).query_async::<()>(&mut redis.clone()).await?;
    }

    if args.runs("jetstream") {
        versions.insert("nats-server".into(), jetstream::setup(&args.nats_url).await?.into());
        let mut c4 = 0;
        for c in [1, 4, 16] {
            let r = jetstream::publish_throughput(&args.nats_url, c, secs).await?;
            if c == 4 {
                c4 = r.count;
            }
            emit(r, &mut results);
        }
        emit(jetstream::consume_all(&args.nats_url, "sbbench.pub.c4", c4).await?, &mut results);
        for (groups, load) in
            [(1, Load::Fixed(1000)), (1, Load::Fixed(10_000)), (3, Load::Fixed(10_000)), (1, Load::Saturate(4)), (3, Load::Saturate(4))]
        {
            emit(jetstream::end_to_end(&args.nats_url, groups, load, e2e_secs).await?, &mut results);
        }
        jetstream::teardown(&args.nats_url).await?;
    }

    // The daemon's Redis keys (streams, groups, markers) go with its run.
    let mut conn = redis.clone();
    let keys: Vec<String> = {
        let mut iter: redis::AsyncIter<String> = redis::cmd("SCAN")
            .cursor_arg(0)
            .arg("MATCH")
            .arg(format!("bench{run_id}:*"))
            .arg("COUNT")
            .arg(1000)
            .clone()
            .iter_async(&mut conn)
            .await?;
        let mut keys = Vec::new();
        while let Some(k) = futures::StreamExt::next(&mut iter).await {
            keys.push(k?);
        }
        keys
    };
    for chunk in keys.chunks(500) {
        redis::cmd("DEL").arg(chunk).query_async::<()>(&mut redis.clone()).await?;
    }
    for db in [&daemon_db, &ceiling_db] {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)")).execute(&admin).await;
    }
    let _ = std::fs::remove_dir_all(&tmp);

    let rate = |name: &str| results.iter().find(|r| r.name == name).and_then(|r| r.rate);
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| ((a / b) * 100.0).round() / 100.0);
    let best = |names: &[&str]| names.iter().filter_map(|n| rate(n)).fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
    let best_publish = best(&["publish.committed.c1", "publish.committed.c4", "publish.committed.c16"]);
    let best_spooled = best(&["publish.local.c1", "publish.local.c4", "publish.local.c16"]);
    let best_jetstream = best(&["jetstream.publish.c1", "jetstream.publish.c4", "jetstream.publish.c16"]);
    let drain_rate = results.iter().find(|r| r.name.starts_with("drain.")).and_then(|r| r.rate);
    let ratios = json!({
        "best_committed_publish_over_pg_copy_2w": ratio(best_publish, rate("ceiling.pg.copy.w2")),
        "best_committed_publish_over_pg_insert_1w": ratio(best_publish, rate("ceiling.pg.insert.w1")),
        "best_committed_publish_over_jetstream_publish_c4": ratio(best_publish, rate("jetstream.publish.c4")),
        "best_spooled_publish_over_best_jetstream_publish": ratio(best_spooled, best_jetstream),
        "drain_over_pg_copy_2w": ratio(drain_rate, rate("ceiling.pg.copy.w2")),
        "drain_over_pg_insert_2w": ratio(drain_rate, rate("ceiling.pg.insert.w2")),
        "e2e_saturation_g1_over_jetstream": ratio(rate("e2e.sat.c4.g1"), rate("jetstream.e2e.sat.c4.g1")),
        "e2e_saturation_g3_over_jetstream": ratio(rate("e2e.sat.c4.g3"), rate("jetstream.e2e.sat.c4.g3")),
    });
    println!("\nratios: {ratios}");
    let out = json!({
        "run": run_id,
        "machine": machine(),
        "versions": versions,
        "event_bytes_stored": ceilings::event_bytes(),
        "payload_bytes": sidebus::PAYLOAD,
        "results": results,
        "ratios": ratios,
    });
    std::fs::write(&args.out, serde_json::to_string_pretty(&out)? + "\n")?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
