//! Where Redis is and how to reach it: one server (`redis://`, `rediss://` with TLS, a Unix
//! socket) or the master that Redis Sentinel names (`redis+sentinel://`, `rediss+sentinel://`),
//! with the password and TLS files of the config; and [`Conn`], the connection ordinary commands
//! share, which follows the master to another server when the Sentinels fail over.
//!
//! TLS always verifies the server's certificate and name (against `redis_tls_ca`, else the
//! system's roots); `#insecure` URLs are refused. A Sentinel URL is
//! `redis+sentinel://[user[:password]@]host[:port][,host[:port]…]/service[/db]`: the hosts are
//! the Sentinels (port 26379 by default), the user and password those of the Redis servers
//! (`redis_sentinel_password` is the Sentinels' own).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    Client, ClientTlsConfig, Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisFuture, TlsCertificates, TlsMode, Value,
};

use super::COMMAND_TIMEOUT;
use crate::config::{Config, RedisTls, key};

/// The Sentinels' port when a Sentinel URL gives none.
const SENTINEL_PORT: u16 = 26379;

/// A setting the daemon cannot use: its key and what is wrong (never the secret itself).
pub type Problem = (&'static str, String);

/// How to find the Redis server to use.
pub struct Target {
    kind: Kind,
}

enum Kind {
    /// One server.
    Direct(Client),
    /// The master the Sentinels name.
    Sentinel { client: tokio::sync::Mutex<SentinelClient>, service: String },
}

/// The URL's scheme, without the driver's help (it refuses `+sentinel`).
fn scheme(url: &str) -> &str {
    url.split_once("://").map_or("", |(s, _)| s)
}

/// Decodes `%XX` escapes (a URL's user and password).
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or("a bad %-escape in the user or password")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the user or password is not UTF-8".to_owned())
}

/// A driver's error about `url`, without the URL's password if the driver quoted it.
fn said(e: &redis::RedisError, url: &str) -> String {
    let text = e.to_string();
    let password = url.split_once("://").and_then(|(_, r)| r.split('/').next()?.rsplit_once('@')?.0.split_once(':').map(|(_, p)| p));
    let quoted = |p: &str| !p.is_empty() && (text.contains(p) || percent_decode(p).is_ok_and(|d| !d.is_empty() && text.contains(&d)));
    if password.is_some_and(quoted) { e.category().to_owned() } else { text }
}

/// The parts of a Sentinel URL.
#[derive(Debug, PartialEq, Eq)]
struct SentinelUrl {
    tls: bool,
    user: Option<String>,
    password: Option<String>,
    sentinels: Vec<(String, u16)>,
    service: String,
    db: i64,
}

fn parse_sentinel_url(url: &str) -> Result<SentinelUrl, String> {
    let (scheme, rest) = url.split_once("://").ok_or("not a URL")?;
    let tls = scheme == "rediss+sentinel";
    if rest.contains(['?', '#']) {
        return Err("a Sentinel URL takes no query or fragment".into());
    }
    let (authority, path) = rest.split_once('/').ok_or("names no service: redis+sentinel://HOST:PORT,…/SERVICE")?;
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, password) = match userinfo {
        None => (None, None),
        Some(u) => match u.split_once(':') {
            Some((name, pw)) => {
                (Some(percent_decode(name)?).filter(|n| !n.is_empty()), Some(percent_decode(pw)?).filter(|p| !p.is_empty()))
            }
            None => (Some(percent_decode(u)?).filter(|n| !n.is_empty()), None),
        },
    };
    let mut sentinels = Vec::new();
    for h in hosts.split(',') {
        let (host, port) = match h.rsplit_once(':') {
            Some((host, port)) => (host, port.parse::<u16>().map_err(|_| format!("`{port}` is not a port"))?),
            None => (h, SENTINEL_PORT),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("a Sentinel without a host".into());
        }
        sentinels.push((host.to_owned(), port));
    }
    let mut parts = path.split('/');
    let service = parts.next().unwrap_or_default().to_owned();
    if service.is_empty() {
        return Err("names no service: redis+sentinel://HOST:PORT,…/SERVICE".into());
    }
    let db = match parts.next().filter(|d| !d.is_empty()) {
        None => 0,
        Some(d) => d.parse().map_err(|_| format!("`{d}` is not a database number"))?,
    };
    if parts.next().is_some() {
        return Err("too many path parts: redis+sentinel://HOST:PORT,…/SERVICE/DB".into());
    }
    Ok(SentinelUrl { tls, user, password, sentinels, service, db })
}

