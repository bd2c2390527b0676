//! The failover across network namespaces (`scripts/netns-lab.sh`): the primary, the backup,
//! the subscriber and the publisher each in a namespace of its own, joined by a bridge; the
//! primary cut off by taking its link down (a partition by the network, not a proxy), then
//! brought back. Where namespaces cannot be made (not root), the test says so and passes
//! without running: it has nothing to exercise there.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[path = "support/netns.rs"]
mod netns_lab;
use netns_lab::NetnsLab as Lab;

/// Starts binary `name` inside namespace `i` of `lab`.
fn spawn_in(lab: &Lab, i: usize, name: &str, args: &[&str]) -> ChildGuard {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.ns(i)])
        .arg(assert_cmd::cargo::cargo_bin(name));
    spawn_cmd(cmd, name, args, false)
}

#[test]
fn a_partition_by_link_down_across_namespaces_loses_nothing() {
    let lab = match Lab::up(4, "ep", "10.203") {
        Ok(l) => l,
        Err(why) => {
            eprintln!("skipped: cannot make network namespaces here: {why}");
            return;
        }
    };
    let (pa, ba) = (lab.addr(1, 8080), lab.addr(2, 8081));
    let bind = |i: usize| format!("{}.{}", lab.net, 10 + i);
    let (b1, b2) = (bind(1), bind(2));
    let _primary = spawn_in(
        &lab,
        1,
        "primary",
        &["8080", &ba, "--bind", &b1, "--compute", "10..30"],
    );
    let _backup = spawn_in(
        &lab,
        2,
        "backup",
        &["8081", &pa, "--bind", &b2, "--compute", "10..30"],
    );
    // This host reaches every namespace through the bridge.
    wait_status(&pa, "primary", "up");
    wait_status(&ba, "backup", "armed");
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("d.csv");
    let sub = spawn_in(
        &lab,
        3,
        "subscriber",
        &["t", &pa, &ba, "--csv", csv.to_str().expect("utf-8")],
    );
    sub.wait_stderr("subscribed to 't' on primary");
    sub.wait_stderr("subscribed to 't' on backup");
    let total = 80u64;
    let mut publisher = spawn_in(
        &lab,
        4,
        "test-publisher",
        &["t", &pa, &ba, "--rate", "20", "--count", &total.to_string()],
    );
    assert!(
        wait_until(20 * SEC, || delivered_seqs(&csv).len() as u64 >= total / 4),
        "nothing delivered across the namespaces"
    );
    // The primary's namespace loses its link: the backup takes over.
    lab.link(1, false);
    wait_status(&ba, "primary", "down");
    std::thread::sleep(Duration::from_secs(2));
    // Back: the old primary learns of the newer reign and steps down.
    lab.link(1, true);
    let st = publisher.wait_exit(40 * SEC);
    assert!(
        st.is_some_and(|s| s.success()),
        "not every message was acknowledged"
    );
    let all = wait_until(15 * SEC, || delivered_seqs(&csv).len() as u64 == total);
    let got = delivered_seqs(&csv);
    let missing: Vec<u64> = (1..=total).filter(|s| !got.contains(s)).collect();
    assert!(all, "missing after a partition by link-down: {missing:?}");
    wait_status(&pa, "backup", "armed");
}
