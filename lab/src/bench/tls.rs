//! The relay over TLS: certificates made for the run (a CA and one certificate for both nodes,
//! valid for 127.0.0.1), nodes started with them, readiness asked over TLS.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::figures::Dialer;
use super::{spawn_node, Broker};
use crate::procs::free_port;

/// The run's certificates, in a folder removed with it.
pub(super) struct Pki {
    _dir: tempfile::TempDir,
    pub(super) ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    pub(super) fn make() -> anyhow::Result<Pki> {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose,
        };
        let dir = tempfile::tempdir()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()])?;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        let p = Pki {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("node.pem"),
            key: dir.path().join("node.key"),
            _dir: dir,
        };
        std::fs::write(&p.ca, ca_cert.pem())?;
        std::fs::write(&p.cert, cert.pem())?;
        std::fs::write(&p.key, key.serialize_pem())?;
        Ok(p)
    }

    fn args(&self) -> Vec<String> {
        let s = |p: &Path| p.display().to_string();
        vec![
            "--tls-cert".into(),
            s(&self.cert),
            "--tls-key".into(),
            s(&self.key),
            "--tls-ca".into(),
            s(&self.ca),
        ]
    }
}

/// `STATUS` through `dialer`.
async fn status(dialer: &Dialer, addr: &str) -> Option<String> {
    let (r, mut w) = dialer.dial(addr).await.ok()?;
    w.write_all(b"STATUS\n").await.ok()?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(1),
        BufReader::new(r).read_line(&mut line),
    )
    .await
    .ok()?
    .ok()?;
    Some(line.trim_end().to_string())
}

/// A solo primary or a linked pair, `--compute 0`, with TLS when `pki` is given; ready once
/// the primary's `STATUS` (asked through `dialer`) says so.
pub(super) async fn start(
    bin_dir: &Path,
    replicated: bool,
    threads: Option<usize>,
    pki: Option<&Pki>,
    dialer: &Dialer,
) -> anyhow::Result<Vec<Broker>> {
    let (pp, bp) = (free_port()?, free_port()?);
    let extra = pki.map(Pki::args).unwrap_or_default();
    let peer = if replicated { bp } else { free_port()? };
    let mut v = vec![spawn_node(
        bin_dir, "primary", pp, peer, "0", None, threads, &extra,
    )?];
    if replicated {
        v.push(spawn_node(
            bin_dir, "backup", bp, pp, "0", None, threads, &extra,
        )?);
    }
    let want = if replicated {
        "STATUS|primary|1|up|"
    } else {
        "STATUS|primary|"
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = status(dialer, &v[0].addr).await {
            if s.starts_with(want) {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("the primary at {} was not ready in 10 s", v[0].addr);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(v)
}
