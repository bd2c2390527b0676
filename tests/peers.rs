//! Only peers act as peers: a plain client's `HELLO`, `REPL`, `REPLICATE`, `CLR`, `CLEAR`,
//! `MARK` and `STORED` change no role, epoch, held message or delivery, before and after a
//! failover; a wrong secret, a replayed handshake and a missing or open secret file are refused
//! and say why. Real processes and sockets.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// Every frame a rogue client might send to move a node, with a forged epoch of 99.
const FORGED: &[&str] = &[
    "HELLO|edgepair/1|primary|99|1",
    "HELLO|edgepair/1|backup|99|1",
    "REPL|1|t|rogue|1|0|o=0,e=99,rx=0|forged",
    "REPLICATE|t|forged-seed",
    "MARK|t|0|0",
    "CLR|t|1",
    "CLEAR|t|forged-seed",
    "STORED|1",
];

/// Sends every forged frame on one connection; each must be answered `ERR|…`.
fn forge(node: &str) {
    let mut c = LineConn::connect(node);
    for f in FORGED {
        c.send_line(f);
        match c.next(5 * SEC) {
            Got::Line(l) => assert!(l.starts_with("ERR|"), "{f} was answered {l}"),
            other => panic!("{f}: no answer ({other:?})"),
        }
    }
    // The connection still serves as a client's.
    c.send_line("PING");
    assert_eq!(c.next(5 * SEC), Got::Line("PONG".into()));
}

/// `(role, epoch, link, held)` of a node's `STATUS`.
fn state(node: &str) -> (String, u64, String, u64) {
    let s = status(node);
    let f: Vec<&str> = s.split('|').collect();
    assert!(f.len() == 6 && f[0] == "STATUS", "{s}");
    (
        f[1].to_string(),
        f[2].parse().expect("epoch"),
        f[3].to_string(),
        f[4].parse().expect("held"),
    )
}

/// A secret file (mode 600) holding `secret`, in `dir`.
fn secret_file(dir: &std::path::Path, name: &str, secret: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("{secret}\n")).expect("write secret");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    p.display().to_string()
}

#[test]
fn a_rogue_clients_peer_frames_change_nothing_before_and_after_a_failover() {
    let (mut primary, _backup, pa, ba) = pair(&["--compute", "0"], &["--compute", "0"]);
    let subs = [subscribe(&pa, "t"), subscribe(&ba, "t")];
    let before = (state(&pa), state(&ba));
    forge(&pa);
    forge(&ba);
    // No step-down, no adopted epoch, nothing held, the link untouched.
    assert_eq!((state(&pa), state(&ba)), before);
    assert_eq!(before.0 .0, "primary");
    assert_eq!(before.1 .3, 0, "held");
    // Real traffic still flows, then the primary dies and the backup takes over.
    let mut p = LineConn::connect(&pa);
    for i in 1..=5 {
        p.send_line(&format!("PUB|t|real|{i}|0|m{i}"));
        assert_eq!(p.next(5 * SEC), Got::Line(format!("ACK|real|{i}")));
    }
    primary.kill9();
    wait_status(&ba, "primary", "down");
    let (_, epoch, _, _) = state(&ba);
    forge(&ba);
    let after = state(&ba);
    assert_eq!((after.0.as_str(), after.1), ("primary", epoch), "{after:?}");
    let mut p = LineConn::connect(&ba);
    p.send_line("PUB|t|real|6|0|m6");
    assert_eq!(p.next(5 * SEC), Got::Line("ACK|real|6".into()));
    // Every subscriber got the real messages and nothing forged.
    let mut subs = subs;
    let mut seen = Vec::new();
    while let Got::Line(l) = subs[1].next(SEC) {
        seen.push(l);
    }
    while let Got::Line(l) = subs[0].next(Duration::from_millis(200)) {
        seen.push(l);
    }
    assert!(
        seen.iter().all(|l| !l.contains("forged")),
        "a forged message was delivered: {seen:?}"
    );
    assert!(seen.iter().any(|l| l.ends_with("|m6")), "{seen:?}");
}

#[test]
fn a_guessed_proof_is_refused_and_the_connection_closed() {
    let (_primary, _backup, _pa, ba) = pair(&["--compute", "0"], &["--compute", "0"]);
    let before = state(&ba);
    let mut c = LineConn::connect(&ba);
    c.send_line(&format!("AUTH|hello|{}", "ab".repeat(32)));
    let challenge = match c.next(5 * SEC) {
        Got::Line(l) => l,
        other => panic!("no challenge: {other:?}"),
    };
    assert!(challenge.starts_with("AUTH|challenge|"), "{challenge}");
    c.send_line(&format!("AUTH|proof|{}", "00".repeat(32)));
    c.send_line("HELLO|edgepair/1|primary|99|1");
    match c.next(5 * SEC) {
        Got::Line(l) => assert!(l.starts_with("ERR|authentication failed"), "{l}"),
        other => panic!("no refusal: {other:?}"),
    }
    // Closed: the HELLO behind the bad proof was never handled.
    assert_eq!(c.next(5 * SEC), Got::Eof);
    assert_eq!(state(&ba), before);
}