/// The TLS files, read (a missing or malformed one names its key).
fn certificates(tls: &RedisTls) -> Result<Option<TlsCertificates>, Problem> {
    let read =
        |k: &'static str, path: &std::path::Path| std::fs::read(path).map_err(|e| (k, format!("cannot read {}: {e}", path.display())));
    let root_cert = tls.ca.as_deref().map(|p| read(key::REDIS_TLS_CA, p)).transpose()?;
    let client_tls = match (&tls.cert, &tls.key) {
        (Some(cert), Some(k)) => {
            Some(ClientTlsConfig { client_cert: read(key::REDIS_TLS_CERT, cert)?, client_key: read(key::REDIS_TLS_KEY, k)? })
        }
        _ => None,
    };
    if root_cert.is_none() && client_tls.is_none() {
        return Ok(None);
    }
    Ok(Some(TlsCertificates { client_tls, root_cert }))
}

impl Target {
    /// The target of a bare URL (tests and tools: no password or TLS files besides the URL's).
    pub fn from_url(url: &str) -> Result<Target, Problem> {
        Target::build(url, None, None, &RedisTls::default())
    }

    /// The target the config describes; every file is read now.
    pub fn from_config(c: &Config) -> Result<Target, Problem> {
        Target::build(
            &c.redis_url,
            c.redis_password.as_ref().map(|s| s.expose()),
            c.redis_sentinel_password.as_ref().map(|s| s.expose()),
            &c.redis_tls,
        )
    }

    fn build(url: &str, password: Option<&str>, sentinel_password: Option<&str>, tls: &RedisTls) -> Result<Target, Problem> {
        let bad = |why: String| (key::REDIS_URL, why);
        if url.contains('#') {
            return Err(bad("certificate verification cannot be turned off (#insecure); give the CA with redis_tls_ca".into()));
        }
        let certs = certificates(tls)?;
        let kind = match scheme(url) {
            "redis+sentinel" | "rediss+sentinel" => {
                let u = parse_sentinel_url(url).map_err(|e| bad(format!("not a Sentinel URL: {e}")))?;
                let addr = |(host, port): &(String, u16)| match u.tls {
                    true => ConnectionAddr::TcpTls { host: host.clone(), port: *port, insecure: false, tls_params: None },
                    false => ConnectionAddr::Tcp(host.clone(), *port),
                };
                let mut b = SentinelClientBuilder::new(u.sentinels.iter().map(addr), &u.service, SentinelServerType::Master)
                    .map_err(|e| bad(format!("not a Sentinel URL: {}", said(&e, url))))?
                    .set_client_to_redis_db(u.db);
                if u.tls {
                    b = b.set_client_to_sentinel_tls_mode(TlsMode::Secure).set_client_to_redis_tls_mode(TlsMode::Secure);
                    if let Some(certs) = &certs {
                        b = b.set_client_to_sentinel_certificates(certs.clone()).set_client_to_redis_certificates(certs.clone());
                    }
                }
                if let Some(user) = &u.user {
                    b = b.set_client_to_redis_username(user);
                }
                if let Some(pw) = password.or(u.password.as_deref()) {
                    b = b.set_client_to_redis_password(pw);
                }
                if let Some(pw) = sentinel_password {
                    b = b.set_client_to_sentinel_password(pw);
                }
                let client = b.build().map_err(|e| bad(format!("not a Sentinel URL: {}", said(&e, url))))?;
                Kind::Sentinel { client: tokio::sync::Mutex::new(client), service: u.service }
            }
            _ => {
                let mut info: ConnectionInfo =
                    url.into_connection_info().map_err(|e| bad(format!("not a Redis URL: {}", said(&e, url))))?;
                if let Some(pw) = password {
                    info = info.clone().set_redis_settings(info.redis_settings().clone().set_password(pw));
                }
                let client = match certs {
                    Some(certs) => {
                        Client::build_with_tls(info, certs).map_err(|e| bad(format!("cannot use the TLS files: {}", said(&e, url))))?
                    }
                    None => Client::open(info).map_err(|e| bad(format!("not a Redis URL: {}", said(&e, url))))?,
                };
                Kind::Direct(client)
            }
        };
        Ok(Target { kind })
    }

    /// The Sentinels' service, when the target is one.
    pub fn sentinel_service(&self) -> Option<&str> {
        match &self.kind {
            Kind::Direct(_) => None,
            Kind::Sentinel { service, .. } => Some(service),
        }
    }

    /// A client of the server to use now: the one server, or the master the Sentinels name
    /// (checked to call itself master).
    pub(super) async fn client(&self) -> redis::RedisResult<Client> {
        match &self.kind {
            Kind::Direct(c) => Ok(c.clone()),
            Kind::Sentinel { client, .. } => client.lock().await.async_get_client().await,
        }
    }
}

