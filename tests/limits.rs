//! Each limit of a node is hit by one client while another is served: subscriptions per
//! connection, topic names, publishes awaiting their ACK, and a frame dripped too slowly; and a
//! node raises its open-file limit to fit `--max-connections`.
//! (`--max-connections` and `--max-pending`: `bad_input.rs` and `promises.rs`.) Real
//! processes and sockets.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Another client is served: a `PING` is answered.
fn served(node: &str) {
    let mut c = LineConn::connect(node);
    c.send_line("PING");
    assert_eq!(c.next(5 * SEC), Got::Line("PONG".into()));
}

fn expect_err(c: &mut LineConn, says: &str) {
    match c.next(5 * SEC) {
        Got::Line(l) => assert!(l.starts_with("ERR|") && l.contains(says), "{l}"),
        other => panic!("no ERR ({says}): {other:?}"),
    }
}

#[test]
fn a_subscription_past_the_limit_is_refused_and_the_others_stand() {
    let (_node, a) = solo_primary(&["--compute", "0", "--max-subscriptions", "3"]);
    let mut s = LineConn::connect(&a);
    for t in ["a", "b", "c"] {
        s.send_line(&format!("SUB|{t}"));
    }
    s.send_line("SUB|d");
    expect_err(&mut s, "too many subscriptions on this connection (3");
    // The three stand and `d` was not subscribed: a publish on each reaches only a, b, c.
    let mut p = LineConn::connect(&a);
    for (i, t) in ["d", "a", "b", "c"].iter().enumerate() {
        p.send_line(&format!("PUB|{t}|p|{}|0|x", i + 1));
        assert_eq!(p.next(5 * SEC), Got::Line(format!("ACK|p|{}", i + 1)));
    }
    let got: Vec<String> = (0..3)
        .map(|_| match s.next(5 * SEC) {
            Got::Line(l) => l.split('|').nth(1).unwrap_or_default().to_string(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(got, ["a", "b", "c"]);
    assert_eq!(s.next(Duration::from_millis(300)), Got::TimedOut);
    served(&a);
}

#[test]
fn a_long_topic_or_one_with_a_control_character_is_refused_and_the_connection_goes_on() {
    let (_node, a) = solo_primary(&["--compute", "0", "--max-topic-len", "20"]);
    let mut c = LineConn::connect(&a);
    c.send_line(&format!("PUB|{}|p|1|0|x", "t".repeat(21)));
    expect_err(&mut c, "longer than 20 (--max-topic-len)");
    c.send_line("PUB|bad\u{1b}[2J|p|2|0|x");
    expect_err(&mut c, "control character");
    c.send_line(&format!("SUB|{}", "s".repeat(21)));
    expect_err(&mut c, "longer than 20");
    c.send_line("PUBLISH|seed\u{7}bell|x");
    expect_err(&mut c, "control character");
    // The connection goes on.
    c.send_line(&format!("PUB|{}|p|3|0|x", "t".repeat(20)));
    assert_eq!(c.next(5 * SEC), Got::Line("ACK|p|3".into()));
    served(&a);
}

#[test]
fn a_publisher_at_the_unacked_limit_is_read_no_more_until_its_acks_go_out() {
    // The backup is stopped, so ACKs wait for it (for up to 30 s).
    let (_primary, backup, pa, _ba) = pair(
        &[
            "--compute",
            "0",
            "--max-unacked",
            "16",
            "--repl-timeout",
            "30s",
        ],
        &["--compute", "0"],
    );
    backup.signal(libc::SIGSTOP);
    let mut p = LineConn::connect(&pa);
    let mut burst = String::new();
    for i in 1..=100 {
        burst.push_str(&format!("PUB|t|p|{i}|0|m{i}\n"));
    }
    p.send_bytes(burst.as_bytes());
    // 16 are taken; the rest wait in the socket, while everyone else is served.
    let inflight = |s: String| s.rsplit('|').next().and_then(|v| v.parse::<u64>().ok());
    assert!(
        wait_until(5 * SEC, || inflight(status(&pa)) == Some(16)),
        "{}",
        status(&pa)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(inflight(status(&pa)), Some(16), "read past the limit");
    served(&pa);
    backup.signal(libc::SIGCONT);
    for i in 1..=100 {
        assert_eq!(p.next(10 * SEC), Got::Line(format!("ACK|p|{i}")));
    }
}

#[test]
fn a_frame_dripped_too_slowly_is_closed_and_an_idle_connection_is_not() {
    let (_node, a) = solo_primary(&["--compute", "0", "--frame-timeout", "400ms"]);
    let mut idle = LineConn::connect(&a);
    let mut drip = LineConn::connect(&a);
    let start = Instant::now();
    let mut closed = None;
    for b in b"PUB|t|p|1|0|a very slow payload that never ends"
        .iter()
        .cycle()
    {
        drip.send_bytes(&[*b]);
        match drip.next(Duration::from_millis(100)) {
            Got::TimedOut => {}
            Got::Line(l) => {
                closed = Some(l);
                break;
            }
            other => panic!("{other:?}"),
        }
        assert!(start.elapsed() < 10 * SEC, "never closed");
    }
    let took = start.elapsed();
    let said = closed.unwrap_or_default();
    assert!(
        said.starts_with("ERR|no complete frame within 400ms"),
        "{said}"
    );
    assert!(took >= Duration::from_millis(350), "closed after {took:?}");
    assert!(matches!(drip.next(5 * SEC), Got::Eof | Got::Failed(_)));
    // The idle one, silent all along, is still served.
    idle.send_line("PING");
    assert_eq!(idle.next(5 * SEC), Got::Line("PONG".into()));
    served(&a);
}

#[test]
fn a_frame_timeout_under_100ms_is_refused_at_start() {
    let mut n = spawn_bin(
        "primary",
        &[
            &free_port().to_string(),
            &addr(free_port()),
            "--frame-timeout",
            "50ms",
        ],
    );
    let code = n.wait_exit(10 * SEC).expect("exits");
    assert_eq!(code.code(), Some(2));
    assert!(
        n.logged("at least 100ms"),
        "{:?}",
        n.stderr.lock().map(|l| l.clone())
    );
}

/// A primary started with `--max-connections 1000` under open-file limits of `soft`/`hard`
/// (set before exec), and its address once it serves.
fn primary_with_fd_limits(soft: u64, hard: u64) -> (ChildGuard, String) {
    let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("primary"));
    limit_at_exec(&mut cmd, libc::RLIMIT_NOFILE, soft, hard);
    let (pp, dead) = (free_port(), free_port());
    let (port, dead) = (pp.to_string(), addr(dead));
    let args = [&port, &dead, "--compute", "0", "--max-connections", "1000"];
    let g = spawn_cmd(cmd, "primary", &args, false);
    wait_status(&addr(pp), "primary", "down");
    (g, addr(pp))
}

/// The soft limit of open files of a running process, from `/proc/PID/limits`.
fn open_files_soft(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no open-file limit in {limits}"))
}

#[test]
fn a_node_raises_its_open_file_limit_to_its_connection_limit_and_says_when_it_cannot() {
    // Room under the hard limit (this machine's, if lower than 4,096): raised to
    // --max-connections + 64, as far as that goes.
    let mut ours = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut ours) },
        0
    );
    let hard = ours.rlim_max.min(4096);
    let (node, a) = primary_with_fd_limits(256.min(hard), hard);
    assert_eq!(open_files_soft(node.child.id()), 1064.min(hard));
    served(&a);
    // A hard limit below it: as far as it goes, and a warning names the limit.
    let (node, a) = primary_with_fd_limits(256, 512);
    assert_eq!(open_files_soft(node.child.id()), 512);
    node.wait_stderr("only 512 open files allowed");
    served(&a);
}
