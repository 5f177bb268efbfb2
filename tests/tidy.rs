//! The rules of the code's shape that ARCHITECTURE.md states, checked on every test run: the
//! layers call only downward, each backend's driver stays in its backend, wire codes stay in the
//! front, no module depends on itself through others, long functions say why, and the code map
//! lists every file.
//!
//! It reads the sources as text. Comments and the contents of string and character literals are
//! blanked first (keeping line numbers), so a word in a comment or a message never counts as a
//! use; SQL is looked for in the string literals themselves.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A Rust source file, read and lexed.
struct Source {
    /// Relative to the repository, with `/`.
    path: String,
    /// The module path inside its crate (`["bus", "deliver", "worker"]`; `[]` for the root).
    module: Vec<String>,
    /// The file with comments and literal contents replaced by spaces.
    code: String,
    /// The file as written.
    text: String,
    /// Every string literal's contents, with its 1-based line.
    strings: Vec<(usize, String)>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(&p, ext, out);
        } else if p.extension().is_some_and(|e| e == ext) {
            out.push(p);
        }
    }
}

/// Blanks comments and literal contents. Handles nested block comments, raw strings
/// (`r#"…"#`), byte strings, and tells a character literal from a lifetime.
fn lex(text: &str) -> (String, Vec<(usize, String)>) {
    let b = text.as_bytes();
    let mut code = b.to_vec();
    let mut strings = Vec::new();
    let line_of = |i: usize| b[..i].iter().filter(|&&c| c == b'\n').count() + 1;
    let blank = |code: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut code[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == b'/' && next == Some(b'/') {
            let end = b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |n| i + n);
            blank(&mut code, i, end);
            i = end;
        } else if c == b'/' && next == Some(b'*') {
            let (mut depth, mut j) = (1, i + 2);
            while j < b.len() && depth > 0 {
                if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                    depth += 1;
                    j += 2;
                } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            blank(&mut code, i, j);
            i = j;
        } else if (c == b'r' || (c == b'b' && next == Some(b'r')))
            && !b[..i].last().is_some_and(|p| p.is_ascii_alphanumeric() || *p == b'_')
            && {
                let s = if c == b'b' { i + 2 } else { i + 1 };
                let hashes = b[s..].iter().take_while(|&&c| c == b'#').count();
                b.get(s + hashes) == Some(&b'"')
            }
        {
            let s = if c == b'b' { i + 2 } else { i + 1 };
            let hashes = b[s..].iter().take_while(|&&c| c == b'#').count();
            let open = s + hashes + 1;
            let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
            let end = (open..b.len()).find(|&j| b[j..].starts_with(&close)).unwrap_or(b.len());
            strings.push((line_of(open), String::from_utf8_lossy(&b[open..end]).into_owned()));
            blank(&mut code, open, end);
            i = end + close.len();
        } else if c == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            strings.push((line_of(i), String::from_utf8_lossy(&b[i + 1..j.min(b.len())]).into_owned()));
            blank(&mut code, i + 1, j.min(b.len()));
            i = j + 1;
        } else if c == b'\'' {
            // A character literal closes within a few bytes ('a', '\n', '\u{1F600}', 'é');
            // a lifetime or a label does not.
            let end = if next == Some(b'\\') {
                b[i + 2..].iter().position(|&c| c == b'\'').map(|n| i + 2 + n)
            } else {
                (i + 2..(i + 6).min(b.len())).find(|&j| b[j] == b'\'')
            };
            match end {
                Some(e) if next != Some(b'\'') => {
                    blank(&mut code, i + 1, e);
                    i = e + 1;
                }
                _ => i += 1,
            }
        } else {
            i += 1;
        }
    }
    (String::from_utf8(code).expect("blanking keeps UTF-8 boundaries of ASCII delimiters"), strings)
}

/// The module path of `file` inside the crate whose sources are under `src`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_owned());
    }
    parts
}