/// A relay between the primary and its backup that records every line the primary sends.
fn recording_relay(to: String) -> (String, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr").to_string();
    let rec = Arc::new(Mutex::new(Vec::new()));
    let rec2 = rec.clone();
    std::thread::spawn(move || {
        for down in l.incoming() {
            let Ok(down) = down else { return };
            let Ok(up) = TcpStream::connect(&to) else {
                continue;
            };
            let (Ok(mut up_w), Ok(mut down_w)) = (up.try_clone(), down.try_clone()) else {
                continue;
            };
            let rec = rec2.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(down).lines().map_while(Result::ok) {
                    if let Ok(mut g) = rec.lock() {
                        g.push(line.clone());
                    }
                    if up_w.write_all(format!("{line}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut BufReader::new(up), &mut down_w);
            });
        }
    });
    (a, rec)
}

#[test]
fn a_recorded_handshake_replayed_to_the_backup_is_refused() {
    let (pp, bp) = (free_port(), free_port());
    let (pa, ba) = (addr(pp), addr(bp));
    let (relay, rec) = recording_relay(ba.clone());
    let _primary = spawn_bin("primary", &[&pp.to_string(), &relay, "--compute", "0"]);
    let _backup = spawn_bin("backup", &[&bp.to_string(), &pa, "--compute", "0"]);
    wait_status(&pa, "primary", "up");
    wait_status(&ba, "backup", "armed");
    // What the primary said to open its link: its nonce, its proof, its HELLO.
    let opening: Vec<String> = rec
        .lock()
        .map(|g| g.iter().take(3).cloned().collect())
        .unwrap_or_default();
    assert!(
        opening.len() == 3
            && opening[0].starts_with("AUTH|hello|")
            && opening[1].starts_with("AUTH|proof|")
            && opening[2].starts_with("HELLO|"),
        "{opening:?}"
    );
    let before = state(&ba);
    let mut c = LineConn::connect(&ba);
    for l in &opening {
        c.send_line(l);
    }
    let challenge = match c.next(5 * SEC) {
        Got::Line(l) => l,
        other => panic!("no challenge: {other:?}"),
    };
    assert!(challenge.starts_with("AUTH|challenge|"), "{challenge}");
    match c.next(5 * SEC) {
        Got::Line(l) => assert!(l.starts_with("ERR|authentication failed"), "{l}"),
        other => panic!("the replay was not refused: {other:?}"),
    }
    assert_eq!(c.next(5 * SEC), Got::Eof);
    assert_eq!(state(&ba), before);
}

#[test]
fn nodes_with_different_secrets_do_not_pair_and_say_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = secret_file(dir.path(), "a", "the primary's own secret, 1");
    let b = secret_file(dir.path(), "b", "the backup's other secret, 2");
    let (pp, bp) = (free_port(), free_port());
    let (pa, ba) = (addr(pp), addr(bp));
    let primary = spawn_bin(
        "primary",
        &[&pp.to_string(), &ba, "--compute", "0", "--secret-file", &a],
    );
    let backup = spawn_bin(
        "backup",
        &[&bp.to_string(), &pa, "--compute", "0", "--secret-file", &b],
    );
    primary.wait_stderr("does not match our secret");
    // The backup follows no one: it answers the primary's polls, but never holds a link.
    let (role, _, link, _) = state(&pa);
    assert_eq!((role.as_str(), link.as_str()), ("primary", "down"));
    assert_eq!(state(&ba).0, "backup");
    assert!(!backup.logged("primary says hello"));
}

#[test]
fn a_missing_or_open_secret_file_stops_the_node_at_start_and_says_why() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope").display().to_string();
    let open = secret_file(dir.path(), "open", "a secret everyone can read");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let short = secret_file(dir.path(), "short", "tiny");
    for (file, says) in [
        (missing.as_str(), "No such file"),
        (open.as_str(), "chmod 600"),
        (short.as_str(), "at least 16"),
    ] {
        let port = free_port().to_string();
        let peer = addr(free_port());
        let mut n = spawn_bin("backup", &[&port, &peer, "--secret-file", file]);
        let code = n.wait_exit(10 * SEC).expect("the node exits");
        assert_eq!(code.code(), Some(2), "{file}");
        assert!(
            n.logged(says),
            "{file}: {:?}",
            n.stderr.lock().map(|l| l.clone())
        );
    }
}

