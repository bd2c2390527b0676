//! A client written to the seed's frame table works against our brokers unchanged: one
//! connection per `PUBLISH`, `SUBSCRIBE` reading bare payload lines, `PING||`, and a seed-style
//! primary replicating to our backup with `REPLICATE`/`CLEAR` (a backup started with
//! `--allow-seed-replicate`: a seed primary cannot authenticate as a peer).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::Duration;

use common::{free_port, spawn_bin, wait_status, Got, LineConn};

#[test]
fn seed_publisher_and_subscriber_work_unchanged() {
    let (pp, bp) = (free_port(), free_port());
    let (pa, ba) = (format!("127.0.0.1:{pp}"), format!("127.0.0.1:{bp}"));
    let _primary = spawn_bin("primary", &[&pp.to_string(), &ba, "--compute", "0..5"]);
    let _backup = spawn_bin("backup", &[&bp.to_string(), &pa, "--compute", "0"]);
    wait_status(&pa, "primary", "up");
    let mut sub = LineConn::connect(&pa);
    sub.send_line("SUBSCRIBE|news");
    sub.send_line("PING||");
    assert_eq!(
        sub.read_line(Duration::from_secs(5)).as_deref(),
        Some("PONG")
    );
    for payload in ["1", "two words", "with|pipes|inside", "1"] {
        // The seed's publisher: a fresh connection per message, one ACK back.
        let mut c = LineConn::connect(&pa);
        c.send_line(&format!("PUBLISH|news|{payload}"));
        assert_eq!(c.read_line(Duration::from_secs(5)).as_deref(), Some("ACK"));
    }
    let got: Vec<String> = (0..4)
        .filter_map(|_| sub.read_line(Duration::from_secs(5)))
        .collect();
    // Bare payload lines, in order; two equal payloads stay two messages.
    assert_eq!(got, vec!["1", "two words", "with|pipes|inside", "1"]);
}

#[test]
fn seed_primary_replicating_to_our_backup_gets_what_it_did_not_clear_delivered() {
    // A fake seed primary: answers PING with PONG until it "dies" (the listener closes).
    let fake = TcpListener::bind("127.0.0.1:0").expect("bind");
    let fake_addr = fake.local_addr().expect("addr").to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let server = std::thread::spawn(move || {
        fake.set_nonblocking(true).expect("nonblocking");
        let mut conns = Vec::new();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((s, _)) = fake.accept() {
                s.set_nonblocking(false).expect("blocking");
                let mut w = s.try_clone().expect("clone");
                conns.push(s.try_clone().expect("clone"));
                std::thread::spawn(move || {
                    for line in BufReader::new(s).lines().map_while(Result::ok) {
                        if line.starts_with("PING") && w.write_all(b"PONG\n").is_err() {
                            return;
                        }
                    }
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for c in conns {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    });
    let bp = free_port();
    let ba = format!("127.0.0.1:{bp}");
    let _backup = spawn_bin(
        "backup",
        &[
            &bp.to_string(),
            &fake_addr,
            "--compute",
            "0",
            "--ping-interval",
            "200ms",
            "--allow-seed-replicate",
        ],
    );
    wait_status(&ba, "backup", "armed");
    let mut sub = LineConn::connect(&ba);
    sub.send_line("SUBSCRIBE|t");
    sub.send_line("PING");
    assert_eq!(
        sub.read_line(Duration::from_secs(5)).as_deref(),
        Some("PONG")
    );
    // The seed primary's replication: two messages, the first one cleared.
    let mut link = LineConn::connect(&ba);
    link.send_line("REPLICATE|t|a");
    link.send_line("REPLICATE|t|b");
    link.send_line("CLEAR|t|a");
    link.send_line("PING");
    // The answers to the REPLICATEs, then the PONG: everything above was processed.
    let mut answers = Vec::new();
    while let Some(l) = link.read_line(Duration::from_secs(5)) {
        let done = l == "PONG";
        answers.push(l);
        if done {
            break;
        }
    }
    assert_eq!(
        answers.last().map(String::as_str),
        Some("PONG"),
        "{answers:?}"
    );
    let mut st = LineConn::connect(&ba);
    st.send_line("STATUS");
    let status = st.read_line(Duration::from_secs(5)).unwrap_or_default();
    assert!(status.starts_with("STATUS|backup|1|armed|1|"), "{status}");
    // The seed primary dies.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(link);
    let _ = server.join();
    // The backup takes over and delivers what was not cleared: b, not a.
    assert_eq!(sub.read_line(Duration::from_secs(10)).as_deref(), Some("b"));
    // And nothing else: the connection stays open and silent (not closed, which would also
    // have read as "no line").
    assert_eq!(sub.next(Duration::from_millis(500)), Got::TimedOut);
}
