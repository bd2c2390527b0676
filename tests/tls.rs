//! TLS with real processes: certificates made by the test (a CA and one certificate for the
//! nodes, valid for `localhost` and 127.0.0.1), a pair speaking TLS to its clients and mutual
//! TLS to each other, a failover with nothing lost; and what a client without a certificate,
//! or without TLS at all, can do.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// PEM files in a folder: the CA, and a node certificate with its key.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write pem");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// A fresh CA and a certificate it signed for `localhost` and 127.0.0.1, usable by a server
/// and as a client certificate.
fn pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().expect("ca key");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("params");
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("cert");
    let p = Pki {
        ca: dir.path().join("ca.pem"),
        cert: dir.path().join("node.pem"),
        key: dir.path().join("node.key"),
        _dir: dir,
    };
    std::fs::write(&p.ca, ca_cert.pem()).expect("write ca");
    std::fs::write(&p.cert, cert.pem()).expect("write cert");
    write_private(&p.key, &key.serialize_pem());
    p
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A line connection over TLS that trusts `ca` and presents no certificate.
struct TlsLines {
    r: BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
}

/// A TLS client connection to `localhost` that trusts `ca` and presents no certificate.
fn tls_client(ca: &Path) -> rustls::ClientConnection {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("ca") {
        roots.add(c.expect("ca pem")).expect("add ca");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    rustls::ClientConnection::new(Arc::new(cfg), name).expect("client")
}

impl TlsLines {
    fn connect(addr: &str, ca: &Path) -> std::io::Result<TlsLines> {
        let conn = tls_client(ca);
        let tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(5 * SEC))?;
        Ok(TlsLines {
            r: BufReader::new(rustls::StreamOwned::new(conn, tcp)),
        })
    }

    fn send(&mut self, line: &str) -> std::io::Result<()> {
        let s = self.r.get_mut();
        s.write_all(format!("{line}\n").as_bytes())?;
        s.flush()
    }

    fn line(&mut self) -> Option<String> {
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            Ok(n) if n > 0 => Some(l.trim_end().to_string()),
            _ => None,
        }
    }
}

