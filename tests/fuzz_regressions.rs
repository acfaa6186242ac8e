//! Replays, on stable and in the normal `cargo test`, every input that ever made a fuzz
//! target fail (`fuzz/regressions/<target>/*`) and every committed seed
//! (`fuzz/corpus/<target>/*`) through the same checks the fuzz targets run
//! (`fuzz/src/checks.rs`, included here, not copied).
//!
//! To keep a new crash: copy `fuzz/artifacts/<target>/crash-*` to
//! `fuzz/regressions/<target>/` with a name that says what it found.

#[path = "../fuzz/src/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Files directly in `dir`, sorted (none if it does not exist).
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

/// Runs `target`'s check on every file of `kind` (corpus or regressions); returns how many.
fn replay(kind: &str, target: &str) -> usize {
    let dir = fuzz_dir().join(kind).join(target);
    let list = files(&dir);
    let mut failures = Vec::new();
    for path in &list {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let r = std::panic::catch_unwind(|| checks::check(target, &data));
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{}: {msg}", path.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{target}: {} of {} {kind} inputs fail:\n{}",
        failures.len(),
        list.len(),
        failures.join("\n")
    );
    list.len()
}

#[test]
fn regressions_pass() {
    for t in checks::TARGETS {
        let n = replay("regressions", t);
        eprintln!("{t}: {n} regression inputs");
    }
}

#[test]
fn seed_corpora_pass() {
    for t in checks::TARGETS {
        let n = replay("corpus", t);
        assert!(n > 0, "fuzz/corpus/{t} has no seeds");
        eprintln!("{t}: {n} seeds");
    }
}

/// The fuzz targets' directories match the list the checks know.
#[test]
fn every_target_has_a_check() {
    for p in files(&fuzz_dir().join("fuzz_targets")) {
        let name = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        assert!(
            checks::TARGETS.contains(&name),
            "fuzz target {name} is not in checks::TARGETS"
        );
    }
    assert_eq!(
        files(&fuzz_dir().join("fuzz_targets")).len(),
        checks::TARGETS.len()
    );
}