fn sources(krate: &str) -> Vec<Source> {
    let src = root().join(krate).join("src");
    let mut paths = Vec::new();
    files(&src, "rs", &mut paths);
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let (code, strings) = lex(&text);
            let path = p.strip_prefix(root()).unwrap().to_string_lossy().replace('\\', "/");
            Source { module: module_of(&src, &p), path, code, text, strings }
        })
        .collect()
}

fn daemon() -> Vec<Source> {
    sources("")
}

/// Whether the file is test code (a `tests.rs`, or test support under `src`).
fn is_test_file(s: &Source) -> bool {
    s.module.last().is_some_and(|m| m == "tests")
}

/// Byte ranges of `#[cfg(test)]` items (their braces), so the checks can skip them.
fn test_ranges(code: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (at, _) in code.match_indices("#[cfg(test)]") {
        if let Some(open) = code[at..].find('{').map(|n| at + n) {
            out.push((at, matching(code, open)));
        }
    }
    out
}

/// The index of the brace closing the one at `open`.
fn matching(code: &str, open: usize) -> usize {
    let mut depth = 0usize;
    for (i, c) in code[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return open + i;
                }
            }
            _ => {}
        }
    }
    code.len()
}

fn line_at(code: &str, at: usize) -> usize {
    code[..at].matches('\n').count() + 1
}

/// A path the file names: its segments (a `use` tree expanded; `as` renames dropped, the
/// name it binds kept apart) and its line.
struct PathRef {
    segs: Vec<String>,
    /// For a `use`: the name it brings into scope.
    binds: Option<String>,
    line: usize,
}

/// Every path in the file's production code: each leaf of each `use` tree, and each chain
/// `a::b::c` outside them.
fn paths(s: &Source) -> Vec<PathRef> {
    let tests = test_ranges(&s.code);
    let in_tests = |at: usize| tests.iter().any(|(a, b)| (*a..=*b).contains(&at));
    let bytes = s.code.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = Vec::new();
    let mut use_ranges = Vec::new();
    for (at, _) in s.code.match_indices("use ") {
        if in_tests(at) || (at > 0 && ident(bytes[at - 1])) {
            continue;
        }
        let end = s.code[at..].find(';').map_or(s.code.len(), |n| at + n);
        use_ranges.push((at, end));
        for path in expand(s.code[at + 4..end].trim()) {
            let (path, rename) = match path.split_once(" as ") {
                Some((p, r)) => (p.to_owned(), Some(r.trim().to_owned())),
                None => (path, None),
            };
            let segs: Vec<String> = path.split("::").map(|x| x.trim().to_owned()).filter(|x| !x.is_empty()).collect();
            let Some(last) = segs.last() else { continue };
            let binds =
                rename.or_else(|| if last == "self" { segs.len().checked_sub(2).map(|i| segs[i].clone()) } else { Some(last.clone()) });
            let segs = segs.into_iter().filter(|x| x != "self" || path.starts_with("self")).collect();
            out.push(PathRef { segs, binds, line: line_at(&s.code, at) });
        }
    }
    for (at, _) in s.code.match_indices("::") {
        let mut start = at;
        while start > 0 && ident(bytes[start - 1]) {
            start -= 1;
        }
        // Only the first `::` of a chain starts a path.
        if (start >= 2 && &s.code[start - 2..start] == "::") || in_tests(at) || use_ranges.iter().any(|(a, b)| (*a..=*b).contains(&at)) {
            continue;
        }
        let chain = s.code[start..].split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).next().unwrap_or("");
        let segs = chain.split("::").filter(|x| !x.is_empty()).map(str::to_owned).collect();
        out.push(PathRef { segs, binds: None, line: line_at(&s.code, at) });
    }
    out
}

