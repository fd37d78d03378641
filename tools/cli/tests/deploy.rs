//! deploy/: the HAProxy configuration is valid, `local-cluster.sh` refuses
//! bad input by name, and the three fault drills (rolling restart, crash,
//! overload) pass on a small cluster of tiny synthetic replicas.
//!
//! These need `haproxy` (`.ci/run` installs it); without it they print a
//! notice and return.

mod common;

use std::path::Path;
use std::process::Command;

use common::{scratch_dir, synth_dir};
use gpt2::synth::Preset;

fn root() -> &'static Path {
    common::repo_root()
}

/// Whether HAProxy is installed; if not, says which test skips.
fn haproxy(test: &str) -> bool {
    let found = Command::new("haproxy")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("NOTICE: {test} skipped: haproxy is not installed (apt-get install haproxy)");
    }
    found
}

#[test]
fn the_haproxy_config_is_valid() {
    if !haproxy("the_haproxy_config_is_valid") {
        return;
    }
    let out = Command::new("haproxy")
        .args(["-c", "-f"])
        .arg(root().join("deploy/haproxy.cfg"))
        // A check binds nothing: any ports do.
        .env("GPT2_LB_BIND", "127.0.0.1:18080")
        .env("GPT2_STATS_BIND", "127.0.0.1:18404")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn cluster_script(args: &[&str]) -> (i32, String) {
    let out = Command::new(root().join("deploy/local-cluster.sh"))
        .args(args)
        .env("GPT2_BIN", env!("CARGO_BIN_EXE_gpt2"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn local_cluster_refuses_bad_input_by_name() {
    if !haproxy("local_cluster_refuses_bad_input_by_name") {
        return;
    }
    let (code, err) = cluster_script(&["0"]);
    assert!(code == 2 && err.contains("number of replicas"), "{code}: {err}");
    let (code, err) = cluster_script(&["1", "--bogus"]);
    assert!(
        code == 2 && err.contains("unknown option '--bogus'"),
        "{code}: {err}"
    );
    // More cores than there are: replicas would share them.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = (cores + 1).to_string();
    let (code, err) = cluster_script(&[&n]);
    assert!(
        code == 2 && err.contains("replicas would share cores"),
        "{code}: {err}"
    );
    let (code, err) = cluster_script(&["1", "--replica-ports", "1,2"]);
    assert!(
        code == 2 && err.contains("lists 2 ports for 1 replicas"),
        "{code}: {err}"
    );
}

#[test]
fn the_fault_drills_pass_on_a_small_cluster() {
    if !haproxy("the_fault_drills_pass_on_a_small_cluster") {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        eprintln!(
            "NOTICE: the_fault_drills_pass_on_a_small_cluster skipped: it needs 2 cores, this has {cores}"
        );
        return;
    }
    let dir = scratch_dir("deploy-drills");
    let weights = synth_dir(Preset::Tiny, 0);
    let out = Command::new(env!("CARGO_BIN_EXE_drill"))
        .args(["all", "--weights"])
        .arg(&weights)
        .args([
            "--duration",
            "20",
            "--max-new-tokens",
            "8",
            "--request-deadline",
            "60",
        ])
        .arg("--out-dir")
        .arg(dir.join("reports"))
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "drill all: {}\n{stdout}\n{stderr}",
        out.status
    );
    for drill in ["rolling", "crash", "overload"] {
        assert!(
            stdout.contains(&format!("## drill `{drill}`")),
            "no {drill} report:\n{stdout}"
        );
    }
    assert!(!stdout.contains("| FAIL |"), "{stdout}");
    assert_eq!(
        stdout.matches("| no token count is wrong | PASS |").count(),
        3,
        "{stdout}"
    );
    // The reports were written, one Markdown and one JSON per drill.
    let written = std::fs::read_dir(dir.join("reports")).unwrap().count();
    assert_eq!(written, 6, "{stderr}");
    // Nothing is left running: every replica and HAProxy of the drills stopped.
    let left = Command::new("pgrep")
        .args(["-f", &weights.display().to_string()])
        .output();
    if let Ok(left) = left {
        assert!(
            left.stdout.is_empty(),
            "left running: {}",
            String::from_utf8_lossy(&left.stdout)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