/// `host:port` of a client's server (or its socket path), for logs and for noticing a change.
pub(super) fn address(client: &Client) -> String {
    match client.get_connection_info().addr() {
        ConnectionAddr::Tcp(h, p) | ConnectionAddr::TcpTls { host: h, port: p, .. } => format!("{h}:{p}"),
        ConnectionAddr::Unix(path) => path.display().to_string(),
        other => format!("{other:?}"),
    }
}

/// The server the shared connection talks to.
struct Current {
    client: Client,
    manager: ConnectionManager,
    address: String,
}

/// The connection ordinary commands share: a multiplexed [`ConnectionManager`] (which pipelines
/// concurrent commands and reconnects), replaced by [`Conn::switch`] when the master moves.
/// Cheap to clone; every clone sees the switch.
#[derive(Clone)]
pub(crate) struct Conn {
    current: Arc<RwLock<Current>>,
    db: i64,
}

impl Conn {
    /// Connects to `client`'s server.
    pub(super) async fn open(client: Client) -> redis::RedisResult<Conn> {
        let db = client.get_connection_info().redis_settings().db();
        let manager = manager(&client).await?;
        let address = address(&client);
        Ok(Conn { current: Arc::new(RwLock::new(Current { client, manager, address })), db })
    }

    fn manager(&self) -> ConnectionManager {
        self.current.read().unwrap_or_else(|p| p.into_inner()).manager.clone()
    }

    /// A client of the current server (for connections of their own: blocking reads).
    pub(super) fn client(&self) -> Client {
        self.current.read().unwrap_or_else(|p| p.into_inner()).client.clone()
    }

    /// The current server's address.
    pub(super) fn address(&self) -> String {
        self.current.read().unwrap_or_else(|p| p.into_inner()).address.clone()
    }

    /// Talks to `client`'s server from now on (commands in flight finish on the old one).
    pub(super) async fn switch(&self, client: Client) -> redis::RedisResult<()> {
        let manager = manager(&client).await?;
        let address = address(&client);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Current { client, manager, address };
        Ok(())
    }
}

async fn manager(client: &Client) -> redis::RedisResult<ConnectionManager> {
    let cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(3)))
        .set_response_timeout(Some(COMMAND_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    client.get_connection_manager_with_config(cfg).await
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let mut m = self.manager();
        Box::pin(async move { m.send_packed_command(cmd).await })
    }

    fn req_packed_commands<'a>(&'a mut self, pipeline: &'a redis::Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        let mut m = self.manager();
        Box::pin(async move { m.send_packed_commands(pipeline, offset, count).await })
    }

    fn get_db(&self) -> i64 {
        self.db
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_parse() {
        let u = parse_sentinel_url("redis+sentinel://app:p%40ss@s1:26380,s2,[::1]:5000/mymaster/2").unwrap();
        assert_eq!(
            u,
            SentinelUrl {
                tls: false,
                user: Some("app".into()),
                password: Some("p@ss".into()),
                sentinels: vec![("s1".into(), 26380), ("s2".into(), 26379), ("::1".into(), 5000)],
                service: "mymaster".into(),
                db: 2,
            }
        );
        let u = parse_sentinel_url("rediss+sentinel://:pw@s1/svc").unwrap();
        assert!(u.tls && u.user.is_none() && u.password.as_deref() == Some("pw") && u.db == 0);
        assert!(parse_sentinel_url("redis+sentinel://s1:26379").unwrap_err().contains("names no service"));
        assert!(parse_sentinel_url("redis+sentinel://s1:x/svc").unwrap_err().contains("is not a port"));
        assert!(parse_sentinel_url("redis+sentinel://s1/svc/zero").unwrap_err().contains("not a database number"));
    }

    #[test]
    fn errors_never_quote_the_password() {
        for url in
            ["redis://:hunter2@h:notaport", "rediss://:hunter2@h/#insecure", "redis+sentinel://:hunter2@h:bad/svc", "redis://:hunter2@h/zz"]
        {
            let (k, why) = Target::from_url(url).err().unwrap_or_else(|| panic!("{url} was taken"));
            assert_eq!(k, key::REDIS_URL);
            assert!(!why.contains("hunter2"), "{url}: {why}");
        }
    }

    #[test]
    fn tls_files_are_read_at_once() {
        let tls = RedisTls { ca: Some("/nonexistent/ca.pem".into()), ..RedisTls::default() };
        let (k, why) = Target::build("rediss://h:6380", None, None, &tls).err().unwrap();
        assert_eq!(k, key::REDIS_TLS_CA);
        assert!(why.starts_with("cannot read /nonexistent/ca.pem"), "{why}");
    }
}
