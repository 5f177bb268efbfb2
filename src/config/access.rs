//! Who may use the socket: the `[[access]]` entries of the config file, checked against the
//! peer's uid and groups that the kernel reports for each connection.
//!
//! ```toml
//! [[access]]
//! users = ["orders", 1001]           # names (looked up in /etc/passwd at start) or numbers
//! groups = ["shop"]                  # the peer's primary or supplementary groups
//! publish = ["order.*"]              # type patterns (`*` matches any run of characters)
//! subscribe = ["order.*:inventory"]  # TYPE:GROUP patterns
//! admin = ["replay", "dead_letters", "schemas", "stats", "groups"]
//! ```
//!
//! A peer gets what every entry naming its uid or one of its groups grants, together. `replay`,
//! `dead_letters` and `groups` act on the (type, group)s that the same entry's `subscribe` allows,
//! `schemas` (registering) on the types its `publish` allows, `stats` on the whole daemon.
//! `hello` and `ping` are open to anyone who can open the socket; `ack`, `nack`, `extend` and
//! `unsubscribe` act on the connection's own subscriptions; reading schemas needs any entry.
//! Without `[[access]]` every peer may do everything (the socket's mode and group decide who
//! connects); with an empty list, nobody may do more than `ping`.

use std::sync::{Arc, RwLock};

use serde::Deserialize;

use super::{ConfigError, invalid};

/// Administrative rights an entry may grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admin {
    /// `replay`, `replay_cancel`, `replays`.
    Replay,
    /// `dlq_list`, `dlq_redrive`, `dlq_purge`.
    DeadLetters,
    /// `register_schema`.
    Schemas,
    /// `stats`.
    Stats,
    /// `groups`, `group_delete`, `group_reset`.
    Groups,
}

impl Admin {
    const ALL: [Admin; 5] = [Admin::Replay, Admin::DeadLetters, Admin::Schemas, Admin::Stats, Admin::Groups];

    /// Its name in the config file.
    pub fn name(self) -> &'static str {
        match self {
            Admin::Replay => "replay",
            Admin::DeadLetters => "dead_letters",
            Admin::Schemas => "schemas",
            Admin::Stats => "stats",
            Admin::Groups => "groups",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A name pattern: `*` matches any run of characters (none included); the rest literally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// Whether `s` matches.
    pub fn matches(&self, s: &str) -> bool {
        glob(self.0.as_bytes(), s.as_bytes())
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `*`-only glob matching, linear in practice (backtracks to the last star only).
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The identity of a connected peer, as the kernel gave it (`SO_PEERCRED`), with its
/// supplementary groups when the daemon could read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids (empty when the peer's process is not visible, e.g. in another
    /// container's pid namespace).
    pub groups: Vec<u32>,
    /// Process id, when the peer is in the daemon's pid namespace.
    pub pid: Option<i32>,
}

/// One `[[access]]` entry, checked and with names resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its position in the file (`access[i]`), for messages.
    pub index: usize,
    users: Vec<u32>,
    groups: Vec<u32>,
    publish: Vec<Pattern>,
    subscribe: Vec<(Pattern, Pattern)>,
    admin: u8,
}

impl Entry {
    fn names(&self, peer: &Peer) -> bool {
        self.users.contains(&peer.uid) || self.groups.iter().any(|g| *g == peer.gid || peer.groups.contains(g))
    }

    fn may_publish(&self, event_type: &str) -> bool {
        self.publish.iter().any(|p| p.matches(event_type))
    }

    fn may_subscribe(&self, event_type: &str, group: &str) -> bool {
        self.subscribe.iter().any(|(t, g)| t.matches(event_type) && g.matches(group))
    }