/// The modules this file uses: its paths that start at `crate`, `super`, `self` or a module a
/// `use` brought in, each resolved to the deepest module of `modules` it reaches.
fn references(s: &Source, modules: &BTreeSet<Vec<String>>) -> BTreeMap<Vec<String>, usize> {
    // The module a path reaches, and whether every segment was a module.
    let resolve = |segs: &[String], aliases: &BTreeMap<String, Vec<String>>| -> Option<(Vec<String>, bool)> {
        let (first, rest) = segs.split_first()?;
        let mut at = match first.as_str() {
            "crate" => vec![],
            "super" => s.module[..s.module.len().saturating_sub(1)].to_vec(),
            "self" => s.module.clone(),
            other => aliases.get(other)?.clone(),
        };
        for (i, seg) in rest.iter().enumerate() {
            if seg == "super" {
                at.pop();
                continue;
            }
            let mut deeper = at.clone();
            deeper.push(seg.clone());
            if !modules.contains(&deeper) {
                return Some((at, i == rest.len()));
            }
            at = deeper;
        }
        Some((at, true))
    };
    let all = paths(s);
    let mut aliases = BTreeMap::new();
    for p in all.iter().filter(|p| p.binds.is_some()) {
        if let Some((m, true)) = resolve(&p.segs, &aliases) {
            aliases.insert(p.binds.clone().unwrap(), m);
        }
    }
    let mut out = BTreeMap::new();
    for p in &all {
        if let Some((m, _)) = resolve(&p.segs, &aliases) {
            out.entry(m).or_insert(p.line);
        }
    }
    out
}

/// The lines where a path starts at the external crate `krate` (not at a module of ours that a
/// `use` named the same).
fn crate_uses(s: &Source, modules: &BTreeSet<Vec<String>>, krate: &str) -> Vec<usize> {
    let all = paths(s);
    let child = [s.module.clone(), vec![krate.to_owned()]].concat();
    let shadowed = modules.contains(&child)
        || all
            .iter()
            .any(|p| p.binds.as_deref() == Some(krate) && p.segs.first().is_some_and(|f| matches!(f.as_str(), "crate" | "super" | "self")));
    if shadowed {
        return all.iter().filter(|p| p.binds.is_some() && p.segs.first().is_some_and(|f| f == krate)).map(|p| p.line).collect();
    }
    all.iter().filter(|p| p.segs.first().is_some_and(|f| f == krate)).map(|p| p.line).collect()
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into paths (`a::b`, `a::c::d`, `a::c::e`).
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else { return vec![tree.to_owned()] };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut parts = Vec::new();
    let (mut depth, mut from) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[from..]);
    parts.into_iter().filter(|p| !p.trim().is_empty()).flat_map(|p| expand(&format!("{prefix}{}", p.trim()))).collect()
}

/// The layer of a module of the daemon: 0 the shared leaves, 1 backends, 2 bus, 3 front,
/// 4 the command line; `None` for the crate root, which wires them together.
fn layer(module: &[String]) -> Option<u8> {
    match module.first().map(String::as_str) {
        None => None,
        Some("lock" | "config") => Some(0),
        Some("backend") => Some(1),
        Some("bus") => Some(2),
        Some("front") => Some(3),
        Some("cli") => Some(4),
        Some(other) => panic!("src/{other} belongs to no layer: add it to ARCHITECTURE.md and to tidy.rs"),
    }
}

fn layer_name(l: u8) -> &'static str {
    ["lock/config", "backend", "bus", "front", "cli"][l as usize]
}

#[test]
fn layers_call_only_downward() {
    let sources = daemon();
    let modules: BTreeSet<Vec<String>> = sources.iter().map(|s| s.module.clone()).collect();
    let mut bad = Vec::new();
    for s in &sources {
        let Some(from) = layer(&s.module) else { continue };
        for (target, line) in references(s, &modules) {
            if let Some(to) = layer(&target)
                && to > from
            {
                bad.push(format!(
                    "{}:{line}: the {} layer uses crate::{} ({})",
                    s.path,
                    layer_name(from),
                    target.join("::"),
                    layer_name(to)
                ));
            }
        }
    }
    assert!(bad.is_empty(), "upward imports:\n{}", bad.join("\n"));
}

