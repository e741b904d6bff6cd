//! Architecture checks that read this crate's own sources (tests only, no GPU needed):
//!
//! - the module graph is acyclic: nodes are the crate's top-level modules (`device`, `buffers`,
//!   `op`, …), an edge `a → b` is any `crate::b` path (or `super::b` in a top-level file) in a
//!   file of `a`; a cycle fails with the path that closes it;
//! - a few edges that would undo the layering are named and refused (the device core depends
//!   only on `error`; the tensor types do not know kernels or ops; the launch wrappers do not
//!   know tensor types or ops; `run_file` uses only the public layers and nothing uses it);
//! - only `kernels/` (through `launch/`) launches a kernel;
//! - `kernels/` exposes publicly only the wrappers that check every buffer they are handed
//!   (`dequant`, `probes`); the others are `pub(crate)`.
//!
//! The parse is lexical (comments are stripped, string literals are not), which is enough for
//! code written in this crate's style.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crate's `src` directory.
fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading the source directory") {
        let path = entry.expect("reading a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without `//` comments (doc comments included).
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The identifier at the start of `s`.
fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules a piece of code names through `prefix` (`crate::` or `super::`),
/// including the items of a group (`crate::{a, b::c}`).
fn named_modules(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in code.match_indices(prefix) {
        // Skip `super::` inside `super::super::` and identifiers ending in the prefix.
        if i > 0 {
            let before = code.as_bytes()[i - 1];
            if before.is_ascii_alphanumeric() || before == b'_' || before == b':' {
                continue;
            }
        }
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let body = &group[..group.find('}').unwrap_or(group.len())];
            out.extend(
                body.split(',')
                    .map(|item| ident(item.trim()).to_string())
                    .filter(|s| !s.is_empty()),
            );
        } else {
            out.push(ident(rest).to_string());
        }
    }
    out
}

/// Maps a root re-export or item to the module that defines it.
fn module_of(name: &str) -> Option<&str> {
    match name {
        // Re-exports at the crate root.
        "Error" | "Result" => Some("error"),
        "Runtime" => Some("runtime"),
        // `kernels_gpu::shared`, another crate.
        "shared" | "self" | "" => None,
        other => Some(other),
    }
}

/// The top-level module graph of the crate (without `bin/`, a separate crate).
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in files {
        let rel = path.strip_prefix(&src).expect("a file under src");
        let mut parts = rel.iter().map(|p| p.to_string_lossy().into_owned());
        let first = parts.next().expect("a non-empty relative path");
        if first == "bin" || first == "lib.rs" {
            continue;
        }
        let top = first.trim_end_matches(".rs").to_string();
        let top_level_file = rel.components().count() == 1;
        let code = strip_comments(&std::fs::read_to_string(&path).expect("reading a source"));
        let mut names = named_modules(&code, "crate::");
        if top_level_file {
            // `super::x` in a top-level file's inline test module names the crate root's `x`.
            names.extend(named_modules(&code, "super::"));
        }
        let deps = graph.entry(top.clone()).or_default();
        for name in names {
            if let Some(m) = module_of(&name)
                && m != top
            {
                deps.insert(m.to_string());
            }
        }
    }
    graph
}

/// A cycle of the graph, if there is one (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), 1);
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = stack.iter().position(|n| n == next).expect("on the stack");
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(next, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if state.get(node.as_str()).copied().unwrap_or(0) == 0
            && let Some(c) = visit(node, graph, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_module_graph_has_no_cycle() {
    let graph = module_graph();
    assert!(
        graph.contains_key("device") && graph.contains_key("op"),
        "the parse found no modules: {graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "module cycle: {}\nfull graph: {graph:#?}",
            cycle.join(" → ")
        );
    }
}

#[test]
fn the_lower_layers_do_not_reach_up() {
    let graph = module_graph();
    // (module, modules it must not depend on).
    let rules: &[(&str, &[&str])] = &[
        (
            "device",
            &[
                "buffers",
                "external",
                "kernels",
                "launch",
                "op",
                "moe",
                "routing",
                "runtime",
                "tune",
                "mxfp4",
                "reference",
            ],
        ),
        ("error", &["mxfp4", "tensor", "device"]),
        (
            "buffers",
            &[
                "kernels", "launch", "op", "moe", "external", "runtime", "tune",
            ],
        ),
        (
            "kernels",
            &[
                "buffers", "op", "moe", "routing", "external", "runtime", "tune",
            ],
        ),
        ("tune", &["runtime", "op", "kernels", "buffers"]),
        ("routing", &["op", "moe", "reference", "buffers", "runtime"]),
        (
            "reference",
            &[
                "device", "kernels", "launch", "op", "moe", "buffers", "runtime",
            ],
        ),
        // The gpt-oss checkpoint loader reads files into host containers only.
        (
            "gpt_oss",
            &[
                "device",
                "buffers",
                "kernels",
                "launch",
                "op",
                "moe",
                "routing",
                "runtime",
                "tune",
                "external",
                "reference",
                "tensor",
            ],
        ),
        // The file front end runs the public ops; it launches nothing itself.
        ("run_file", &["kernels", "launch", "external", "tune"]),
    ];
    let mut bad = Vec::new();
    for (module, forbidden) in rules {
        for dep in graph.get(*module).into_iter().flatten() {
            if forbidden.contains(&dep.as_str()) {
                bad.push(format!("{module} → {dep}"));
            }
        }
    }
    // `run_file` is the top of the library: nothing in it may use it (the CLI and the Python
    // package are separate crates).
    for (module, deps) in &graph {
        if module != "run_file" && deps.contains("run_file") {
            bad.push(format!("{module} → run_file"));
        }
    }
    assert!(bad.is_empty(), "edges against the layering: {bad:?}");
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut edge = |a: &str, b: &str| {
        g.entry(a.into()).or_default().insert(b.into());
    };
    edge("a", "b");
    edge("b", "c");
    edge("c", "a");
    edge("d", "a");
    let cycle = find_cycle(&g).expect("a → b → c → a");
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4);
    g.get_mut("c").unwrap().clear();
    assert_eq!(find_cycle(&g), None);
    assert_eq!(
        named_modules(
            "use crate::{error::Error, op};\nlet x = crate::tune::f();",
            "crate::"
        ),
        ["error", "op", "tune"]
    );
}

#[test]
fn only_kernels_launch() {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut launches = Vec::new();
    for path in files {
        let rel = path.strip_prefix(&src).expect("a file under src");
        let first = rel.iter().next().expect("non-empty").to_string_lossy();
        if first == "kernels" || first == "launch" || rel == Path::new("layering.rs") {
            continue;
        }
        let code = strip_comments(&std::fs::read_to_string(&path).expect("reading a source"));
        if code.contains(".launch(&") || code.contains("launch_builder(") {
            launches.push(rel.display().to_string());
        }
    }
    assert!(
        launches.is_empty(),
        "kernel launches outside host/src/kernels/: {launches:?}"
    );
}

#[test]
fn kernels_exposes_only_self_checking_wrappers() {
    let text = std::fs::read_to_string(src_dir().join("kernels").join("mod.rs"))
        .expect("reading kernels/mod.rs");
    let code = strip_comments(&text);
    let public: Vec<&str> = code
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|rest| rest.trim_end_matches(';').trim())
        .collect();
    assert_eq!(
        public,
        ["dequant", "probes"],
        "a public kernels module must check every buffer it is handed"
    );
    for module in ["eltwise", "gemm", "moe", "routing"] {
        assert!(
            code.contains(&format!("pub(crate) mod {module};")),
            "kernels::{module} must be pub(crate)"
        );
    }
}