/// `STATUS` over TLS, once it answers with `role` and `link`.
fn wait_tls_status(addr: &str, ca: &Path, role: &str, link: &str) {
    let deadline = Instant::now() + 10 * SEC;
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(mut c) = TlsLines::connect(addr, ca) {
            if c.send("STATUS").is_ok() {
                last = c.line();
                let f: Vec<String> = last
                    .as_deref()
                    .unwrap_or_default()
                    .split('|')
                    .map(String::from)
                    .collect();
                if f.len() > 3 && f[1] == role && f[3] == link {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{addr} never reached {role}/{link} over TLS; last: {last:?}");
}

/// Starts node binary `name` with `args` and the TLS options of `p`.
fn spawn_tls(p: &Pki, name: &str, args: &[&str]) -> ChildGuard {
    let mut all = args.to_vec();
    all.extend([
        "--tls-cert",
        s(&p.cert),
        "--tls-key",
        s(&p.key),
        "--tls-ca",
        s(&p.ca),
    ]);
    spawn_bin(name, &all)
}

#[test]
fn a_pair_on_mutual_tls_carries_a_failover_with_nothing_lost() {
    let p = pki();
    let (pp, bp) = (free_port(), free_port());
    let (pa, ba) = (format!("localhost:{pp}"), format!("localhost:{bp}"));
    let mut primary = spawn_tls(
        &p,
        "primary",
        &[&pp.to_string(), &ba, "--compute", "10..30"],
    );
    let _backup = spawn_tls(&p, "backup", &[&bp.to_string(), &pa, "--compute", "10..30"]);
    let (pl, bl) = (addr(pp), addr(bp));
    wait_tls_status(&pl, &p.ca, "primary", "up");
    wait_tls_status(&bl, &p.ca, "backup", "armed");
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("d.csv");
    let sub = spawn_bin(
        "subscriber",
        &["t", &pa, &ba, "--csv", s(&csv), "--tls-ca", s(&p.ca)],
    );
    sub.wait_stderr("subscribed to 't' on primary");
    sub.wait_stderr("subscribed to 't' on backup");
    let total = 40u64;
    let mut publisher = spawn_bin(
        "test-publisher",
        &[
            "t",
            &pa,
            &ba,
            "--rate",
            "40",
            "--count",
            &total.to_string(),
            "--tls-ca",
            s(&p.ca),
        ],
    );
    assert!(
        wait_until(20 * SEC, || delivered_seqs(&csv).len() as u64 >= total / 3),
        "nothing delivered over TLS before the kill"
    );
    primary.kill9();
    let st = publisher.wait_exit(30 * SEC);
    assert!(
        st.is_some_and(|s| s.success()),
        "not every message was acknowledged"
    );
    let all = wait_until(10 * SEC, || delivered_seqs(&csv).len() as u64 == total);
    let got = delivered_seqs(&csv);
    let missing: Vec<u64> = (1..=total).filter(|s| !got.contains(s)).collect();
    assert!(all, "missing after a failover over TLS: {missing:?}");
    wait_tls_status(&bl, &p.ca, "primary", "down");
}

#[test]
fn without_a_client_certificate_no_peer_handshake_and_without_tls_no_answer() {
    let p = pki();
    let port = free_port();
    let peer = addr(free_port());
    let _node = spawn_tls(&p, "backup", &[&port.to_string(), &peer, "--compute", "0"]);
    let a = addr(port);
    wait_tls_status(&a, &p.ca, "backup", "waiting");
    // A TLS client without a certificate is a client: served, but not a peer.
    let mut c = TlsLines::connect(&a, &p.ca).expect("tls connect");
    c.send("PING").expect("send");
    assert_eq!(c.line().as_deref(), Some("PONG"));
    c.send(&format!("AUTH|hello|{}", "ab".repeat(32)))
        .expect("send");
    let l = c.line().unwrap_or_default();
    assert!(
        l.starts_with("ERR|authentication failed: peer links need mutual TLS"),
        "{l}"
    );
    // Plain TCP gets no answer in our protocol.
    let mut plain = LineConn::connect(&a);
    plain.send_line("PING");
    assert!(
        !matches!(plain.next(2 * SEC), Got::Line(ref l) if l == "PONG"),
        "a plain-TCP client was served by a TLS node"
    );
}

#[test]
fn tls_options_that_do_not_go_together_stop_the_node_and_say_why() {
    let p = pki();
    let port = free_port().to_string();
    let peer = addr(free_port());
    let mut n = spawn_bin(
        "primary",
        &[
            &port,
            &peer,
            "--tls-cert",
            s(&p.cert),
            "--tls-key",
            s(&p.key),
        ],
    );
    let code = n.wait_exit(10 * SEC).expect("exits");
    assert!(!code.success());
    let mut n = spawn_bin(
        "primary",
        &[
            &port,
            &peer,
            "--tls-cert",
            s(&p.ca),
            "--tls-key",
            s(&p.cert),
            "--tls-ca",
            s(&p.ca),
        ],
    );
    let code = n.wait_exit(10 * SEC).expect("exits");
    assert_eq!(code.code(), Some(2));
    n.wait_stderr("key");
}

#[test]
fn a_tls_record_dripped_too_slowly_is_closed_after_the_frame_timeout() {
    use std::io::Read;
    let p = pki();
    let port = free_port();
    let peer = addr(free_port());
    let _node = spawn_tls(
        &p,
        "backup",
        &[
            &port.to_string(),
            &peer,
            "--compute",
            "0",
            "--frame-timeout",
            "400ms",
        ],
    );
    let a = addr(port);
    wait_tls_status(&a, &p.ca, "backup", "waiting");
    // Handshake by hand, then one record holding a whole frame, sent a byte at a time: the
    // node sees bytes arrive but no frame until the record is complete, which it never is.
    let mut conn = tls_client(&p.ca);
    let mut tcp = TcpStream::connect(&a).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).expect("handshake");
    }
    conn.writer().write_all(b"PING\n").expect("plaintext");
    let mut record = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut record).expect("record");
    }
    let start = Instant::now();
    let mut closed_after = None;
    let mut buf = [0u8; 4096];
    // All but the last byte, slowly; a complete record would be answered PONG.
    for b in &record[..record.len() - 1] {
        if tcp.write_all(&[*b]).is_err() {
            closed_after = Some(start.elapsed());
            break;
        }
        match tcp.read(&mut buf) {
            Ok(0) => {
                closed_after = Some(start.elapsed());
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                closed_after = Some(start.elapsed());
                break;
            }
            // The node's ERR and close_notify arrive first, then the end.
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(start.elapsed() < 10 * SEC, "never closed");
    }
    let took = closed_after.expect("the connection was never closed");
    assert!(took >= Duration::from_millis(350), "closed after {took:?}");
    // Others are still served over TLS.
    wait_tls_status(&a, &p.ca, "backup", "waiting");
}