    fn has(&self, admin: Admin) -> bool {
        self.admin & admin.bit() != 0
    }
}

/// What an admin request acts on.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// A type (registering its schema).
    Type(&'a str),
    /// A type's group (replays, dead letters).
    Group(&'a str, &'a str),
    /// The whole daemon (stats), or any group at all (listing replays, whose rows are then
    /// filtered by [`AccessList::may_admin`] with each row's group).
    Any,
}

/// The `[[access]]` entries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessList {
    entries: Vec<Entry>,
}

impl AccessList {
    /// Whether any entry names the peer.
    pub fn admits(&self, peer: &Peer) -> bool {
        self.entries.iter().any(|e| e.names(peer))
    }

    /// Whether the peer may publish `event_type`.
    pub fn may_publish(&self, peer: &Peer, event_type: &str) -> bool {
        self.entries.iter().any(|e| e.names(peer) && e.may_publish(event_type))
    }

    /// Whether the peer may consume `event_type` as `group`.
    pub fn may_subscribe(&self, peer: &Peer, event_type: &str, group: &str) -> bool {
        self.entries.iter().any(|e| e.names(peer) && e.may_subscribe(event_type, group))
    }

    /// Whether the peer may do `admin` on `scope` (see the module's note on scopes).
    pub fn may_admin(&self, peer: &Peer, admin: Admin, scope: Scope<'_>) -> bool {
        self.entries.iter().any(|e| {
            e.names(peer)
                && e.has(admin)
                && match scope {
                    Scope::Type(t) => e.may_publish(t),
                    Scope::Group(t, g) => e.may_subscribe(t, g),
                    Scope::Any => true,
                }
        })
    }
}

/// The access list in force, shared by the daemon's parts and replaced on SIGHUP. `None`: no
/// `[[access]]` in the config, every peer may do everything.
#[derive(Debug, Clone, Default)]
pub struct LiveAccess(Arc<RwLock<Option<Arc<AccessList>>>>);

impl LiveAccess {
    /// A live list holding `list`.
    pub fn new(list: Option<AccessList>) -> LiveAccess {
        LiveAccess(Arc::new(RwLock::new(list.map(Arc::new))))
    }

    /// The list now.
    pub fn current(&self) -> Option<Arc<AccessList>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `other`'s list in force (a reload).
    pub fn replace_with(&self, other: &LiveAccess) {
        let next = other.current();
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = next;
    }
}

impl PartialEq for LiveAccess {
    fn eq(&self, other: &Self) -> bool {
        self.current() == other.current()
    }
}

/// An `[[access]]` table as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AccessDecl {
    #[serde(default)]
    users: Vec<toml::Value>,
    #[serde(default)]
    groups: Vec<toml::Value>,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    admin: Vec<String>,
}

/// Looks a name up in a `/etc/passwd`- or `/etc/group`-shaped text: the third field of the line
/// whose first field is `name`.
fn lookup(text: &str, name: &str) -> Option<u32> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(name)).then(|| f.nth(1).and_then(|id| id.trim().parse().ok())).flatten()
    })
}

/// The user database, read once per load.
pub(super) struct Names {
    passwd: String,
    group: String,
}

impl Names {
    /// `/etc/passwd` and `/etc/group` (missing files count as empty: numbers still work).
    pub(super) fn system() -> Names {
        Names {
            passwd: std::fs::read_to_string("/etc/passwd").unwrap_or_default(),
            group: std::fs::read_to_string("/etc/group").unwrap_or_default(),
        }
    }

    /// A uid from a number or a user name.
    fn user(&self, key: &str, v: &toml::Value) -> Result<u32, ConfigError> {
        id(key, v, |name| lookup(&self.passwd, name), "user", "/etc/passwd")
    }

    /// A gid from a number or a group name.
    pub(super) fn group(&self, key: &str, v: &toml::Value) -> Result<u32, ConfigError> {
        id(key, v, |name| lookup(&self.group, name), "group", "/etc/group")
    }
}

