//! `bench` against real brokers, where what it reports depends on what the brokers answered.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

/// A primary whose log cannot take the bench's topic answers every publish `ERR|not stored:
/// …` in place of an `ACK`: the throughput run must fail and say why, not count the refusals
/// as acknowledgements and print a rate.
#[test]
fn a_throughput_run_fails_with_the_reason_when_the_broker_refuses_its_publishes() {
    let real = assert_cmd::cargo::cargo_bin("bench");
    let real_dir = real.parent().expect("bin dir");
    let bins = tempfile::tempdir().expect("tempdir");
    for b in ["backup", "edgepair-log"] {
        std::os::unix::fs::symlink(real_dir.join(b), bins.path().join(b)).expect("symlink");
    }
    // Where the log would make the topic's folder stands a file.
    let data = bins.path().join("data");
    std::fs::create_dir_all(data.join("topics")).expect("mkdir");
    std::fs::write(data.join("topics").join("bench"), "").expect("write");
    let primary = bins.path().join("primary");
    let script = format!(
        "#!/bin/sh\nexec '{}' \"$@\" --data-dir '{}'\n",
        real_dir.join("primary").display(),
        data.display()
    );
    std::fs::write(&primary, script).expect("write");
    std::fs::set_permissions(&primary, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = Command::new(&real)
        .args([
            "--only",
            "throughput",
            "--quick",
            "--nats-server",
            "/nonexistent",
        ])
        .arg("--bin-dir")
        .arg(bins.path())
        .arg("--out")
        .arg(bins.path().join("results"))
        .output()
        .expect("run bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "bench passed:\n{stderr}");
    assert!(
        stderr.contains("refused a publish") && stderr.contains("not stored"),
        "{stderr}"
    );
}
