//! Ctrl-C and SIGTERM stop every binary cleanly (exit status 0), with real signals.

mod common;

use std::time::Duration;

use common::{free_port, spawn_bin, wait_status};

fn stops_cleanly_on(sig: i32) {
    let (pp, bp) = (free_port(), free_port());
    let (pa, ba) = (format!("127.0.0.1:{pp}"), format!("127.0.0.1:{bp}"));
    let mut primary = spawn_bin("primary", &[&pp.to_string(), &ba, "--compute", "0"]);
    let mut backup = spawn_bin("backup", &[&bp.to_string(), &pa, "--compute", "0"]);
    wait_status(&pa, "primary", "up");
    wait_status(&ba, "backup", "armed");
    let mut sub = spawn_bin("subscriber", &["s", &pa, &ba]);
    sub.wait_stderr("subscribed to 's' on primary");
    let mut publisher = spawn_bin("test-publisher", &["s", &pa, &ba, "--rate", "50"]);
    publisher.wait_stderr("publisher");
    // The publisher must have had something acknowledged before it is stopped.
    primary.wait_stderr("subscriber");
    for p in [&mut publisher, &mut sub, &mut backup, &mut primary] {
        p.signal(sig);
        let st = p.wait_exit(Duration::from_secs(15));
        assert!(
            st.is_some_and(|s| s.success()),
            "{} did not stop cleanly on signal {sig}: {st:?}; log: {:?}",
            p.name,
            p.stderr.lock().map(|l| l.clone()).unwrap_or_default()
        );
    }
}

#[test]
fn every_binary_stops_cleanly_on_sigterm() {
    stops_cleanly_on(libc::SIGTERM);
}

#[test]
fn every_binary_stops_cleanly_on_ctrl_c() {
    stops_cleanly_on(libc::SIGINT);
}
