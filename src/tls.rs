//! Optional TLS (rustls through tokio-rustls, with the `ring` provider) for client and peer
//! connections.
//!
//! A node given `--tls-cert` and `--tls-key` speaks only TLS on its port. It also connects to
//! its peer over TLS, so it needs `--tls-ca`, the authority that signed the peer's certificate,
//! to check it. With a CA, a node asks every connecting client for a certificate: clients may
//! present none (publishers and subscribers need only `--tls-ca`, to check the node), but a
//! connection may act as the peer only if it presented one signed by that CA (mutual TLS),
//! besides proving the shared secret (`core/auth.rs`). Each node presents its own certificate
//! when it connects to its peer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use thiserror::Error;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::net::BoxStream;

/// Why TLS could not be set up. Each names the file and what is wrong with it.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file could not be read or holds no PEM item of the kind wanted.
    #[error("{what} {path}: {why}")]
    File {
        /// `certificate`, `key`, `CA`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// The options do not go together.
    #[error("{0}")]
    Options(String),
    /// rustls refused the configuration (a key that does not match the certificate, say).
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA could not be made a client verifier.
    #[error("TLS client verifier: {0}")]
    Verifier(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |why: String| TlsError::File {
        what,
        path: path.to_path_buf(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        what: "key",
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca, "CA")? {
        roots.add(c).map_err(|e| TlsError::File {
            what: "CA",
            path: ca.to_path_buf(),
            why: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The connecting side: checks the node's certificate against a CA, and presents a client
/// certificate when it has one.
#[derive(Clone)]
pub struct Client {
    connector: TlsConnector,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("tls::Client")
    }
}

impl Client {
    /// Trusts certificates signed by `ca`; presents `cert` and `key` if given.
    pub fn new(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Client, TlsError> {
        let b = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(ca)?);
        let cfg = match identity {
            Some((cert, k)) => b.with_client_auth_cert(certs(cert, "certificate")?, key(k)?)?,
            None => b.with_no_client_auth(),
        };
        Ok(Client {
            connector: TlsConnector::from(Arc::new(cfg)),
        })
    }

    /// Runs the handshake on `stream`, opened to `addr` (`host:port`): the certificate must be
    /// valid for `host` (a DNS name or an IP address in its subject alternative names).
    pub async fn connect(&self, stream: BoxStream, addr: &str) -> std::io::Result<BoxStream> {
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("'{host}' is not a name TLS can check: {e}"),
            )
        })?;
        let s = self.connector.connect(name, stream).await?;
        Ok(Box::pin(s))
    }
}

/// The accepting side of a node.
#[derive(Clone)]
pub struct Server {
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("tls::Server")
    }
}

impl Server {
    /// Runs the handshake on an accepted `stream`; returns it and whether the client presented
    /// a certificate (only one signed by the CA passes the handshake).
    pub async fn accept(&self, stream: BoxStream) -> std::io::Result<(BoxStream, bool)> {
        let s = self.acceptor.accept(stream).await?;
        let cert = s
            .get_ref()
            .1
            .peer_certificates()
            .is_some_and(|c| !c.is_empty());
        Ok((Box::pin(s), cert))
    }
}

/// A node's TLS: both sides.
#[derive(Clone, Debug)]
pub struct NodeTls {
    /// For accepted connections.
    pub server: Server,
    /// For connections to the peer, presenting this node's certificate.
    pub client: Client,
}

impl NodeTls {
    /// From `--tls-cert`, `--tls-key`, `--tls-ca`: none of them (no TLS), or all three.
    pub fn from_files(
        cert: Option<&Path>,
        key_file: Option<&Path>,
        ca: Option<&Path>,
    ) -> Result<Option<NodeTls>, TlsError> {
        let (cert, key_file, ca) = match (cert, key_file, ca) {
            (None, None, None) => return Ok(None),
            (Some(c), Some(k), Some(a)) => (c, k, a),
            (Some(_), Some(_), None) => {
                return Err(TlsError::Options(
                    "--tls-cert needs --tls-ca: a node connects to its peer over TLS and must \
                     check the peer's certificate against the CA that signed it"
                        .into(),
                ))
            }
            _ => {
                return Err(TlsError::Options(
                    "TLS needs --tls-cert, --tls-key and --tls-ca together".into(),
                ))
            }
        };
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(ca)?),
            provider(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(cert, "certificate")?, key(key_file)?)?;
        Ok(Some(NodeTls {
            server: Server {
                acceptor: TlsAcceptor::from(Arc::new(server)),
            },
            client: Client::new(ca, Some((cert, key_file)))?,
        }))
    }
}
