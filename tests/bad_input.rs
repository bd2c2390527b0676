//! Any byte sequence on a broker's port gets `ERR|reason` or a closed connection, never a panic
//! and never a stall of other clients. Raw TCP against a real `primary` process.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{free_port, spawn_bin, wait_status, ChildGuard, Got, LineConn};

/// A primary with no backup listening (degraded: it acknowledges at once), compute off.
fn primary() -> (ChildGuard, String) {
    let (pp, dead) = (free_port(), free_port());
    let addr = format!("127.0.0.1:{pp}");
    let g = spawn_bin(
        "primary",
        &[
            &pp.to_string(),
            &format!("127.0.0.1:{dead}"),
            "--compute",
            "0",
        ],
    );
    wait_status(&addr, "primary", "down");
    (g, addr)
}

fn expect_err(c: &mut LineConn, what: &str) {
    let l = c.read_line(Duration::from_secs(5));
    assert!(
        l.as_deref().is_some_and(|l| l.starts_with("ERR|")),
        "{what}: expected ERR, got {l:?}"
    );
}

#[test]
fn each_bad_line_gets_err_and_the_connection_goes_on() {
    let (mut p, addr) = primary();
    let mut c = LineConn::connect(&addr);
    c.send_bytes(b"PU\xffBLISH|t|x\n");
    expect_err(&mut c, "non-UTF-8");
    c.send_line("");
    expect_err(&mut c, "empty line");
    c.send_line("FROBNICATE|x");
    expect_err(&mut c, "unknown verb");
    c.send_line("PUBLISH||x");
    expect_err(&mut c, "empty topic");
    c.send_line("PUBLISH|t");
    expect_err(&mut c, "missing payload field");
    c.send_line("PUB|t|p|notanumber|1|x");
    expect_err(&mut c, "bad seq");
    c.send_line("SUBSCRIBE|");
    expect_err(&mut c, "empty subscribe topic");
    for broker_only in ["ACK", "PONG", "MSG|t|p|1|1||x", "STORED|1"] {
        c.send_line(broker_only);
        expect_err(&mut c, broker_only);
    }
    // The same connection still works.
    c.send_line("PING");
    assert_eq!(c.read_line(Duration::from_secs(5)).as_deref(), Some("PONG"));
    c.send_line("PUB|t|p|1|1|ok");
    assert_eq!(
        c.read_line(Duration::from_secs(5)).as_deref(),
        Some("ACK|p|1")
    );
    assert!(p.alive(), "the broker died");
}

#[test]
fn random_garbage_never_kills_the_broker() {
    let (mut p, addr) = primary();
    // A small deterministic generator: no dependency, same bytes every run.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..20 {
        let mut c = LineConn::connect(&addr);
        let junk: Vec<u8> = (0..4096)
            .map(|_| match next() % 20 {
                0 => b'\n',
                1 => b'|',
                _ => (next() % 256) as u8,
            })
            .collect();
        c.send_bytes(&junk);
        c.send_bytes(b"\nPING\n");
        // Skip the ERR lines (and any ACK a lucky PUBLISH earned) until the PONG.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut ponged = false;
        while Instant::now() < deadline {
            match c.read_line(Duration::from_secs(5)) {
                Some(l) if l == "PONG" => {
                    ponged = true;
                    break;
                }
                Some(_) => {}
                None => break,
            }
        }
        assert!(ponged, "a connection fed garbage stopped answering PING");
        assert!(p.alive(), "the broker died on garbage");
    }
    let mut c = LineConn::connect(&addr);
    c.send_line("PING");
    assert_eq!(c.read_line(Duration::from_secs(5)).as_deref(), Some("PONG"));
}

#[test]
fn half_frames_and_floods_do_not_stall_other_clients() {
    let (mut p, addr) = primary();
    // One client holds half a frame open, forever.
    let mut half = TcpStream::connect(&addr).expect("connect");
    half.write_all(b"PUBLISH|t|never-fin").expect("write");
    // Another sends 100 KB without a newline: ERR, then closed.
    let mut flood = LineConn::connect(&addr);
    flood.send_bytes(&vec![b'z'; 100 * 1024]);
    expect_err(&mut flood, "over-long frame");
    // Closed by the broker: EOF (or a reset), promptly, not merely silence until a timeout.
    let t = Instant::now();
    let end = flood.next(Duration::from_secs(5));
    assert!(
        matches!(end, Got::Eof | Got::Failed(_)),
        "over-long frame: connection not closed, got {end:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "closed only after {:?}",
        t.elapsed()
    );
    // A third client is served at once.
    let start = Instant::now();
    let mut ok = LineConn::connect(&addr);
    ok.send_line("PUBLISH|t|hello");
    assert_eq!(ok.read_line(Duration::from_secs(2)).as_deref(), Some("ACK"));
    assert!(start.elapsed() < Duration::from_secs(2));
    // A half frame closed by its sender does not hurt either.
    let mut gone = TcpStream::connect(&addr).expect("connect");
    gone.write_all(b"PUB|t|p|1|").expect("write");
    drop(gone);
    drop(half);
    let mut c = LineConn::connect(&addr);
    c.send_line("PING");
    assert_eq!(c.read_line(Duration::from_secs(5)).as_deref(), Some("PONG"));
    assert!(p.alive());
}

