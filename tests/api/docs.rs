//! The documentation holds to the code: the settings table of
//! `docs/operations.md` names exactly the keys of `config/default.toml`, and
//! every relative link in `README.md` and `docs/*.md` reaches a file (and,
//! into a markdown file, a heading) that exists. No test here needs the
//! services.
//!
//! Keys of `config/default.toml`, read line by line: a `[section]` header
//! (`[rabbit.topology]` too) opens a section; a `key = value` line is the key
//! `section.key`; a commented-out assignment, `# key = value` (a lowercase
//! key, `=` between spaces), is an optional key without a default, such as
//! `database.read_url`, and must be documented like the others. Other
//! comment lines are prose.
//!
//! The settings table is the table of `docs/operations.md` whose header row
//! starts with `key`. Its first column names keys as code spans separated by
//! commas: `` `section.key` `` is a full name; a name without a dot
//! (`` `retry_max_ms` `` after `` `generator.retry_min_ms` ``) belongs to the
//! section of the name before it in the same cell. Families (`` `rabbit.*` ``)
//! are refused: each key is named, so a new key cannot hide in a family. A
//! key documented in two rows is refused too.
//!
//! Links: `[text](target)` and `[label]: target` outside fenced code and code
//! spans. Targets with a scheme (`http:`, `mailto:`) are not checked; any
//! other is a path relative to the file, which must exist, and a `#anchor`
//! into a markdown file (or `#anchor` alone, into the same file) must be the
//! slug of one of its headings, by GitHub's rules: the heading's text without
//! code-span backticks, lowercased, every character that is not a letter, a
//! digit, a space, `-` or `_` dropped, spaces turned into `-`; a repeated slug
//! gets `-1`, `-2`, … .

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The keys of a TOML settings file, as `section.key`, by the rules above.
fn config_keys(toml: &str) -> BTreeSet<String> {
    let mut section = String::new();
    let mut keys = BTreeSet::new();
    for line in toml.lines() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[')
            && let Some(name) = header.split(']').next().filter(|n| is_key_path(n))
        {
            section = name.to_string();
            continue;
        }
        let assignment = match line.strip_prefix('#') {
            Some(commented) => commented.trim_start().split_once(" = ").map(|(k, _)| k),
            None => line.split_once('=').map(|(k, _)| k.trim()),
        };
        if let Some(key) = assignment.filter(|k| is_key_path(k) && !k.contains('.')) {
            keys.insert(if section.is_empty() {
                key.to_string()
            } else {
                format!("{section}.{key}")
            });
        }
    }
    keys
}

fn is_key_path(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
}

/// The code spans of a piece of markdown: the text between pairs of backticks.
fn code_spans(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// The table cells of one markdown table row.
fn cells(row: &str) -> Vec<&str> {
    let row = row.trim().trim_start_matches('|').trim_end_matches('|');
    row.split('|').map(str::trim).collect()
}

/// The keys each row of the settings table names, or why a name is refused.
fn documented_keys(markdown: &str) -> Result<Vec<String>, Vec<String>> {
    let mut lines = markdown
        .lines()
        .skip_while(|l| !(l.trim_start().starts_with('|') && cells(l)[0] == "key"));
    assert!(
        lines.next().is_some(),
        "docs/operations.md has no settings table (a table whose header starts with `key`)"
    );
    let mut keys = Vec::new();
    let mut refused = Vec::new();
    for row in lines.skip(1).take_while(|l| l.trim_start().starts_with('|')) {
        let mut section: Option<String> = None;
        for name in code_spans(cells(row)[0]) {
            if name.contains('*') {
                refused.push(format!("`{name}`: a family; name each key"));
            } else if let Some((sec, _)) = name.rsplit_once('.') {
                section = Some(sec.to_string());
                keys.push(name.to_string());
            } else if let Some(sec) = &section {
                keys.push(format!("{sec}.{name}"));
            } else {
                refused.push(format!("`{name}`: no section (write `section.{name}`)"));
            }
        }
    }
    if refused.is_empty() { Ok(keys) } else { Err(refused) }
}

#[test]
fn every_setting_is_documented_and_every_documented_setting_exists() {
    let config = config_keys(&read(&root().join("config/default.toml")));
    assert!(config.len() > 50, "config/default.toml read as {config:?}");
    let documented = documented_keys(&read(&root().join("docs/operations.md")))
        .unwrap_or_else(|refused| panic!("docs/operations.md's settings table: {refused:#?}"));

    let mut twice = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for key in &documented {
        if !seen.insert(key.clone()) {
            twice.insert(key.clone());
        }
    }
    let undocumented: Vec<_> = config.difference(&seen).collect();
    let gone: Vec<_> = seen.difference(&config).collect();
    assert!(
        undocumented.is_empty() && gone.is_empty() && twice.is_empty(),
        "docs/operations.md's settings table against config/default.toml:\n\
         keys not documented: {undocumented:?}\n\
         documented keys that do not exist: {gone:?}\n\
         keys documented in more than one row: {twice:?}"
    );
}

#[test]
fn the_settings_reader_follows_its_rules() {
    let keys = config_keys(
        "# Defaults. GATEWAY__SERVER__PORT=9000\n[server]\nport = 8080 # listen\n\
         # A prose line: one = two.\n[rabbit.topology]\nreplicas = 1\n# read_url = \"x\"\n",
    );
    assert_eq!(
        keys,
        ["rabbit.topology.read_url", "rabbit.topology.replicas", "server.port"]
            .map(String::from)
            .into()
    );

    let table = "| key | default | meaning |\n|---|---|---|\n\
                 | `a.b_ms`, `c_ms` | 1, 2 | x |\n| `d.e.f` | 3 | `not.a.key` |\n\ntext `g.h`\n";
    assert_eq!(documented_keys(table).unwrap(), ["a.b_ms", "a.c_ms", "d.e.f"]);
    let families = "| key | default | meaning |\n|---|---|---|\n| `d.e.*` | | |\n| `x` | | |\n";
    assert_eq!(documented_keys(families).unwrap_err().len(), 2);
}

/// The markdown files whose links are checked.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// The lines of a markdown file outside fenced code blocks.
fn prose_lines(markdown: &str) -> Vec<&str> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in markdown.lines() {
        let t = line.trim_start();
        if t.starts_with("```") || t.starts_with("~~~") {
            fenced = !fenced;
        } else if !fenced {
            out.push(line);
        }
    }
    out
}

