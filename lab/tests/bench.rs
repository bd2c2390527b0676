//! `bench` against real brokers, where what it reports depends on what the brokers answered.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

/// Runs `bench` with `args`, its CSV in a folder of its own, and asserts that it passed;
/// returns what it printed.
fn bench_passes(args: &[&str]) -> String {
    // Kept until the run is done: the CSV goes there.
    let results = tempfile::tempdir().expect("tempdir");
    let out = Command::new(assert_cmd::cargo::cargo_bin("bench"))
        .args(args)
        .arg("--out")
        .arg(results.path())
        .output()
        .expect("run bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The figure printed right after `setup` on the row of `stdout` that starts with `name` and
/// names that setup; panics if there is no such row or no number there.
fn figure(stdout: &str, name: &str, setup: &str) -> f64 {
    let row = stdout
        .lines()
        .find(|l| l.starts_with(name) && l.contains(setup))
        .unwrap_or_else(|| panic!("no row for {name} / {setup}:\n{stdout}"));
    row.split(setup)
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no figure in {row}"))
}

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

/// The fan-out figure prints the machine's floor beside the broker's: a writer process with no
/// broker logic, whose every line must reach every subscriber (a floor that lost lines, or
/// that did not run, would excuse a broker's spread with nothing).
#[test]
fn the_fan_out_figure_measures_the_floor_beside_the_broker() {
    let stdout = bench_passes(&[
        "--only",
        "fanout",
        "--quick",
        "--fanout",
        "20",
        "--nats-server",
        "/nonexistent",
    ]);
    let row = |what: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("fan-out 20 {what}")) && l.contains("floor"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_else(|| panic!("no floor row for {what}:\n{stdout}"))
    };
    let lost = row("lost");
    assert_eq!(
        lost[lost.len() - 6],
        "0.0",
        "the floor lost lines:\n{stdout}"
    );
    let spread = row("spread");
    let ms: f64 = spread[spread.len() - 6].parse().expect("a spread in ms");
    assert!(ms > 0.0, "{stdout}");
    // The writes-only floor (kernel receive stamps; the run fails on a line missing, out of
    // place or unstamped): one writer thread, and one per core where there are more.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut writers = vec![1];
    if cores > 1 {
        writers.push(cores);
    }
    for threads in writers {
        let setup = format!("floor, writes only, {threads} thread(s)");
        let ms = figure(&stdout, "fan-out 20 spread", &setup);
        assert!(ms > 0.0, "{setup}: {ms}");
    }
}

/// The restart figure is the time until a restarted *pair* serves again with the primary
/// still primary (the run fails if the backup took over meanwhile): each row is there with a
/// figure, from one run on a small log (the figure's target is the bench's to judge).
#[test]
fn a_restart_run_times_the_pair_serving_again() {
    let stdout = bench_passes(&[
        "--only",
        "restart",
        "--runs",
        "1",
        "--restart-entries",
        "2000",
    ]);
    for what in ["pair, all delivered", "pair, none delivered"] {
        let ms = figure(&stdout, "restart on 2000 entries", what);
        assert!(ms.is_finite() && ms > 0.0, "{what}: {ms}");
    }
}

/// The durable figures measure the disk's own floor beside the brokers: a synced write's p50
/// alone and with two writers at once, each row with a figure.
#[test]
fn the_durable_figures_measure_the_disks_synced_write_beside_the_pair() {
    let stdout = bench_passes(&[
        "--only",
        "durable",
        "--runs",
        "1",
        "--durable-settings",
        "always,memory",
        "--durable-messages",
        "2000",
        "--durable-single",
        "100",
    ]);
    for setup in ["disk, 1 writer", "disk, 2 writers at once"] {
        let us = figure(&stdout, "durable synced write p50", setup);
        assert!(us.is_finite() && us > 0.0, "{setup}: {us}");
    }
    let p50 = figure(&stdout, "durable 1-at-a-time p50", "pair fsync always");
    assert!(p50 > 0.0, "{p50}");
    assert!(
        stdout.contains("its parts here: pair no data dir"),
        "no floor line:\n{stdout}"
    );
}
