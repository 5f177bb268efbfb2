//! Throwaway users and groups for the access-list tests, created with `groupadd` and `useradd`
//! (the tests run as root, here and in CI) once per test binary and removed when it ends (by
//! the watchdog, however it ends); and commands run as one of them with `setpriv`.

use std::process::Command;
use std::sync::OnceLock;

use super::servers::{at_exit, is_root};

/// A group.
#[derive(Debug, Clone)]
pub struct Group {
    /// Its name.
    pub name: String,
    /// Its id.
    pub gid: u32,
}

/// A user.
#[derive(Debug, Clone)]
pub struct User {
    /// Its name.
    pub name: String,
    /// Its id.
    pub uid: u32,
    /// Its primary group.
    pub gid: u32,
}

/// The cast of the access-list tests: `alice` (her own primary group; `shop` given as a
/// supplementary group by the test), `bob` (primary group `ops`), `carol` (her own group, named
/// by no access entry), `dave` (not in the socket's group); `sock` is the socket's group.
pub struct Cast {
    /// A publisher.
    pub alice: User,
    /// An operator, by his primary group.
    pub bob: User,
    /// A stranger to the access list.
    pub carol: User,
    /// A stranger to the socket.
    pub dave: User,
    /// Operators.
    pub ops: Group,
    /// A group alice can be given.
    pub shop: Group,
    /// The socket's group.
    pub sock: Group,
}

fn run(cmd: &mut Command) {
    // useradd and groupadd take a lock on /etc/passwd; another process may hold it a moment.
    for attempt in 0..50 {
        let out = cmd.output().expect("run useradd/groupadd (are the passwd tools installed?)");
        if out.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains("lock") && attempt < 49, "{cmd:?} failed: {err}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn id_of(db: &str, name: &str, field: usize) -> u32 {
    let out = Command::new("getent").args([db, name]).output().expect("getent");
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    line.trim().split(':').nth(field).and_then(|f| f.parse().ok()).unwrap_or_else(|| panic!("no {db} entry for {name}: {line}"))
}

fn group(name: String) -> Group {
    run(Command::new("groupadd").args(["--system", &name]));
    at_exit(&format!("groupdel {name}"));
    let gid = id_of("group", &name, 2);
    Group { name, gid }
}

fn user(name: String, primary: Option<&Group>) -> User {
    let mut cmd = Command::new("useradd");
    cmd.args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]);
    match primary {
        Some(g) => cmd.args(["--gid", &g.name]),
        None => cmd.arg("--user-group"),
    };
    run(cmd.arg(&name));
    // userdel removes the user's own group too.
    at_exit(&format!("userdel {name}"));
    User { uid: id_of("passwd", &name, 2), gid: id_of("passwd", &name, 3), name }
}

/// The cast, created on first use; `None` when this process is not root (the caller says the
/// test needs root and returns).
pub fn cast() -> Option<&'static Cast> {
    static CAST: OnceLock<Option<Cast>> = OnceLock::new();
    CAST.get_or_init(|| {
        if !is_root() {
            return None;
        }
        let p = std::process::id() % 100_000;
        let (ops, shop, sock) = (group(format!("sb{p}ops")), group(format!("sb{p}shop")), group(format!("sb{p}sock")));
        Some(Cast {
            alice: user(format!("sb{p}alice"), None),
            bob: user(format!("sb{p}bob"), Some(&ops)),
            carol: user(format!("sb{p}carol"), None),
            dave: user(format!("sb{p}dave"), None),
            ops,
            shop,
            sock,
        })
    })
    .as_ref()
}

/// `program args…` run as `user` with its primary group and exactly the supplementary
/// `groups` (none: `--clear-groups`).
pub fn as_user(user: &User, groups: &[&Group], program: &str, args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={}", user.uid)).arg(format!("--regid={}", user.gid));
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        c.arg(format!("--groups={}", groups.iter().map(|g| g.gid.to_string()).collect::<Vec<_>>().join(",")));
    }
    c.arg(program).args(args);
    c
}