/// GitHub's anchor for a heading's text.
fn slug(heading: &str) -> String {
    heading
        .replace('`', "")
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of every heading of a markdown file.
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for line in prose_lines(markdown) {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if (1..=6).contains(&hashes) && line[hashes..].starts_with(' ') {
            let base = slug(line[hashes..].trim());
            let n = count.entry(base.clone()).or_default();
            out.insert(if *n == 0 { base.clone() } else { format!("{base}-{n}") });
            *n += 1;
        }
    }
    out
}

/// Link targets of one line of prose (code spans removed).
fn link_targets(line: &str) -> Vec<String> {
    let prose: String = line.split('`').step_by(2).collect::<Vec<_>>().join("``");
    let mut out = Vec::new();
    if let Some(rest) = prose.trim_start().strip_prefix('[')
        && let Some((label, target)) = rest.split_once("]:")
        && !label.contains(']')
    {
        out.extend(target.split_whitespace().next().map(String::from));
    }
    let mut rest = prose.as_str();
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        let end = rest.find(')').unwrap_or(rest.len());
        let inner = &rest[..end];
        let target = match inner.strip_prefix('<') {
            Some(bracketed) => bracketed.split('>').next(),
            None => inner.split_whitespace().next(),
        };
        out.extend(target.map(String::from));
        rest = &rest[end..];
    }
    out
}

#[test]
fn every_relative_link_in_the_docs_reaches_a_file_and_heading() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let text = read(&file);
        let dir = file.parent().unwrap();
        let name = file.strip_prefix(root()).unwrap().display().to_string();
        for line in prose_lines(&text) {
            for target in link_targets(line) {
                let scheme = target
                    .split_once(':')
                    .is_some_and(|(s, _)| !s.contains(['/', '#', '.']));
                if scheme {
                    continue;
                }
                checked += 1;
                let (path, anchor) = match target.split_once('#') {
                    Some((p, a)) => (p, Some(a)),
                    None => (target.as_str(), None),
                };
                let linked = if path.is_empty() { file.clone() } else { dir.join(path) };
                if !linked.exists() {
                    broken.push(format!("{name}: {target}: no such file"));
                    continue;
                }
                if let Some(anchor) = anchor.filter(|_| linked.extension().is_some_and(|e| e == "md"))
                    && !anchors(&read(&linked)).contains(anchor)
                {
                    broken.push(format!("{name}: {target}: no such heading"));
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} relative links found");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn anchors_and_links_follow_github() {
    assert_eq!(slug("WebSocket `/ws`"), "websocket-ws");
    assert_eq!(slug("Dependencies, and why each"), "dependencies-and-why-each");
    assert_eq!(slug("snake_case and a-dash"), "snake_case-and-a-dash");
    let doc = "# Tests\n```sh\n# not a heading\n```\n## Tests\n";
    assert_eq!(anchors(doc), ["tests", "tests-1"].map(String::from).into());
    assert_eq!(
        link_targets("see [a](x.md#b \"title\"), `[c](no.md)` and [d](<y z.md>); <https://e>"),
        ["x.md#b", "y z.md"]
    );
    assert_eq!(link_targets("[ref]: docs/z.md"), ["docs/z.md"]);
}