fn id(key: &str, v: &toml::Value, find: impl Fn(&str) -> Option<u32>, what: &str, db: &str) -> Result<u32, ConfigError> {
    match v {
        toml::Value::Integer(n) => u32::try_from(*n).map_err(|_| invalid(key, format!("{n} is not a {what} id"))),
        toml::Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().map_err(|_| invalid(key, format!("{s} is not a {what} id")))
        }
        toml::Value::String(s) => find(s).ok_or_else(|| {
            invalid(
                key,
                format!(
                    "no {what} named `{s}` in {db} (give its number for a {what} this host does not know, e.g. one of another container)"
                ),
            )
        }),
        other => Err(invalid(key, format!("{other} is neither a {what} name nor a number"))),
    }
}

/// Checks a type or group pattern: the name's alphabet, and `*`.
fn pattern(key: &str, s: &str, alphabet: fn(u8) -> bool, what: &str) -> Result<Pattern, ConfigError> {
    if s.is_empty() || s.len() > 128 || !s.bytes().all(|b| b == b'*' || alphabet(b)) {
        return Err(invalid(key, format!("`{s}` is not a {what} pattern: 1 to 128 characters of a {what} name, with `*` for any run")));
    }
    Ok(Pattern(s.to_owned()))
}

fn type_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
}

fn group_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"._-".contains(&b)
}

