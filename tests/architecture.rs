//! The layout docs/architecture.md promises, checked against the code:
//! no import loop among `src/` modules, configuration importing no other
//! module, and the map's "imports" column naming exactly what each module
//! imports. A module is a top-level file or folder of `src/`; an import is
//! a `crate::<module>` path outside comments and unit tests.

#![allow(clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Every `src/` module and the crate modules it imports.
fn imports() -> Graph {
    let mut graph = Graph::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(&src).expect("under src");
            let first = relative.iter().next().expect("a component");
            let module = first.to_string_lossy().trim_end_matches(".rs").to_string();
            if module == "lib" || module == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read file");
            // Unit tests may reach anywhere.
            let code = text
                .split("#[cfg(test)]\nmod tests")
                .next()
                .unwrap_or_default();
            let used = graph.entry(module.clone()).or_default();
            for line in code.lines() {
                let line = line.trim_start();
                if line.starts_with("//") {
                    continue;
                }
                for (i, _) in line.match_indices("crate::") {
                    let name: String = line[i + "crate::".len()..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != module {
                        used.insert(name);
                    }
                }
            }
        }
    }
    graph
}

/// A cycle through `graph`, if there is one.
fn cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        graph: &Graph,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut found = path[start..].to_vec();
            found.push(node.to_string());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(graph, next, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(graph, node, &mut Vec::new(), &mut done))
}

#[test]
fn no_module_imports_itself_through_others() {
    let graph = imports();
    assert!(graph.len() > 15, "read the modules: {graph:?}");
    assert_eq!(cycle(&graph), None, "an import loop");
    let mut looped = graph.clone();
    looped
        .entry("config".into())
        .or_default()
        .insert("auth".into());
    assert!(
        cycle(&looped).is_some(),
        "the check finds a loop when there is one"
    );
}

#[test]
fn configuration_imports_nothing_of_the_runtime() {
    let graph = imports();
    assert_eq!(graph.get("config"), Some(&BTreeSet::new()));
}

#[test]
fn the_architecture_map_names_what_each_module_imports() {
    let graph = imports();
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md"))
            .expect("docs/architecture.md");
    let mut checked = BTreeSet::new();
    for row in doc.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let (Some(first), Some(last)) = (cells.first(), cells.last()) else {
            continue;
        };
        // Rows name a module (`hub.rs`, `broker/`) or a file of a folder
        // module (`transport/ws.rs`), whose imports are the folder's when
        // the row lists them.
        let named = first.trim_matches('`');
        let module = named
            .trim_end_matches(".rs")
            .split('/')
            .next()
            .unwrap_or_default();
        if !graph.contains_key(module) || last.is_empty() || last.starts_with('(') {
            continue;
        }
        let without_notes: String = {
            let mut out = String::new();
            let mut depth = 0;
            for c in last.chars() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ if depth == 0 => out.push(c),
                    _ => {}
                }
            }
            out
        };
        let listed: BTreeSet<String> = without_notes
            .split(',')
            .map(|s| s.trim().trim_matches('`').to_string())
            .filter(|s| !s.is_empty() && s != "—")
            .collect();
        assert_eq!(
            Some(&listed),
            graph.get(module),
            "docs/architecture.md, row `{named}`"
        );
        checked.insert(module.to_string());
    }
    for module in graph.keys() {
        assert!(
            checked.contains(module.as_str())
                || doc.contains(&format!("`{module}.rs`"))
                || doc.contains(&format!("`{module}/`")),
            "docs/architecture.md does not name `{module}`"
        );
    }
    assert!(checked.len() > 10, "rows read: {checked:?}");
}
