//! Every `turnstone …` command that the README, the example configuration, the systemd
//! unit, the Kubernetes manifests and the source comments quote parses with the real
//! command line (so the documentation cannot name a command or flag that does not exist).

use std::path::{Path, PathBuf};

use clap::error::ErrorKind;
use clap::Parser;
use turnstone::cli::Cli;

/// The files whose quoted commands are checked, relative to the repository.
const DOCUMENTS: &[&str] = &[
    "README.md",
    "bench/README.md",
    "conf/turnstone.toml",
    "systemd/turnstone.service",
    "deploy/kubernetes",
    "src",
];

/// Shell-like words of `text`: whitespace separates, single and double quotes group,
/// a `#` starting a word begins a comment.
fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in text.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                in_word = true;
            }
            None if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            None if c == '#' && !in_word => break,
            None => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// The commands a line of documentation quotes: inline code spans that start with
/// `turnstone `, and (in code lines) the line itself when it starts with `turnstone `
/// or `$ turnstone `. `;` separates commands.
fn commands_in(line: &str, code_line: bool) -> Vec<String> {
    let mut found = Vec::new();
    let trimmed = line.trim_start();
    let trimmed = trimmed.strip_prefix("$ ").unwrap_or(trimmed);
    if code_line && trimmed.starts_with("turnstone ") {
        found.push(trimmed.to_string());
    } else {
        for (i, span) in line.split('`').enumerate() {
            if i % 2 == 1 && (span == "turnstone" || span.starts_with("turnstone ")) {
                found.push(span.to_string());
            }
        }
    }
    found
        .iter()
        .flat_map(|c| c.split(';'))
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("turnstone"))
        .collect()
}

/// The variants a documented command stands for: `[--opt X]` both without and with the
/// option, `a|b` (a bare word) each alternative.
fn variants(words: &[String]) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = vec![Vec::new()];
    let mut i = 0;
    while i < words.len() {
        let w = &words[i];
        if w.starts_with('[') {
            // An optional group, up to the word that ends with ']'.
            let mut group = Vec::new();
            let mut j = i;
            loop {
                group.push(
                    words[j]
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string(),
                );
                if words[j].ends_with(']') || j + 1 == words.len() {
                    break;
                }
                j += 1;
            }
            let with: Vec<Vec<String>> = out
                .iter()
                .map(|v| v.iter().chain(group.iter()).cloned().collect())
                .collect();
            out.extend(with);
            i = j + 1;
            continue;
        }
        let alternatives: Vec<&str> = if w.contains('|') && !w.contains(':') {
            w.split('|').collect()
        } else {
            vec![w.as_str()]
        };
        out = out
            .into_iter()
            .flat_map(|v| {
                alternatives.iter().map(move |a| {
                    let mut v = v.clone();
                    v.push(a.to_string());
                    v
                })
            })
            .collect();
        i += 1;
    }
    out
}

/// `Ok` if `args` parse; a bare (sub)command path such as `turnstone probe` or
/// `turnstone users …` (no flags, values elided) passes when `--help` is accepted there.
fn check(args: &[String]) -> Result<(), String> {
    let elided = args.last().is_some_and(|w| w == "..." || w == "…");
    let args: Vec<&String> = args.iter().filter(|w| *w != "..." && *w != "…").collect();
    match Cli::try_parse_from(&args) {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => Ok(()),
        Err(e) => {
            let bare = args.iter().skip(1).all(|w| !w.starts_with('-'));
            if elided || bare {
                let mut with_help: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
                with_help.push("--help");
                if let Err(h) = Cli::try_parse_from(&with_help) {
                    if h.kind() == ErrorKind::DisplayHelp {
                        return Ok(());
                    }
                }
            }
            Err(e.to_string())
        }
    }
}

/// `path` itself, or every file below it (sorted).
fn files_below(path: &Path) -> Vec<PathBuf> {
    if !path.is_dir() {
        return vec![path.to_path_buf()];
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    entries.iter().flat_map(|p| files_below(p)).collect()
}

fn documents() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for doc in DOCUMENTS {
        for f in files_below(&root.join(doc)) {
            let text =
                std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("read {}: {e}", f.display()));
            out.push((f.strip_prefix(root).unwrap().display().to_string(), text));
        }
    }
    out
}

#[test]
fn every_quoted_turnstone_command_parses() {
    let mut checked = 0;
    let mut problems = Vec::new();
    for (name, text) in documents() {
        let markdown = name.ends_with(".md");
        let mut fenced = false;
        for (n, line) in text.lines().enumerate() {
            if markdown && line.trim_start().starts_with("```") {
                fenced = !fenced;
                continue;
            }
            let code_line = markdown && (fenced || line.starts_with("    "));
            let mut cmds = commands_in(line, code_line);
            // A systemd unit's ExecStart= runs the binary by its path.
            if let Some(exec) = line.strip_prefix("ExecStart=") {
                if let Some((_, args)) = exec.split_once("/turnstone ") {
                    cmds.push(format!("turnstone {args}"));
                }
            }
            for cmd in cmds {
                for args in variants(&words(&cmd)) {
                    checked += 1;
                    if let Err(e) = check(&args) {
                        let first = e.lines().next().unwrap_or_default().to_string();
                        problems.push(format!("{name}:{}: `{}`: {first}", n + 1, args.join(" ")));
                    }
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "documented commands that do not parse:\n{}",
        problems.join("\n")
    );
    // The README alone quotes well over a dozen; finding few means the scan broke.
    assert!(checked >= 20, "only {checked} quoted commands found");
}

#[test]
fn the_checker_rejects_what_does_not_exist() {
    let w = |s: &str| words(s);
    assert!(check(&w("turnstone check --config FILE")).is_err());
    assert!(
        check(&w("turnstone check-config")).is_ok(),
        "bare subcommand"
    );
    assert!(check(&w("turnstone check-config FILE")).is_ok());
    assert!(check(&w("turnstone credentials --secret S --colour blue")).is_err());
    assert!(check(&w("turnstone users ...")).is_ok());
    assert_eq!(
        variants(&w("turnstone secrets add|remove SECRET [--store U]")).len(),
        4
    );
    assert_eq!(
        w(r#"turnstone probe 'turn:h?transport=udp' --secret "$S" # note"#),
        [
            "turnstone",
            "probe",
            "turn:h?transport=udp",
            "--secret",
            "$S"
        ]
    );
}
