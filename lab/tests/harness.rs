//! The failover harness on a short schedule (kill at 3 s, 2 s after), on free ports: the CI
//! check that delivery is at-least-once across a real SIGKILL, and that every report file is
//! written with its documented columns.

use std::path::Path;
use std::process::Command;

fn headers(path: &Path) -> Vec<String> {
    let mut r = csv::Reader::from_path(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let h: Vec<String> = r
        .headers()
        .expect("header row")
        .iter()
        .map(str::to_string)
        .collect();
    for rec in r.records() {
        rec.unwrap_or_else(|e| panic!("{}: bad row: {e}", path.display()));
    }
    h
}

/// The broker binaries the harness starts live in the other crate of the workspace, so cargo
/// builds them for this test only when the broker's tests are built too (`cargo test` at the
/// root does). A nested `cargo build` here would wait forever on the build lock `cargo test`
/// holds, so instead fail with what to run when they are missing or older than the broker's
/// sources, rather than test stale binaries.
fn broker_binaries_are_built(bin_dir: &Path) {
    let broker_src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../src");
    let newest_src = std::fs::read_dir(&broker_src)
        .into_iter()
        .flatten()
        .chain(
            std::fs::read_dir(broker_src.join("bin"))
                .into_iter()
                .flatten(),
        )
        .flatten()
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max();
    for b in ["primary", "backup", "subscriber", "test-publisher"] {
        let built = std::fs::metadata(bin_dir.join(b)).and_then(|m| m.modified());
        let fresh = match (&built, newest_src) {
            (Ok(b), Some(s)) => *b >= s,
            (Ok(_), None) => true,
            (Err(_), _) => false,
        };
        assert!(
            fresh,
            "{b} in {} is missing or older than the broker's sources: run `cargo build --workspace --bins` (or `cargo test` at the workspace root)",
            bin_dir.display()
        );
    }
}

#[test]
fn short_harness_run_delivers_everything_across_a_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    let bin = assert_cmd::cargo::cargo_bin("harness");
    let bin_dir = bin.parent().expect("bin dir").to_path_buf();
    broker_binaries_are_built(&bin_dir);
    let result = Command::new(&bin)
        .args([
            "--kill-at",
            "3s",
            "--after",
            "2s",
            "--port",
            "0",
            "--no-progress",
        ])
        .arg("--out-dir")
        .arg(&out)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .output()
        .expect("run harness");
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "harness failed ({}):\n{stdout}\n{}",
        result.status,
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(stdout.contains("PASS"), "no PASS verdict:\n{stdout}");

    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("summary.json")).expect("summary.json"),
    )
    .expect("summary.json parses");
    let a = &summary["analysis"];
    assert_eq!(a["missing"].as_array().map(Vec::len), Some(0), "{a}");
    assert!(a["published"].as_u64().unwrap_or(0) >= 40, "{a}");
    assert!(
        a["failover_gap_ms"].as_f64().is_some(),
        "the backup never delivered after the kill: {a}"
    );

    assert_eq!(
        headers(&out.join("deliveries.csv")),
        edgepair_lab::report::DELIVERY_COLUMNS
    );
    assert_eq!(
        headers(&out.join("gaps.csv")),
        edgepair_lab::report::GAP_COLUMNS
    );
    assert_eq!(
        headers(&out.join("latency.csv")),
        edgepair_lab::report::LATENCY_COLUMNS
    );
    for f in [
        "timeline.svg",
        "latency.svg",
        "primary.log",
        "backup.log",
        "subscriber.log",
        "test-publisher.log",
    ] {
        let len = std::fs::metadata(out.join(f)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "{f} missing or empty");
    }
    let svg = std::fs::read_to_string(out.join("timeline.svg")).expect("svg");
    assert!(svg.contains("<svg"));
    let rows = csv::Reader::from_path(out.join("deliveries.csv"))
        .expect("csv")
        .deserialize::<edgepair::client::Delivery>()
        .filter_map(Result::ok)
        .filter(|d| d.source == "backup")
        .count();
    assert!(rows > 0, "no delivery came from the backup");
}
