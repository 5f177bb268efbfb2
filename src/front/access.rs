//! Who may use the socket, at run time: each connection's peer as the kernel reports it (uid,
//! gid and pid from `SO_PEERCRED`; the supplementary groups from `/proc/<pid>/status` when that
//! process is visible), the connections each uid holds (`max_connections_per_uid`), and every
//! request checked against the access list in force (`config::access`, replaced on SIGHUP). A
//! refused request is answered `unauthorized` naming what was refused, counted
//! (`unauthorized`), and logged with the uid once per connection and thing refused.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use sidebus_protocol::request::Request;
use tokio::net::UnixStream;

use crate::bus::counters::{COUNTERS, add};
use crate::config::access::{AccessList, Admin, LiveAccess, Peer, Scope};
use crate::front::error::RequestError;
use crate::lock::lock;

/// Most distinct refusals logged per connection (a client refused in a loop logs once).
const MAX_LOGGED: usize = 64;

/// The peer of a connection: its credentials, with its supplementary groups when its process
/// is in the daemon's pid namespace (not across containers of a pod: then only its uid and
/// primary group count).
pub(crate) fn peer_of(stream: &UnixStream) -> std::io::Result<Peer> {
    let cred = stream.peer_cred()?;
    let pid = cred.pid().filter(|p| *p > 0);
    let groups = pid.map(supplementary_groups).unwrap_or_default();
    Ok(Peer { uid: cred.uid(), gid: cred.gid(), groups, pid })
}

/// The `Groups:` line of `/proc/<pid>/status` (empty when unreadable). A process can only
/// drop supplementary groups, not gain them, so this is at most what it had when it connected.
fn supplementary_groups(pid: i32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return vec![] };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| g.split_whitespace().filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default()
}

/// How many connections each uid holds.
pub(crate) struct PerUid {
    max: usize,
    held: Mutex<HashMap<u32, usize>>,
}

/// One connection of a uid; dropping it gives the place back.
pub(crate) struct UidSlot {
    counts: Arc<PerUid>,
    uid: u32,
}

impl PerUid {
    /// At most `max` connections per uid.
    pub(crate) fn new(max: usize) -> Arc<PerUid> {
        Arc::new(PerUid { max, held: Mutex::new(HashMap::new()) })
    }

    /// A place for one more connection of `uid`, if it holds fewer than the maximum.
    pub(crate) fn take(self: &Arc<Self>, uid: u32) -> Option<UidSlot> {
        let mut held = lock(&self.held);
        let n = held.entry(uid).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(UidSlot { counts: self.clone(), uid })
    }

    /// The maximum.
    pub(crate) fn max(&self) -> usize {
        self.max
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut held = lock(&self.counts.held);
        if let Some(n) = held.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.uid);
            }
        }
    }
}

/// The replays a connection may see and cancel, or the groups it may list: those the access
/// list lets it replay to (or administer, for `groups`); every one without a list.
#[derive(Clone)]
pub(crate) struct ReplayScope {
    list: Arc<AccessList>,
    peer: Peer,
    admin: Admin,
}

impl ReplayScope {
    /// Whether `event_type`'s `group` is in scope.
    pub(crate) fn allows(&self, event_type: &str, group: &str) -> bool {
        self.list.may_admin(&self.peer, self.admin, Scope::Group(event_type, group))
    }

    /// The refusal of a replay out of scope.
    pub(crate) fn refuse(&self, what: String) -> RequestError {
        add(&COUNTERS.unauthorized, 1);
        tracing::warn!(uid = self.peer.uid, gid = self.peer.gid, "refused: uid {} may not {what}", self.peer.uid);
        RequestError::Unauthorized { uid: self.peer.uid, what, named: true }
    }
}

/// A connection's checks.
pub(crate) struct Guard {
    peer: Peer,
    live: LiveAccess,
    logged: HashSet<String>,
}

impl Guard {
    /// The checks of `peer`'s connection against the list in force.
    pub(crate) fn new(peer: Peer, live: LiveAccess) -> Guard {
        Guard { peer, live, logged: HashSet::new() }
    }