/// Within every module, its children depend on one another without a cycle (a child using its
/// parent, or a parent its child, is the module tree itself and does not count).
fn module_cycles(sources: &[Source]) -> Vec<String> {
    let modules: BTreeSet<Vec<String>> = sources.iter().map(|s| s.module.clone()).collect();
    // parent -> (child -> children it depends on)
    let mut edges: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    let mut why: BTreeMap<(Vec<String>, String, String), String> = BTreeMap::new();
    for s in sources {
        for (target, line) in references(s, &modules) {
            let common = s.module.iter().zip(&target).take_while(|(a, b)| a == b).count();
            if common == s.module.len() || common == target.len() {
                continue;
            }
            let parent = s.module[..common].to_vec();
            let (a, b) = (s.module[common].clone(), target[common].clone());
            why.entry((parent.clone(), a.clone(), b.clone())).or_insert(format!("{}:{line}", s.path));
            edges.entry(parent).or_default().entry(a).or_default().insert(b);
        }
    }
    let mut cycles = Vec::new();
    for (parent, graph) in &edges {
        // Depth-first search for a back edge.
        fn visit(
            n: &str,
            graph: &BTreeMap<String, BTreeSet<String>>,
            state: &mut BTreeMap<String, u8>,
            stack: &mut Vec<String>,
        ) -> Option<Vec<String>> {
            state.insert(n.to_owned(), 1);
            stack.push(n.to_owned());
            for m in graph.get(n).into_iter().flatten() {
                match state.get(m.as_str()).copied().unwrap_or(0) {
                    1 => {
                        let from = stack.iter().position(|x| x == m).unwrap();
                        let mut cycle = stack[from..].to_vec();
                        cycle.push(m.clone());
                        return Some(cycle);
                    }
                    0 => {
                        if let Some(c) = visit(m, graph, state, stack) {
                            return Some(c);
                        }
                    }
                    _ => {}
                }
            }
            stack.pop();
            state.insert(n.to_owned(), 2);
            None
        }
        let mut state = BTreeMap::new();
        for n in graph.keys() {
            if state.get(n.as_str()).copied().unwrap_or(0) == 0
                && let Some(cycle) = visit(n, graph, &mut state, &mut vec![])
            {
                let steps: Vec<String> = cycle
                    .windows(2)
                    .map(|w| format!("{} -> {} ({})", w[0], w[1], why[&(parent.clone(), w[0].clone(), w[1].clone())]))
                    .collect();
                cycles.push(format!("in crate::{}: {}", parent.join("::"), steps.join(", ")));
                break; // one cycle per module is enough to act on
            }
        }
    }
    cycles
}

#[test]
fn no_module_cycles() {
    let mut cycles = module_cycles(&daemon());
    cycles.extend(module_cycles(&sources("protocol")).into_iter().map(|c| format!("protocol: {c}")));
    assert!(cycles.is_empty(), "module cycles:\n{}", cycles.join("\n"));
}

/// The lines where `word` appears in the code (not a comment or literal) as a whole identifier.
fn uses(code: &str, word: &str) -> Vec<usize> {
    let b = code.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    code.match_indices(word)
        .filter(|(at, _)| !((*at > 0 && ident(b[*at - 1])) || b.get(at + word.len()).is_some_and(|&c| ident(c))))
        .map(|(at, _)| line_at(code, at))
        .collect()
}

