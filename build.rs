//! Compiles the XDP fast path (bpf/relay.c) into OUT_DIR when clang and libbpf's headers are here.
//
// Without them (or if the C does not compile) the build goes on without the object and
// the fast path reports itself unavailable: turnstone must build on a machine without
// clang. With it, `TURNSTONE_BPF_OBJECT` names the object for `include_bytes!` and the
// cfg `turnstone_bpf` is set.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=bpf/relay.c");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-check-cfg=cfg(turnstone_bpf)");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("relay.o");
    // TURNSTONE_NO_BPF=1 builds as on a machine without clang.
    println!("cargo:rerun-if-env-changed=TURNSTONE_NO_BPF");
    if std::env::var_os("TURNSTONE_NO_BPF").is_some() {
        return;
    }
    if !std::path::Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        return;
    }
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let status = Command::new("clang")
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I/usr/include/{arch}-linux-gnu"))
        .args(["-c", "bpf/relay.c", "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {
            println!("cargo:rustc-cfg=turnstone_bpf");
            println!("cargo:rustc-env=TURNSTONE_BPF_OBJECT={}", out.display());
        }
        // No clang: build without the fast path (it reports itself unavailable).
        Err(_) => {}
        Ok(s) => println!(
            "cargo:warning=bpf/relay.c did not compile (clang {s}); building without the kernel fast path"
        ),
    }
}
