//! The captured client messages in `tests/corpus/` (see its README.md): where they are
//! and the rows of their `index.tsv`.

use std::fs;
use std::path::PathBuf;

/// `tests/corpus/` of this checkout.
pub fn corpus_dir() -> PathBuf {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus"));
    assert!(
        dir.join("index.tsv").is_file(),
        "STUN corpus not found: expected {}/index.tsv (it is part of the repository)",
        dir.display(),
    );
    dir
}

/// The data rows of `index.tsv` (header and blank lines skipped), split at tabs.
pub fn index_rows() -> Vec<Vec<String>> {
    let path = corpus_dir().join("index.tsv");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}
