//! The layering of docs/ARCHITECTURE.md, checked on the source: no module
//! imports from a layer above its own, and the layers below the server know
//! nothing of sockets. Fails naming the file, the line and the rule.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests and benches fail loudly

use std::path::{Path, PathBuf};

/// The layers, bottom up, and what each may use of the crate.
const LAYERS: &[(&str, &[&str])] = &[
    ("sync", &[]),
    ("log", &["sync"]),
    ("protocol", &["log", "sync"]),
    ("net", &["protocol", "sync"]),
    ("tls", &[]),
    ("broker", &["log", "protocol", "sync"]),
    (
        "server",
        &["broker", "log", "protocol", "net", "tls", "sync"],
    ),
    ("kafka", &["broker", "log", "protocol", "tls", "sync"]),
    ("client", &["log", "protocol", "net", "tls", "sync"]),
];

/// Paths that mean sockets or wire I/O: only the server, the client and
/// the shared network helpers may use them.
const SOCKET_PATHS: &[&str] = &["tokio::net", "tokio::io", "std::net::Tcp", "axum"];
const SOCKET_FREE: &[&str] = &["sync", "log", "protocol", "broker"];

/// The layer a source file belongs to (`None`: the binary and lib.rs,
/// which may use everything).
fn layer_of(path: &Path, src: &Path) -> Option<&'static str> {
    let rel = path.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    LAYERS.iter().map(|(l, _)| *l).find(|l| *l == name)
}

/// Every violation in one file's text: (line number, what it uses, rule).
fn violations(layer: &str, text: &str) -> Vec<(usize, String, &'static str)> {
    let allowed = LAYERS
        .iter()
        .find(|(l, _)| *l == layer)
        .map(|(_, a)| *a)
        .unwrap_or(&[]);
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let tail = &rest[at + "crate::".len()..];
            let module: String = tail
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if module != layer
                && !allowed.contains(&module.as_str())
                && LAYERS.iter().any(|(l, _)| *l == module)
            {
                found.push((n + 1, format!("crate::{module}"), "imports a layer above"));
            }
            rest = tail;
        }
        if SOCKET_FREE.contains(&layer) {
            for p in SOCKET_PATHS {
                if code.contains(p) {
                    found.push((n + 1, (*p).to_owned(), "uses sockets below the server"));
                }
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_imports_a_layer_above_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut checked = 0;
    let mut bad = Vec::new();
    for path in &files {
        let Some(layer) = layer_of(path, &src) else {
            continue;
        };
        checked += 1;
        let text = std::fs::read_to_string(path).expect("read");
        for (line, what, rule) in violations(layer, &text) {
            bad.push(format!(
                "{}:{line}: {layer} {rule}: {what}",
                path.strip_prefix(&src).unwrap().display()
            ));
        }
    }
    assert!(checked > 40, "only {checked} files found under src/");
    assert!(bad.is_empty(), "layering broken:\n{}", bad.join("\n"));
}

#[test]
fn the_check_finds_an_upward_import_and_a_socket() {
    let log = "use crate::sync::lock;\nuse crate::broker::Broker;\n// crate::server in a comment\n";
    let v = violations("log", log);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!((v[0].0, v[0].1.as_str()), (2, "crate::broker"));
    let broker = "use tokio::net::TcpStream;\nuse crate::protocol::Opcode;\n";
    let v = violations("broker", broker);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].1, "tokio::net");
    assert!(violations(
        "server",
        "use crate::broker::Broker;\nuse tokio::net::TcpListener;\n"
    )
    .is_empty());
    assert_eq!(violations("client", "use crate::server::serve;\n").len(), 1);
}