/// Checks the `[[access]]` tables and resolves their names.
pub(super) fn resolve(decls: Vec<AccessDecl>, names: &Names) -> Result<AccessList, ConfigError> {
    let mut entries = Vec::with_capacity(decls.len());
    for (index, d) in decls.into_iter().enumerate() {
        let at = |field: &str| format!("access[{index}].{field}");
        if d.users.is_empty() && d.groups.is_empty() {
            return Err(invalid(&format!("access[{index}]"), "names no users and no groups: give `users` or `groups`"));
        }
        let users = d.users.iter().map(|v| names.user(&at("users"), v)).collect::<Result<_, _>>()?;
        let groups = d.groups.iter().map(|v| names.group(&at("groups"), v)).collect::<Result<_, _>>()?;
        let publish = d.publish.iter().map(|s| pattern(&at("publish"), s, type_char, "type")).collect::<Result<_, _>>()?;
        let subscribe = d
            .subscribe
            .iter()
            .map(|s| {
                let (t, g) = s.split_once(':').ok_or_else(|| {
                    invalid(&at("subscribe"), format!("`{s}` is not TYPE:GROUP (e.g. `order.*:inventory`, or `*:*` for every group)"))
                })?;
                Ok((pattern(&at("subscribe"), t, type_char, "type")?, pattern(&at("subscribe"), g, group_char, "group")?))
            })
            .collect::<Result<_, ConfigError>>()?;
        let mut admin = 0u8;
        for a in &d.admin {
            admin |= match a.as_str() {
                "*" => Admin::ALL.iter().fold(0, |m, a| m | a.bit()),
                name => Admin::ALL.iter().find(|x| x.name() == name).map(|x| x.bit()).ok_or_else(|| {
                    invalid(&at("admin"), format!("`{name}` is not one of replay, dead_letters, schemas, stats (or `*` for all)"))
                })?,
            };
        }
        entries.push(Entry { index, users, groups, publish, subscribe, admin });
    }
    Ok(AccessList { entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names {
            passwd: "root:x:0:0:root:/root:/bin/bash\n# comment\norders:x:1001:1001::/home/orders:/bin/sh\n".into(),
            group: "root:x:0:\nshop:x:2000:orders,ana\n".into(),
        }
    }

    fn list(toml_text: &str) -> Result<AccessList, ConfigError> {
        #[derive(Deserialize)]
        struct F {
            access: Vec<AccessDecl>,
        }
        let f: F = toml::from_str(toml_text).unwrap();
        resolve(f.access, &names())
    }

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer { uid, gid, groups: groups.to_vec(), pid: None }
    }

    #[test]
    fn stars_match_any_run() {
        let p = |s: &str| Pattern(s.into());
        assert!(p("order.*").matches("order.created"));
        assert!(p("order.*").matches("order."));
        assert!(!p("order.*").matches("orders.created"));
        assert!(p("*").matches(""));
        assert!(p("*.created").matches("order.created"));
        assert!(p("a*b*c").matches("aXXbYYc"));
        assert!(!p("a*b*c").matches("aXXbYY"));
        assert!(p("exact").matches("exact") && !p("exact").matches("exactly"));
    }

    #[test]
    fn entries_grant_by_user_and_by_group_together() {
        let l = list(
            r#"
            [[access]]
            users = ["orders"]
            publish = ["order.*"]
            subscribe = ["payment.*:orders"]
            [[access]]
            groups = ["shop", 3000]
            subscribe = ["order.*:*"]
            admin = ["replay"]
            "#,
        )
        .unwrap();
        let orders = peer(1001, 1001, &[]);
        assert!(l.may_publish(&orders, "order.created"));
        assert!(!l.may_publish(&orders, "payment.settled"));
        assert!(l.may_subscribe(&orders, "payment.settled", "orders"));
        assert!(!l.may_subscribe(&orders, "order.created", "analytics"));
        // Its supplementary group 2000 (shop) adds the second entry.
        let orders_in_shop = peer(1001, 1001, &[2000]);
        assert!(l.may_subscribe(&orders_in_shop, "order.created", "analytics"));
        // A primary group counts too.
        let other = peer(5000, 3000, &[]);
        assert!(l.may_subscribe(&other, "order.x", "g") && !l.may_publish(&other, "order.x"));
        // Admin rights act on the entry's own subscribe patterns.
        assert!(l.may_admin(&other, Admin::Replay, Scope::Group("order.created", "analytics")));
        assert!(!l.may_admin(&other, Admin::Replay, Scope::Group("payment.settled", "orders")));
        assert!(!l.may_admin(&orders, Admin::Replay, Scope::Group("payment.settled", "orders")), "the orders entry has no admin");
        assert!(!l.may_admin(&other, Admin::DeadLetters, Scope::Any));
        let stranger = peer(7, 7, &[]);
        assert!(!l.admits(&stranger) && l.admits(&orders));
    }

    #[test]
    fn mistakes_name_their_place() {
        let e = |t: &str| list(t).unwrap_err().to_string();
        assert_eq!(e("[[access]]\npublish = [\"x\"]"), "invalid config: access[0]: names no users and no groups: give `users` or `groups`");
        assert!(
            e("[[access]]\nusers = [\"nobody-here\"]")
                .starts_with("invalid config: access[0].users: no user named `nobody-here` in /etc/passwd")
        );
        assert!(
            e("[[access]]\nusers = [0]\nsubscribe = [\"order.*\"]")
                .starts_with("invalid config: access[0].subscribe: `order.*` is not TYPE:GROUP")
        );
        assert!(
            e("[[access]]\nusers = [0]\npublish = [\"Order.*\"]")
                .starts_with("invalid config: access[0].publish: `Order.*` is not a type pattern")
        );
        assert!(e("[[access]]\nusers = [0]\nadmin = [\"dlq\"]").starts_with("invalid config: access[0].admin: `dlq` is not one of"));
        assert!(e("[[access]]\nusers = [-1]").starts_with("invalid config: access[0].users: -1 is not a user id"));
    }

    #[test]
    fn numbers_names_and_star_admin() {
        let l = list("[[access]]\nusers = [\"0\", 1001]\nadmin = [\"*\"]\n").unwrap();
        for a in Admin::ALL {
            assert!(l.may_admin(&peer(0, 0, &[]), a, Scope::Any));
        }
        assert!(l.may_admin(&peer(1001, 1, &[]), Admin::Stats, Scope::Any));
        // Scoped rights need the scope: no publish or subscribe patterns, no schema or group.
        assert!(!l.may_admin(&peer(0, 0, &[]), Admin::Schemas, Scope::Type("order.created")));
    }
}
