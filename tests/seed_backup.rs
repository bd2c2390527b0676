//! A seed backup (one that answers our opening `AUTH` as a seed answers an unknown verb) is
//! driven with the seed's REPLICATE/CLEAR by a primary started with `--seed-backup`; one that
//! closes on it is retried. Without the option such a backup is refused (`peers.rs`). Real
//! primary, fake seed backup.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

#[allow(unused_imports)]
use common::*;

// ---------------------------------------------------------------------------------------------
// 4. A seed backup (answers HELLO with anything but HELLO) is driven with REPLICATE/CLEAR.
// ---------------------------------------------------------------------------------------------

/// A fake seed backup: logs every line it receives; answers `REPLICATE` with `ACK`, `PING` with
/// `PONG`, and `AUTH` or `HELLO` (verbs the seed does not know) with `hello_answer`, or closes
/// on them when that is `None`.
fn fake_seed_backup(hello_answer: Option<&'static str>) -> (String, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr").to_string();
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let log = log2.clone();
            std::thread::spawn(move || {
                let Ok(mut w) = s.try_clone() else { return };
                for line in BufReader::new(s).lines().map_while(Result::ok) {
                    if let Ok(mut g) = log.lock() {
                        g.push(line.clone());
                    }
                    let answer = if line.starts_with("HELLO") || line.starts_with("AUTH") {
                        match hello_answer {
                            Some(a) => a,
                            None => return,
                        }
                    } else if line.starts_with("REPLICATE|") {
                        "ACK"
                    } else if line.starts_with("PING") {
                        "PONG"
                    } else if line.starts_with("CLEAR|") {
                        continue;
                    } else {
                        "ERR|unknown verb"
                    };
                    if w.write_all(format!("{answer}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (a, log)
}

fn seed_backup_gets_replicate_and_clear(hello_answer: &'static str) {
    let (fake, log) = fake_seed_backup(Some(hello_answer));
    let pp = free_port();
    let pa = addr(pp);
    let primary = spawn_bin(
        "primary",
        &[&pp.to_string(), &fake, "--compute", "0..5", "--seed-backup"],
    );
    wait_status(&pa, "primary", "up");
    primary.wait_stderr("using seed REPLICATE/CLEAR");
    let mut sub = subscribe(&pa, "s");
    let mut p = LineConn::connect(&pa);
    for (i, payload) in ["a", "b|with pipe", "a"].iter().enumerate() {
        p.send_line(&format!("PUB|s|ps|{}|1|{payload}", i + 1));
        assert_eq!(p.next(5 * SEC), Got::Line(format!("ACK|ps|{}", i + 1)));
        match sub.next(5 * SEC) {
            Got::Line(l) => assert_eq!(parse_msg(&l).3, *payload),
            other => panic!("no delivery of {payload}: {other:?}"),
        }
    }
    let want = [
        "REPLICATE|s|a",
        "CLEAR|s|a",
        "REPLICATE|s|b|with pipe",
        "CLEAR|s|b|with pipe",
        "REPLICATE|s|a",
        "CLEAR|s|a",
    ];
    let ok = wait_until(5 * SEC, || {
        log.lock()
            .map(|g| {
                g.iter()
                    .filter(|l| l.starts_with("REPLICATE|") || l.starts_with("CLEAR|"))
                    .count()
                    >= want.len()
            })
            .unwrap_or(false)
    });
    let lines = log.lock().map(|g| g.clone()).expect("lock");
    assert!(ok, "the seed backup did not get every frame: {lines:?}");
    let data: Vec<&str> = lines
        .iter()
        .map(String::as_str)
        .filter(|l| l.starts_with("REPLICATE|") || l.starts_with("CLEAR|"))
        .collect();
    assert_eq!(data, want, "all lines: {lines:?}");
    // After the first opening (the handshake's `AUTH`) it is never sent the identified
    // dialect, nor `HELLO`.
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("AUTH|")).count(),
        1,
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.starts_with("HELLO|")), "{lines:?}");
    let identified: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("REPL|") || l.starts_with("CLR|") || l.starts_with("STATUS"))
        .collect();
    assert!(
        identified.is_empty(),
        "identified frames sent to a seed backup: {identified:?}"
    );
}

#[test]
fn primary_drives_a_seed_backup_that_answers_err_to_hello_with_replicate_and_clear() {
    seed_backup_gets_replicate_and_clear("ERR|unknown verb 'HELLO'");
}

#[test]
fn primary_drives_a_seed_backup_that_answers_ack_to_hello_with_replicate_and_clear() {
    seed_backup_gets_replicate_and_clear("ACK");
}

/// BACKUP_SYSTEM.md: an opening (`AUTH`) answered by a close is "not there yet" (a backup
/// behind a proxy whose node is down looks like that), so the primary opens again later and
/// never falls back to the seed dialect on a close alone.
#[test]
fn primary_retries_the_opening_on_a_backup_that_closes_without_a_word() {
    let (fake, log) = fake_seed_backup(None);
    let pp = free_port();
    let pa = addr(pp);
    let _primary = spawn_bin(
        "primary",
        &[&pp.to_string(), &fake, "--compute", "0", "--seed-backup"],
    );
    wait_status(&pa, "primary", "down");
    let mut p = LineConn::connect(&pa);
    p.send_line("PUB|s|ps|1|1|a");
    assert_eq!(p.next(5 * SEC), Got::Line("ACK|ps|1".into()));
    let hellos = || {
        log.lock()
            .map(|g| g.iter().filter(|l| l.starts_with("AUTH|hello|")).count())
            .unwrap_or(0)
    };
    assert!(
        wait_until(5 * SEC, || hellos() >= 3),
        "{:?}",
        log.lock().map(|g| g.clone())
    );
    let lines = log.lock().map(|g| g.clone()).unwrap_or_default();
    assert!(
        lines.iter().all(|l| l.starts_with("AUTH|hello|")),
        "only openings, never the seed dialect: {lines:?}"
    );
    wait_status(&pa, "primary", "down");
}
