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

#[test]
fn short_harness_run_delivers_everything_across_a_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    let bin = assert_cmd::cargo::cargo_bin("harness");
    let bin_dir = bin.parent().expect("bin dir").to_path_buf();
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
        edgepair::report::DELIVERY_COLUMNS
    );
    assert_eq!(
        headers(&out.join("gaps.csv")),
        edgepair::report::GAP_COLUMNS
    );
    assert_eq!(
        headers(&out.join("latency.csv")),
        edgepair::report::LATENCY_COLUMNS
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
        .deserialize::<edgepair::report::Delivery>()
        .filter_map(Result::ok)
        .filter(|d| d.source == "backup")
        .count();
    assert!(rows > 0, "no delivery came from the backup");
}