#[test]
fn with_no_secret_anywhere_the_first_node_makes_one_and_the_pair_links() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().expect("tempdir");
    let (pp, bp) = (free_port(), free_port());
    let (pa, ba) = (addr(pp), addr(bp));
    let spawn = |name: &str, port: u16, peer: &str| {
        let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin(name));
        cmd.env("HOME", home.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("EDGEPAIR_SECRET")
            .env_remove("EDGEPAIR_SECRET_FILE");
        spawn_cmd(
            cmd,
            name,
            &[&port.to_string(), peer, "--compute", "0"],
            false,
        )
    };
    // Both start at once: whichever makes the file first, the other uses it.
    let primary = spawn("primary", pp, &ba);
    let _backup = spawn("backup", bp, &pa);
    wait_status(&pa, "primary", "up");
    wait_status(&ba, "backup", "armed");
    let f = home.path().join(".config/edgepair/secret");
    let mode = std::fs::metadata(&f)
        .expect("secret made")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    primary.wait_stderr("peer secret from");
}

#[test]
fn a_seed_replicate_needs_the_option_that_allows_it() {
    let (pp, bp) = (free_port(), free_port());
    let (_pa, ba) = (addr(pp), addr(bp));
    let _backup = spawn_bin("backup", &[&bp.to_string(), &addr(pp), "--compute", "0"]);
    wait_status(&ba, "backup", "waiting");
    let mut c = LineConn::connect(&ba);
    c.send_line("REPLICATE|t|x");
    match c.next(5 * SEC) {
        Got::Line(l) => assert!(l.contains("--allow-seed-replicate"), "{l}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(state(&ba).3, 0, "nothing held");
}

/// A listener on the backup's port that answers the primary's opening with `answer` (and with
/// `reflect`, first sends the primary's own nonce back to the primary as an opening of its
/// own, and records what the primary answers to that).
fn squatter(answer: &'static str, reflect_to: Option<String>) -> (String, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr").to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let seen = seen2.clone();
            let reflect_to = reflect_to.clone();
            std::thread::spawn(move || {
                let Ok(mut w) = s.try_clone() else { return };
                let mut r = BufReader::new(s);
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let line = line.trim_end().to_string();
                if let Some(to) = reflect_to {
                    // The primary's own opening, sent back to its client port.
                    let mut c = LineConn::connect(&to);
                    c.send_line(&line);
                    if let Got::Line(l) = c.next(5 * SEC) {
                        if let Ok(mut g) = seen.lock() {
                            g.push(l);
                        }
                    }
                }
                let _ = w.write_all(format!("{answer}\n").as_bytes());
                std::thread::sleep(2 * SEC);
            });
        }
    });
    (a, seen)
}

#[test]
fn a_node_on_the_backups_port_that_cannot_prove_the_secret_moves_nothing() {
    // Without --seed-backup, neither a HELLO of a newer reign nor a seed-like ERR is taken.
    for answer in ["HELLO|edgepair/1|primary|99|1", "ERR|unknown verb"] {
        let (fake, _) = squatter(answer, None);
        let pp = free_port();
        let pa = addr(pp);
        let primary = spawn_bin("primary", &[&pp.to_string(), &fake, "--compute", "0"]);
        primary.wait_stderr("instead of proving the secret");
        let (role, epoch, link, _) = state(&pa);
        assert_eq!(
            (role.as_str(), epoch, link.as_str()),
            ("primary", 1, "down"),
            "{answer}"
        );
        // It acknowledges alone (degraded), nothing was counted as stored by the fake.
        let mut p = LineConn::connect(&pa);
        p.send_line("PUB|t|p|1|0|x");
        assert_eq!(p.next(5 * SEC), Got::Line("ACK|p|1".into()));
        assert!(!primary.logged("using seed REPLICATE/CLEAR"));
    }
}

#[test]
fn a_node_on_the_backups_port_cannot_reflect_the_primarys_handshake_back_to_it() {
    let pp = free_port();
    let pa = addr(pp);
    let (fake, seen) = squatter("ERR|unknown verb", Some(pa.clone()));
    let primary = spawn_bin("primary", &[&pp.to_string(), &fake, "--compute", "0"]);
    assert!(
        wait_until(10 * SEC, || seen.lock().is_ok_and(|g| !g.is_empty())),
        "the reflection was never answered"
    );
    let answer = seen.lock().map(|g| g[0].clone()).unwrap_or_default();
    assert!(
        answer.starts_with("ERR|authentication failed") && answer.contains("reflection"),
        "the primary answered its own nonce with {answer}"
    );
    primary.wait_stderr("refused a peer handshake");
    assert_eq!(state(&pa).1, 1);
}