#[test]
fn a_connection_past_the_limit_is_refused_and_the_others_are_served() {
    let port = free_port();
    let (p, dead) = (port.to_string(), format!("127.0.0.1:{}", free_port()));
    let node = common::spawn_bin_capture("primary", &[&p, &dead, "--max-connections", "2"]);
    // Ready once it listens (no STATUS connection: it would count against the two).
    node.wait_stderr("listening on");
    let a_addr = format!("127.0.0.1:{port}");
    let mut a = LineConn::connect(&a_addr);
    a.send_line("PING");
    assert_eq!(a.next(5 * common::SEC), Got::Line("PONG".into()));
    let mut b = LineConn::connect(&a_addr);
    b.send_line("PING");
    assert_eq!(b.next(5 * common::SEC), Got::Line("PONG".into()));
    let mut c = LineConn::connect(&a_addr);
    assert_eq!(
        c.next(5 * common::SEC),
        Got::Line("ERR|too many connections".into())
    );
    assert!(matches!(c.next(5 * common::SEC), Got::Eof | Got::Failed(_)));
    // The node says why (its log line may reach us a moment after the close).
    node.wait_stderr("connections open (--max-connections)");
    // The two it serves are unaffected.
    for conn in [&mut a, &mut b] {
        conn.send_line("PING");
        assert_eq!(conn.next(5 * common::SEC), Got::Line("PONG".into()));
    }
}

/// Bad group frames on a real broker's port: each gets `ERR|…` saying why, and the group is as
/// it was (its one entry still leased to the member that has it, which can still ack it).
#[test]
fn bad_group_frames_get_err_and_change_nothing() {
    let (mut p, addr) = primary();
    let t = Duration::from_secs(5);
    let mut admin = LineConn::connect(&addr);
    admin.send_line("GROUP|create|t|g|first|ack_wait=60000");
    assert_eq!(admin.read_line(t).as_deref(), Some("GROUP|created|t|g"));
    let mut one = LineConn::connect(&addr);
    one.send_line("GROUP|join|t|g|one");
    assert_eq!(one.read_line(t).as_deref(), Some("GROUP|joined|t|g|one"));
    admin.send_line("PUB|t|p|1|1|work");
    assert_eq!(admin.read_line(t).as_deref(), Some("ACK|p|1"));
    let msg = one.read_line(t).unwrap_or_default();
    assert!(msg.starts_with("GROUP|msg|t|g|0|1|p|1|"), "{msg}");
    let mut two = LineConn::connect(&addr);
    two.send_line("GROUP|join|t|g|two");
    assert_eq!(two.read_line(t).as_deref(), Some("GROUP|joined|t|g|two"));
    let (a, o, w) = (0, 1, 2);
    let mut c = [admin, one, two];
    for (who, line, says) in [
        (w, "GROUP|ack|t|g|0", "leased to one"),
        (o, "GROUP|ack|t|g|7", "never delivered"),
        (o, "GROUP|ack|t|nosuch|0", "no group 'nosuch'"),
        (o, "GROUP|ack|t|g|x", "bad"),
        (w, "GROUP|join|t|g|one", "already a member"),
        (w, "GROUP|join|t|g|bad name!", "name"),
        (a, "GROUP|create|t|g|first|ack_wait=5", "other settings"),
        (a, "GROUP|create|t|h|first|max_in_flight=0", "out of range"),
        (
            a,
            "GROUP|create|t|h|first|max_deliver=99999",
            "out of range",
        ),
        (a, "GROUP|create|t|h|soon", "bad group start"),
        (a, "PUB|$groups|x|1|1|forged", "reserved"),
    ] {
        c[who].send_line(line);
        let got = c[who].read_line(t).unwrap_or_default();
        assert!(
            got.starts_with("ERR|") && got.contains(says),
            "{line}: {got}"
        );
    }
    c[a].send_line("GROUP|list|t");
    let info = c[a].read_line(t).unwrap_or_default();
    let f: Vec<&str> = info.split('|').collect();
    // GROUP|info|topic|group|floor|end|pending|lag|redelivered|dead|members
    assert_eq!(
        f.get(2..10),
        Some(&["t", "g", "0", "1", "1", "1", "0", "0"][..]),
        "{info}"
    );
    assert_eq!(c[a].read_line(t).as_deref(), Some("GROUP|end"));
    c[o].send_line("GROUP|ack|t|g|0");
    assert_eq!(c[o].read_line(t).as_deref(), Some("GROUP|acked|t|g|0"));
    assert!(p.alive(), "the broker died");
}