#[test]
fn drivers_and_wire_codes_stay_in_their_layer() {
    let mut bad = Vec::new();
    let sources = daemon();
    let modules: BTreeSet<Vec<String>> = sources.iter().map(|s| s.module.clone()).collect();
    for s in &sources {
        let inside = |dir: &str| s.path.starts_with(dir);
        for line in crate_uses(s, &modules, "sqlx") {
            if !inside("src/backend/pg/") {
                bad.push(format!("{}:{line}: sqlx outside src/backend/pg", s.path));
            }
        }
        for line in crate_uses(s, &modules, "redis") {
            if !inside("src/backend/redis/") {
                bad.push(format!("{}:{line}: the redis crate outside src/backend/redis", s.path));
            }
        }
        for line in uses(&s.code, "ErrorCode") {
            if !inside("src/front/") {
                bad.push(format!("{}:{line}: ErrorCode outside src/front", s.path));
            }
        }
        for line in uses(&s.code, "WireError") {
            if !inside("src/front/") {
                bad.push(format!("{}:{line}: WireError outside src/front", s.path));
            }
        }
        if !inside("src/backend/pg/") {
            for (line, lit) in &s.strings {
                let upper = lit.trim_start().to_ascii_uppercase();
                let sql = ["SELECT ", "INSERT INTO ", "DELETE FROM ", "CREATE TABLE ", "ALTER TABLE "].iter().any(|k| upper.starts_with(k))
                    || (upper.starts_with("UPDATE ") && upper.contains(" SET "));
                if sql {
                    bad.push(format!("{}:{line}: SQL outside src/backend/pg: {lit:.60}", s.path));
                }
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Most lines a production function may have without a comment saying why.
const MAX_FN_LINES: usize = 100;

#[test]
fn long_functions_say_why() {
    let mut bad = Vec::new();
    let mut sources = daemon();
    sources.extend(self::sources("protocol"));
    for s in sources.iter().filter(|s| !is_test_file(s)) {
        let tests = test_ranges(&s.code);
        let lines: Vec<&str> = s.text.lines().collect();
        let bytes = s.code.as_bytes();
        for (at, _) in s.code.match_indices("fn ") {
            if (at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_'))
                || tests.iter().any(|(a, b)| (*a..=*b).contains(&at))
            {
                continue;
            }
            // The body: the first `{` before any `;` (a declaration without a body has none).
            let Some(open) = s.code[at..].find(['{', ';']).map(|n| at + n).filter(|&o| bytes[o] == b'{') else { continue };
            let (first, last) = (line_at(&s.code, at), line_at(&s.code, matching(&s.code, open)));
            if last - first < MAX_FN_LINES {
                continue;
            }
            // The comments and attributes just above the function.
            let said = lines[..first - 1]
                .iter()
                .rev()
                .take_while(|l| {
                    let t = l.trim_start();
                    t.starts_with("//") || t.starts_with("#[")
                })
                .any(|l| l.to_ascii_lowercase().contains("long because"));
            if !said {
                bad.push(format!(
                    "{}:{first}: a function of {} lines without a comment saying why (\"// Long because …\")",
                    s.path,
                    last - first + 1
                ));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn the_code_map_lists_every_file() {
    let doc = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let mut all = Vec::new();
    for dir in ["src", "protocol/src", "migrations"] {
        for ext in ["rs", "lua", "sql"] {
            files(&root().join(dir), ext, &mut all);
        }
    }
    let mut missing = Vec::new();
    for p in &all {
        let rel = p.strip_prefix(root()).unwrap().to_string_lossy().replace('\\', "/");
        if !doc.contains(&format!("`{rel}`")) {
            missing.push(rel);
        }
    }
    assert!(missing.is_empty(), "ARCHITECTURE.md's code map does not list:\n{}", missing.join("\n"));
    // And names no file that is gone.
    let mut gone = Vec::new();
    for piece in doc.split('`').skip(1).step_by(2) {
        let looks_like_file = (piece.starts_with("src/") || piece.starts_with("protocol/src/") || piece.starts_with("migrations/"))
            && [".rs", ".lua", ".sql"].iter().any(|e| piece.ends_with(e));
        if looks_like_file && !root().join(piece).exists() {
            gone.push(piece.to_owned());
        }
    }
    assert!(gone.is_empty(), "ARCHITECTURE.md names files that do not exist:\n{}", gone.join("\n"));
}

#[test]
fn the_lexer_blanks_comments_and_literals() {
    let (code, strings) =
        lex("let a = \"x // y\"; // sqlx\nlet b = r#\"SELECT \"q\"\"#; /* redis:: /* nested */ */ let c = '{'; fn f<'a>() {}");
    assert!(!code.contains("sqlx") && !code.contains("redis") && !code.contains("SELECT") && !code.contains("'{'"), "{code}");
    assert!(code.contains("fn f<'a>() {}"), "{code}");
    assert_eq!(strings.iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>(), ["x // y", "SELECT \"q\""]);
    assert_eq!(expand("crate::a::{b, c::{d, e as f}}"), ["crate::a::b", "crate::a::c::d", "crate::a::c::e as f"]);
}
