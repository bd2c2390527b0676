//! The one-shot `publisher` and `test-publisher --count` report by exit status whether every
//! message was acknowledged.

mod common;

use std::time::Duration;

use common::{free_port, spawn_bin, wait_status, LineConn};

#[test]
fn one_shot_publisher_exits_zero_once_acknowledged_and_the_message_arrives() {
    let (pp, bp) = (free_port(), free_port());
    let (pa, ba) = (format!("127.0.0.1:{pp}"), format!("127.0.0.1:{bp}"));
    let _primary = spawn_bin("primary", &[&pp.to_string(), &ba, "--compute", "0"]);
    let _backup = spawn_bin("backup", &[&bp.to_string(), &pa, "--compute", "0"]);
    wait_status(&pa, "primary", "up");
    let mut sub = LineConn::connect(&pa);
    sub.send_line("SUBSCRIBE|one");
    sub.send_line("PING");
    assert_eq!(
        sub.read_line(Duration::from_secs(5)).as_deref(),
        Some("PONG")
    );
    let mut p = spawn_bin("publisher", &["one", "hello|world", &pa, &ba]);
    let st = p.wait_exit(Duration::from_secs(10));
    assert!(st.is_some_and(|s| s.success()), "{st:?}");
    assert_eq!(
        sub.read_line(Duration::from_secs(5)).as_deref(),
        Some("hello|world")
    );
}

#[test]
fn test_publisher_with_count_fails_when_nothing_is_acknowledged() {
    // Neither broker exists: nothing can be acknowledged.
    let (a, b) = (free_port(), free_port());
    let mut p = spawn_bin(
        "test-publisher",
        &[
            "t",
            &a.to_string(),
            &b.to_string(),
            "--count",
            "3",
            "--rate",
            "100",
            "--give-up",
            "1s",
        ],
    );
    let st = p.wait_exit(Duration::from_secs(20));
    assert!(st.is_some_and(|s| !s.success()), "{st:?}");
}

#[test]
fn bad_command_lines_are_refused_with_a_clear_error() {
    let mut p = spawn_bin("test-publisher", &["t|x", "8080", "8081"]);
    let st = p.wait_exit(Duration::from_secs(10));
    assert!(st.is_some_and(|s| s.code() == Some(2)), "{st:?}");
    p.wait_stderr("topic");
    let mut p = spawn_bin("subscriber", &["t", "nohost", "8081"]);
    let st = p.wait_exit(Duration::from_secs(10));
    assert!(st.is_some_and(|s| !s.success()), "{st:?}");
    p.wait_stderr("expected HOST:PORT or PORT");
}
