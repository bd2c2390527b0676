//! `--metrics ADDR`: each node serves Prometheus text that agrees with its `STATUS`, and its
//! counters follow what happens (publishes, ACKs, deliveries, a takeover). Real processes, real
//! HTTP over loopback.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;

/// The body of `GET path` on `addr`, with its status line.
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to metrics");
    s.set_read_timeout(Some(5 * SEC)).expect("timeout");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// The value of an unlabelled metric.
fn value(body: &str, name: &str) -> Option<u64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// STATUS's `(role, epoch, link, held, inflight)`.
fn status_fields(node: &str) -> Vec<String> {
    status(node).split('|').skip(1).map(String::from).collect()
}

#[test]
fn metrics_agree_with_status_and_count_a_failover() {
    let (pm, bm) = (addr(free_port()), addr(free_port()));
    let (mut primary, _backup, pa, ba) = pair(
        &["--compute", "0", "--metrics", &pm],
        &["--compute", "0", "--metrics", &bm],
    );
    let mut sub = subscribe(&pa, "t");
    let mut p = LineConn::connect(&pa);
    for i in 1..=5 {
        p.send_line(&format!("PUB|t|m|{i}|0|x{i}"));
        assert_eq!(p.next(5 * SEC), Got::Line(format!("ACK|m|{i}")));
        assert!(matches!(sub.next(5 * SEC), Got::Line(_)));
    }
    let (line, body) = http_get(&pm, "/metrics");
    assert!(line.contains("200"), "{line}");
    for (name, want) in [
        ("edgepair_primary", 1),
        ("edgepair_link_up", 1),
        ("edgepair_published_total", 5),
        ("edgepair_acknowledged_total", 5),
        ("edgepair_delivered_total", 5),
        ("edgepair_takeovers_total", 0),
        ("edgepair_delivery_seconds_count", 5),
    ] {
        assert_eq!(value(&body, name), Some(want), "{name} in:\n{body}");
    }
    // The same state as STATUS says.
    let st = status_fields(&pa);
    assert_eq!(
        value(&body, "edgepair_epoch").map(|e| e.to_string()),
        Some(st[1].clone())
    );
    assert_eq!(
        value(&body, "edgepair_inflight").map(|e| e.to_string()),
        Some(st[4].clone())
    );
    let (_, body) = http_get(&bm, "/metrics");
    assert_eq!(value(&body, "edgepair_primary"), Some(0), "{body}");
    assert_eq!(value(&body, "edgepair_link_up"), Some(1), "{body}");
    // The primary dies: the backup counts its takeover and its new epoch.
    primary.kill9();
    wait_status(&ba, "primary", "down");
    let (_, body) = http_get(&bm, "/metrics");
    assert_eq!(value(&body, "edgepair_primary"), Some(1), "{body}");
    assert_eq!(value(&body, "edgepair_takeovers_total"), Some(1), "{body}");
    let st = status_fields(&ba);
    assert_eq!(
        value(&body, "edgepair_epoch").map(|e| e.to_string()),
        Some(st[1].clone())
    );
    // Only /metrics is served, and only to HTTP; a refused frame is counted.
    assert!(http_get(&bm, "/other").0.contains("404"));
    let mut junk = TcpStream::connect(&bm).expect("connect");
    junk.write_all(b"PING\r\n\r\n").expect("write");
    let mut text = String::new();
    junk.read_to_string(&mut text).expect("answer");
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    let mut rogue = LineConn::connect(&ba);
    rogue.send_line("HELLO|edgepair/1|primary|99|1");
    assert!(matches!(rogue.next(5 * SEC), Got::Line(l) if l.starts_with("ERR|")));
    let (_, body) = http_get(&bm, "/metrics");
    assert_eq!(value(&body, "edgepair_refused_total"), Some(1), "{body}");
}

#[test]
fn a_metrics_address_that_cannot_be_bound_stops_the_node_and_says_why() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let at = taken.local_addr().expect("addr").to_string();
    let mut n = spawn_bin(
        "primary",
        &[
            &free_port().to_string(),
            &addr(free_port()),
            "--metrics",
            &at,
        ],
    );
    let code = n.wait_exit(10 * SEC).expect("exits");
    assert!(!code.success());
    n.wait_stderr("cannot listen for --metrics");
}
