//! The failover across network namespaces (`scripts/netns-lab.sh`): the primary, the backup,
//! the subscriber and the publisher each in a namespace of its own, joined by a bridge; the
//! primary cut off by taking its link down (a partition by the network, not a proxy), then
//! brought back. Where namespaces cannot be made (not root), the test says so and passes
//! without running: it has nothing to exercise there.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// A lab of namespaces, removed when dropped.
struct Lab {
    prefix: String,
    net: String,
}

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/netns-lab.sh")
}

impl Lab {
    /// `n` namespaces, or why not.
    fn up(n: usize) -> Result<Lab, String> {
        let id = std::process::id();
        let lab = Lab {
            prefix: format!("ep{}", id % 100_000),
            net: format!("10.203.{}", 20 + id % 200),
        };
        let out = Command::new("bash")
            .arg(script())
            .args(["up", &n.to_string(), &lab.prefix, &lab.net])
            .output()
            .map_err(|e| format!("cannot run netns-lab.sh: {e}"))?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
            drop(lab);
            return Err(why);
        }
        // Namespaces that can be made but not entered (some containers) are no lab either.
        let enter = Command::new("ip")
            .args(["netns", "exec", &format!("{}1", lab.prefix), "true"])
            .output()
            .map_err(|e| e.to_string())?;
        if !enter.status.success() {
            let why = String::from_utf8_lossy(&enter.stderr).trim().to_string();
            drop(lab);
            return Err(format!("cannot run a process in a namespace: {why}"));
        }
        Ok(lab)
    }

    fn ns(&self, i: usize) -> String {
        format!("{}{i}", self.prefix)
    }

    fn addr(&self, i: usize, port: u16) -> String {
        format!("{}.{}:{port}", self.net, 10 + i)
    }

    /// Takes namespace `i`'s link down (`false`) or up.
    fn link(&self, i: usize, up: bool) {
        let st = Command::new("ip")
            .args([
                "link",
                "set",
                &format!("{}v{i}", self.prefix),
                if up { "up" } else { "down" },
            ])
            .status()
            .expect("ip link");
        assert!(st.success(), "ip link set failed");
    }

    /// Starts binary `name` inside namespace `i`.
    fn spawn(&self, i: usize, name: &str, args: &[&str]) -> ChildGuard {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(i)])
            .arg(assert_cmd::cargo::cargo_bin(name));
        spawn_cmd(cmd, name, args, false)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .args(["down", &self.prefix])
            .status();
    }
}

#[test]
fn a_partition_by_link_down_across_namespaces_loses_nothing() {
    let lab = match Lab::up(4) {
        Ok(l) => l,
        Err(why) => {
            eprintln!("skipped: cannot make network namespaces here: {why}");
            return;
        }
    };
    let (pa, ba) = (lab.addr(1, 8080), lab.addr(2, 8081));
    let bind = |i: usize| format!("{}.{}", lab.net, 10 + i);
    let (b1, b2) = (bind(1), bind(2));
    let _primary = lab.spawn(
        1,
        "primary",
        &["8080", &ba, "--bind", &b1, "--compute", "10..30"],
    );
    let _backup = lab.spawn(
        2,
        "backup",
        &["8081", &pa, "--bind", &b2, "--compute", "10..30"],
    );
    // This host reaches every namespace through the bridge.
    wait_status(&pa, "primary", "up");
    wait_status(&ba, "backup", "armed");
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("d.csv");
    let sub = lab.spawn(
        3,
        "subscriber",
        &["t", &pa, &ba, "--csv", csv.to_str().expect("utf-8")],
    );
    sub.wait_stderr("subscribed to 't' on primary");
    sub.wait_stderr("subscribed to 't' on backup");
    let total = 80u64;
    let mut publisher = lab.spawn(
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
