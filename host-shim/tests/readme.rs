//! README.md's Rust function is code that compiles: the ```rust block of
//! its "Writing a function" section is the body of `examples/function.rs`
//! between its `// README begin` and `// README end` markers (built with
//! the workspace's other targets).

use std::path::Path;

/// The lines between `begin` and `end` (exclusive) with the first line's
/// indentation removed from each.
fn between<'a>(text: &'a str, begin: &str, end: &str) -> Vec<&'a str> {
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.iter().position(|l| l.trim() == begin).unwrap_or_else(|| panic!("no `{begin}`")) + 1;
    let to = from + lines[from..].iter().position(|l| l.trim() == end).unwrap_or_else(|| panic!("no `{end}`"));
    let indent = lines[from].len() - lines[from].trim_start().len();
    lines[from..to].iter().map(|l| l.get(indent..).unwrap_or(l.trim_start())).collect()
}

#[test]
fn the_readme_shows_the_compiled_example_function() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("../README.md")).unwrap();
    let example = std::fs::read_to_string(root.join("examples/function.rs")).unwrap();
    let shown = between(&readme, "```rust", "```");
    let compiled = between(&example, "// README begin", "// README end");
    assert!(shown == compiled, "README.md's ```rust block is not examples/function.rs:\n{}", compiled.join("\n"));
}
