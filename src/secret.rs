//! Where a node's peer secret comes from (see `core/auth.rs` for what it proves).
//!
//! In this order: `--secret-file FILE`; the file named by `EDGEPAIR_SECRET_FILE`; the secret
//! itself in `EDGEPAIR_SECRET`; else `secret` in the user's config directory
//! (`$XDG_CONFIG_HOME/edgepair`, or `~/.config/edgepair`), made on first start with 32 random
//! bytes. Every node a user starts on one host so shares one secret with no step of theirs,
//! the way Erlang nodes share a cookie; a node on another host needs a copy of the file.
//!
//! Never on the command line, where `ps` shows it to every user of the host. A file that others
//! may read is refused, as ssh refuses such a key: the secret would no longer be one.

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::RngCore;
use thiserror::Error;

use crate::core::PeerKey;

/// The variable naming the secret file.
pub const SECRET_FILE_ENV: &str = "EDGEPAIR_SECRET_FILE";
/// The variable holding the secret itself.
pub const SECRET_ENV: &str = "EDGEPAIR_SECRET";
/// Shortest secret taken, in bytes: a short one can be guessed offline from a recorded
/// handshake.
pub const MIN_SECRET: usize = 16;

/// Why no secret could be had. Each says what to do.
#[derive(Debug, Error)]
pub enum SecretError {
    /// The file could not be read (missing, unreadable).
    #[error("secret file {0}: {1}")]
    Unreadable(PathBuf, std::io::Error),
    /// Others may read (or write) the file.
    #[error(
        "secret file {path} is open to other users (mode {mode:o}): refusing it; \
         run `chmod 600 {path}` (and use a new secret if others may have read it)"
    )]
    Open {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The secret is empty or too short.
    #[error("secret from {0} is {1} bytes: at least {MIN_SECRET} are needed")]
    Short(String, usize),
    /// No place for the default file.
    #[error(
        "no secret: neither HOME nor XDG_CONFIG_HOME is set; give one with --secret-file FILE, \
         {SECRET_FILE_ENV} or {SECRET_ENV}"
    )]
    NoHome,
    /// The default file could not be made.
    #[error("cannot create the secret file {0}: {1}")]
    Create(PathBuf, std::io::Error),
}

/// Where the secret in use came from, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `EDGEPAIR_SECRET`.
    Env,
    /// An existing file.
    File(PathBuf),
    /// The default file, made by this start.
    Created(PathBuf),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Env => write!(f, "${SECRET_ENV}"),
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Created(p) => write!(f, "{} (created now)", p.display()),
        }
    }
}

/// The secret, as the module documentation says, and where it came from.
pub fn load(file: Option<&Path>) -> Result<(PeerKey, Origin), SecretError> {
    if let Some(f) = file {
        return read_file(f).map(|k| (k, Origin::File(f.to_path_buf())));
    }
    if let Some(f) = std::env::var_os(SECRET_FILE_ENV).filter(|v| !v.is_empty()) {
        let f = PathBuf::from(f);
        return read_file(&f).map(|k| (k, Origin::File(f)));
    }
    if let Ok(s) = std::env::var(SECRET_ENV) {
        return key(s.trim().as_bytes(), &format!("${SECRET_ENV}")).map(|k| (k, Origin::Env));
    }
    let path = default_path().ok_or(SecretError::NoHome)?;
    match read_file(&path) {
        Ok(k) => Ok((k, Origin::File(path))),
        Err(SecretError::Unreadable(_, e)) if e.kind() == std::io::ErrorKind::NotFound => {
            create(&path)?;
            read_file(&path).map(|k| (k, Origin::Created(path)))
        }
        Err(e) => Err(e),
    }
}

/// `$XDG_CONFIG_HOME/edgepair/secret`, else `$HOME/.config/edgepair/secret`.
pub fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })?;
    Some(base.join("edgepair").join("secret"))
}

fn key(bytes: &[u8], from: &str) -> Result<PeerKey, SecretError> {
    if bytes.len() < MIN_SECRET {
        return Err(SecretError::Short(from.to_string(), bytes.len()));
    }
    Ok(PeerKey::new(bytes))
}

/// Reads a secret file, refusing one that others may read.
pub fn read_file(path: &Path) -> Result<PeerKey, SecretError> {
    let unreadable = |e| SecretError::Unreadable(path.to_path_buf(), e);
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            return Err(SecretError::Open {
                path: path.to_path_buf(),
                mode,
            });
        }
        if mode & 0o070 != 0 {
            tracing::warn!(
                "secret file {} may be read by its group (mode {mode:o}); chmod 600 it",
                path.display()
            );
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    let bytes = std::fs::read(path).map_err(unreadable)?;
    let text = bytes.trim_ascii();
    key(text, &path.display().to_string())
}

/// Writes a new random secret to `path` (mode 600, its folder 700), unless another node
/// starting at the same moment made it first: it is written aside and linked into place, so a
/// reader never sees half a file and two starts never end with two secrets.
pub fn create(path: &Path) -> Result<(), SecretError> {
    let err = |e| SecretError::Create(path.to_path_buf(), e);
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir).map_err(err)?;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let tmp = dir.join(format!(
        ".secret.{}.{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let written = o.open(&tmp).and_then(|mut f| {
        writeln!(f, "{}", hex::encode(bytes))?;
        f.sync_all()
    });
    let linked = written.and_then(|()| match std::fs::hard_link(&tmp, path) {
        // Another node starting now made it first: theirs is the one.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        other => other.map(|()| true),
    });
    let _ = std::fs::remove_file(&tmp);
    if !linked.map_err(err)? {
        return Ok(());
    }
    tracing::info!(
        "created a peer secret in {}: a node on another host needs a copy of this file \
         (mode 600), or the same secret in ${SECRET_ENV}",
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_others_may_read_or_a_short_secret_is_refused_and_says_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s");
        std::fs::write(&p, "0123456789abcdef0123\n").expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            let e = read_file(&p).expect_err("world-readable").to_string();
            assert!(e.contains("chmod 600") && e.contains("644"), "{e}");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        assert!(read_file(&p).is_ok());
        std::fs::write(&p, "short\n").expect("write");
        let e = read_file(&p).expect_err("short").to_string();
        assert!(e.contains("at least 16"), "{e}");
        let e = read_file(&dir.path().join("missing"))
            .expect_err("missing")
            .to_string();
        assert!(e.contains("missing") && e.contains("No such file"), "{e}");
    }

    #[test]
    fn the_default_file_is_made_once_private_and_then_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("cfg").join("edgepair").join("secret");
        create(&p).expect("create");
        let first = std::fs::read(&p).expect("read");
        create(&p).expect("second create keeps the first");
        assert_eq!(std::fs::read(&p).expect("read"), first);
        assert_eq!(first.trim_ascii().len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert!(read_file(&p).is_ok());
    }
}
