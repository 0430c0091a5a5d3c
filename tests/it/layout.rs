//! The shape of the source, kept so that a newcomer can hold it in their head: no two
//! top-level modules of `src/` import each other (directly or through others), no file is over
//! 600 lines outside its tests, no function over 100 lines, and the provider's `revoke` is
//! called from one place outside the providers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 600;
const MAX_FN_LINES: usize = 100;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The top-level module a file belongs to (`src/broker/slot.rs` → `broker`).
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(src()).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// A file's lines up to its `#[cfg(test)]` module, with line comments dropped.
fn code_lines(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod tests"))
        {
            break;
        }
        out.push(line);
    }
    out
}

fn without_comment(line: &str) -> &str {
    match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    }
}

/// The top-level modules a file's code names as `crate::NAME`.
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let code: Vec<&str> = code_lines(text).into_iter().map(without_comment).collect();
    let code = code.join("\n");
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a, b::c, d}`: the first segment of each item.
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn no_two_modules_import_each_other() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(&src()) {
        let module = module_of(&file);
        if module == "main" || module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let deps = graph.entry(module.clone()).or_default();
        deps.extend(imports(&text).into_iter().filter(|m| *m != module));
    }
    // Every cycle, found by a depth-first walk from each module.
    let mut cycles = Vec::new();
    for start in graph.keys() {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        while let Some((at, path)) = stack.pop() {
            for next in graph.get(&at).into_iter().flatten() {
                if next == start {
                    cycles.push(path.join(" -> ") + " -> " + start);
                } else if !path.contains(next) && next > start {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "modules that import each other:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn files_and_functions_stay_readable() {
    let mut too_long = Vec::new();
    for file in rust_files(&src()) {
        let text = std::fs::read_to_string(&file).unwrap();
        let code = code_lines(&text);
        let name = file.strip_prefix(src()).unwrap().display().to_string();
        if code.len() > MAX_FILE_LINES {
            too_long.push(format!(
                "{name}: {} lines outside its tests (at most {MAX_FILE_LINES})",
                code.len()
            ));
        }
        for (start, length) in functions(&code) {
            if length > MAX_FN_LINES {
                too_long.push(format!(
                    "{name}:{}: a function of {length} lines (at most {MAX_FN_LINES})",
                    start + 1
                ));
            }
        }
    }
    assert!(too_long.is_empty(), "{}", too_long.join("\n"));
}

/// `(first line, line count)` of each `fn` with a body in `code`, nested ones included.
fn functions(code: &[&str]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (i, line) in code.iter().enumerate() {
        let t = without_comment(line).trim_start();
        let is_fn = ["fn ", "pub fn ", "async fn ", "pub async fn ", "const fn "]
            .iter()
            .any(|p| t.starts_with(p))
            || (t.starts_with("pub(") && (t.contains(") fn ") || t.contains(") async fn ")));
        if !is_fn {
            continue;
        }
        // Its body: from the first `{` to the brace that closes it.
        let mut depth = 0i32;
        let mut opened = false;
        for (j, body_line) in code.iter().enumerate().skip(i) {
            for c in without_comment(body_line).chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    ';' if !opened && depth == 0 => break,
                    _ => {}
                }
            }
            if !opened && without_comment(body_line).trim_end().ends_with(';') {
                break;
            }
            if opened && depth <= 0 {
                out.push((i, j - i + 1));
                break;
            }
        }
    }
    out
}

#[test]
fn the_providers_revoke_is_called_from_one_place() {
    let mut calls = Vec::new();
    for file in rust_files(&src()) {
        let name = file.strip_prefix(src()).unwrap().display().to_string();
        if name.starts_with("provider/") || name == "metrics.rs" {
            // The providers themselves, and the timing wrapper that passes the call on.
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, line) in code_lines(&text).iter().enumerate() {
            let code = without_comment(line);
            if code.contains(".revoke(") && !code.contains("fn revoke(") {
                calls.push(format!("{name}:{}: {}", i + 1, code.trim()));
            }
        }
    }
    assert_eq!(
        calls.len(),
        1,
        "calls of a provider's revoke:\n{}",
        calls.join("\n")
    );
}