    /// The peer.
    pub(crate) fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Whether the peer may make `request`; for `replays`, `replay_cancel` and `groups`, also
    /// the scope their op filters with (`None` without an access list: everything).
    pub(crate) fn check(&mut self, request: &Request) -> Result<Option<ReplayScope>, RequestError> {
        let Some(list) = self.live.current() else { return Ok(None) };
        let p = &self.peer;
        let group = |t: &str, g: &str| format!("{t} as group {g}");
        let refused = match request {
            // Open to anyone who can open the socket, or acting on the connection's own.
            Request::Hello { .. }
            | Request::Ping
            | Request::Ack { .. }
            | Request::Nack(_)
            | Request::Extend { .. }
            | Request::Unsubscribe { .. } => None,
            Request::Publish(x) => (!list.may_publish(p, &x.event_type)).then(|| format!("publish {}", x.event_type)),
            Request::Subscribe(s) => {
                (!list.may_subscribe(p, &s.event_type, &s.group)).then(|| format!("consume {}", group(&s.event_type, &s.group)))
            }
            Request::RegisterSchema(r) => (!list.may_admin(p, Admin::Schemas, Scope::Type(&r.event_type)))
                .then(|| format!("register a schema for {} (admin `schemas`)", r.event_type)),
            Request::GetSchema { .. } | Request::ListSchemas => (!list.admits(p)).then(|| "read schemas".to_owned()),
            Request::Replay(r) => (!list.may_admin(p, Admin::Replay, Scope::Group(&r.event_type, &r.group)))
                .then(|| format!("replay {} (admin `replay`)", group(&r.event_type, &r.group))),
            Request::ReplayCancel { .. } | Request::Replays { .. } => {
                (!list.may_admin(p, Admin::Replay, Scope::Any)).then(|| "see or cancel replays (admin `replay`)".to_owned())
            }
            Request::DlqList(l) => (!list.may_admin(p, Admin::DeadLetters, Scope::Group(&l.event_type, &l.group)))
                .then(|| format!("read the dead letters of {} (admin `dead_letters`)", group(&l.event_type, &l.group))),
            Request::DlqRedrive(a) | Request::DlqPurge(a) => {
                (!list.may_admin(p, Admin::DeadLetters, Scope::Group(&a.event_type, &a.group)))
                    .then(|| format!("redrive or purge the dead letters of {} (admin `dead_letters`)", group(&a.event_type, &a.group)))
            }
            Request::Stats => (!list.may_admin(p, Admin::Stats, Scope::Any)).then(|| "read stats (admin `stats`)".to_owned()),
            Request::Groups { .. } => (!list.may_admin(p, Admin::Groups, Scope::Any)).then(|| "list groups (admin `groups`)".to_owned()),
            Request::GroupDelete(d) => (!list.may_admin(p, Admin::Groups, Scope::Group(&d.event_type, &d.group)))
                .then(|| format!("delete the group {} (admin `groups`)", group(&d.event_type, &d.group))),
            Request::GroupReset(r) => (!list.may_admin(p, Admin::Groups, Scope::Group(&r.event_type, &r.group)))
                .then(|| format!("reset the group {} (admin `groups`)", group(&r.event_type, &r.group))),
        };
        if let Some(what) = refused {
            return Err(self.refuse(request.op(), what, list.admits(&self.peer)));
        }
        let admin = match request {
            Request::ReplayCancel { .. } | Request::Replays { .. } => Admin::Replay,
            Request::Groups { .. } => Admin::Groups,
            _ => return Ok(None),
        };
        Ok(Some(ReplayScope { list, peer: self.peer.clone(), admin }))
    }

    fn refuse(&mut self, op: &str, what: String, named: bool) -> RequestError {
        add(&COUNTERS.unauthorized, 1);
        if self.logged.len() < MAX_LOGGED && self.logged.insert(what.clone()) {
            let p = &self.peer;
            tracing::warn!(uid = p.uid, gid = p.gid, pid = p.pid.unwrap_or(0), op, "refused: uid {} may not {what}", p.uid);
        }
        RequestError::Unauthorized { uid: self.peer.uid, what, named }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_holds_at_most_max_connections() {
        let per = PerUid::new(2);
        let a = per.take(1000).unwrap();
        let _b = per.take(1000).unwrap();
        assert!(per.take(1000).is_none());
        assert!(per.take(1001).is_some(), "another uid has its own count");
        drop(a);
        assert!(per.take(1000).is_some(), "a closed connection gives its place back");
    }

    #[test]
    fn this_process_has_its_groups_read() {
        let groups = supplementary_groups(std::process::id() as i32);
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
        assert_eq!(groups.len(), line.split_whitespace().count() - 1);
        assert!(supplementary_groups(i32::MAX).is_empty());
    }
}
