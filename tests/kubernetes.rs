//! The Kubernetes deployment in `deploy/kubernetes/` (issue 8):
//!
//! - every manifest validates, strictly (no unknown fields), against the Kubernetes 1.30
//!   schemas bundled in the `kubernetes-validate` Python package (offline; install with
//!   `pip install kubernetes-validate`), and a broken manifest is rejected (the
//!   validator really validates);
//! - the kustomization lists every manifest;
//! - the ConfigMap's `turnstone.toml`, rendered the way the DaemonSet's init container
//!   renders it, passes `turnstone check-config`, and its drain fits in the pod's
//!   termination grace period.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const KUBERNETES_VERSION: &str = "1.30.0";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

/// Every `*.yaml` of deploy/kubernetes except the kustomization (not a Kubernetes kind).
fn manifests() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/kubernetes")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    v.sort();
    assert!(v.len() >= 5, "manifests: {v:?}");
    v
}

/// `python3 -m kubernetes_validate --strict -k VERSION FILES` (the module, not the
/// console script: a fresh pip install under pyenv may not have its shim yet).
fn validate(files: &[PathBuf]) -> std::process::Output {
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(["--kubernetes-version", KUBERNETES_VERSION])
        .args(files)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}); the Kubernetes manifest test needs it")
        });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named"),
        "kubernetes-validate is not installed: pip install kubernetes-validate\n{stderr}"
    );
    out
}

fn read(name: &str) -> String {
    std::fs::read_to_string(deploy_dir().join(name)).expect(name)
}

#[test]
fn manifests_validate_against_kubernetes_schemas() {
    let files = manifests();
    let out = validate(&files);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubernetes-validate failed:\n{text}");
    for kind in [
        "daemonset/turnstone",
        "configmap/turnstone-config",
        "secret/turnstone",
        "poddisruptionbudget/turnstone",
        "statefulset/turnstone-redis",
        "service/turnstone-redis",
    ] {
        assert!(
            text.contains(&format!("passed for resource {kind}")),
            "{kind} not validated:\n{text}"
        );
    }
    assert!(!text.contains("ERROR"), "{text}");
}

#[test]
fn validator_rejects_a_broken_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        read("daemonset.yaml").replace(
            "hostNetwork: true",
            "hostNetwork: true\n      hostNetwrk: true",
        ),
    )
    .unwrap();
    let out = validate(&[bad]);
    assert!(
        !out.status.success(),
        "an unknown field passed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn kustomization_lists_every_manifest() {
    let k = read("kustomization.yaml");
    for f in manifests() {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            k.lines().any(|l| l.trim() == format!("- {name}")),
            "{name} missing from kustomization.yaml"
        );
    }
}

/// The ConfigMap's `turnstone.toml` block (indented 4 spaces under `turnstone.toml: |`).
fn configmap_toml() -> String {
    let cm = read("configmap.yaml");
    let mut lines = cm.lines().skip_while(|l| l.trim() != "turnstone.toml: |");
    lines.next().expect("turnstone.toml in the ConfigMap");
    let mut out = String::new();
    for l in lines {
        if l.trim().is_empty() {
            out.push('\n');
        } else if let Some(rest) = l.strip_prefix("    ") {
            out.push_str(rest);
            out.push('\n');
        } else {
            break;
        }
    }
    out
}

#[test]
fn rendered_config_is_valid_and_drain_fits_grace_period() {
    let ds = read("daemonset.yaml");
    // What the init container does (sed on three placeholders, then [auth] appended).
    for placeholder in [
        "${HOST_IP}",
        "${NODE_NAME}",
        "${REDIS_PASSWORD}",
        "REST_SECRET",
    ] {
        assert!(
            ds.contains(placeholder),
            "init container renders {placeholder}"
        );
    }
    let rendered = configmap_toml()
        .replace("${HOST_IP}", "192.0.2.10")
        .replace("${NODE_NAME}", "node-1")
        .replace("${REDIS_PASSWORD}", "0123abcd")
        + "\n[auth]\nsecrets = [\"0000\"]\n";
    assert!(!rendered.contains("${"), "{rendered}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("turnstone.toml");
    std::fs::write(&path, &rendered).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_turnstone"))
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run turnstone");
    assert!(
        out.status.success(),
        "rendered config refused:\n{}\n{rendered}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = turnstone::config::Config::load(&path).unwrap();
    assert!(config.store.url.is_some());
    assert_eq!(config.store.node_id.as_deref(), Some("node-1"));

    let grace: u64 = ds
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("terminationGracePeriodSeconds");
    assert!(
        config.server.drain_timeout + Duration::from_secs(5) <= Duration::from_secs(grace),
        "drain_timeout {:?} must end before the grace period ({grace} s)",
        config.server.drain_timeout
    );
    assert!(ds.contains("preStop:") && ds.contains("kill -TERM 1"));
    assert!(ds.contains("path: /health"));
    assert!(ds.contains("hostNetwork: true") && ds.contains("ClusterFirstWithHostNet"));
}

#[test]
fn daemonset_runs_the_image_the_containerfile_builds() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let version = env!("CARGO_PKG_VERSION");
    let ds = read("daemonset.yaml");
    // Both containers (the init container uses the image's /bin/sh and sed).
    let images: Vec<&str> = ds
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image:"))
        .map(str::trim)
        .collect();
    let tag = format!("turnstone:{version}");
    assert_eq!(
        images,
        [tag.as_str(), tag.as_str()],
        "images of daemonset.yaml"
    );
    // As the image's user.
    let containerfile = std::fs::read_to_string(repo.join("Containerfile")).unwrap();
    let user = containerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER in the Containerfile");
    let uid = user.split(':').next().unwrap().trim();
    let run_as: Vec<&str> = ds
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runAsUser:"))
        .map(str::trim)
        .collect();
    assert_eq!(run_as, [uid, uid], "runAsUser of daemonset.yaml");
    // kustomize points the name at one's own registry; the README builds that tag.
    let k = read("kustomization.yaml");
    assert!(
        k.contains("images:\n  - name: turnstone\n    newName: "),
        "kustomization.yaml: images"
    );
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    assert!(
        readme.contains(&format!("podman build --format docker -t {tag} .")),
        "README does not build {tag}"
    );
}
