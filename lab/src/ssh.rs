//! Processes on another machine through the OpenSSH client: started, signalled by their PID,
//! and files carried both ways, with nothing but `ssh` and a POSIX shell on the far side.
//!
//! The user's own `ssh` is run, so their `~/.ssh/config`, keys and agent apply (a Raspberry Pi
//! reached as `pi@edge1` here is reached the same way by the harness). Every command runs with
//! `BatchMode=yes` (a password prompt would hang a run) and through one shared connection per
//! host (`ControlMaster`): a signal then costs a round trip, not a new key exchange.
//!
//! A remote process is started as `echo $$ > DIR/NAME.pid; exec BIN ARGS…`, so the shell's PID
//! is the binary's, written where a later `kill -s SIG "$(cat DIR/NAME.pid)"` finds it: a
//! fault reaches the process by its PID, as a local one does. Its output comes back over the
//! ssh session; files (the pair's secret there, the CSVs back) go through `cat` on the far side.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context};
use tokio::process::Command;

/// One remote host as a run uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ssh {
    /// `[user@]host`, or a `Host` of the user's ssh config.
    pub dest: String,
    /// More options for `ssh` (`-p 2222`, `-i KEY`, `-o …`).
    pub options: Vec<String>,
    /// Where the binaries are on that host.
    pub bin_dir: String,
    /// The run's own folder on that host (secret, data, CSVs, PID files).
    pub run_dir: String,
    /// The control socket shared by every command to this host (on this host).
    pub control: PathBuf,
}

/// Quotes words for the remote shell.
fn join(words: &[&str]) -> anyhow::Result<String> {
    shlex::try_join(words.iter().copied()).context("a word cannot be quoted for the remote shell")
}

impl Ssh {
    /// `ssh` with the shared connection and the user's options, ready for a remote command.
    fn ssh(&self) -> std::process::Command {
        let mut c = std::process::Command::new("ssh");
        c.args(["-T", "-o", "BatchMode=yes", "-o", "ControlMaster=auto"])
            .arg("-o")
            .arg(format!("ControlPath={}", self.control.display()))
            // The shared connection outlives a command by a minute at most, even if the
            // harness dies before it closes it.
            .args(["-o", "ControlPersist=60", "-o", "ConnectTimeout=10"])
            .args(&self.options)
            .arg(&self.dest)
            .arg("--");
        c
    }

    /// Runs `script` (already quoted) there and waits; fails with its stderr.
    fn run(&self, script: &str, input: Option<&Path>) -> anyhow::Result<Vec<u8>> {
        let mut c = self.ssh();
        c.arg(script);
        match input {
            Some(p) => {
                let f = std::fs::File::open(p)
                    .with_context(|| format!("cannot read {}", p.display()))?;
                c.stdin(f);
            }
            None => {
                c.stdin(Stdio::null());
            }
        }
        let out = c
            .output()
            .context("cannot run ssh (is the OpenSSH client installed?)")?;
        if !out.status.success() {
            bail!(
                "ssh {}: `{script}` failed ({}): {}",
                self.dest,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out.stdout)
    }

    /// Where the run's file `rel` (a path inside the run's folder) lives there.
    pub fn file(&self, rel: &str) -> String {
        format!("{}/{rel}", self.run_dir.trim_end_matches('/'))
    }

    /// Makes the run's folder there (private to the user).
    pub fn prepare(&self) -> anyhow::Result<()> {
        self.run(
            &format!("umask 077 && mkdir -p {}", join(&[&self.run_dir])?),
            None,
        )
        .map(drop)
    }

    /// Copies the local file `from` to `to` there (mode `mode`, replaced whole).
    pub fn put(&self, from: &Path, to: &str, mode: &str) -> anyhow::Result<()> {
        let tmp = format!("{to}.part");
        let dir = Path::new(to)
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|| ".".into());
        let script = format!(
            "umask 077 && mkdir -p {d} && cat > {t} && chmod {m} {t} && mv -f {t} {to}",
            d = join(&[&dir])?,
            t = join(&[&tmp])?,
            m = join(&[mode])?,
            to = join(&[to])?,
        );
        self.run(&script, Some(from))
            .with_context(|| format!("cannot copy {} to {}:{to}", from.display(), self.dest))
            .map(drop)
    }

    /// Copies `from` there to the local file `to`.
    pub fn fetch(&self, from: &str, to: &Path) -> anyhow::Result<()> {
        let bytes = self
            .run(&format!("cat {}", join(&[from])?), None)
            .with_context(|| format!("cannot fetch {}:{from}", self.dest))?;
        std::fs::write(to, bytes).with_context(|| format!("cannot write {}", to.display()))
    }

    /// The command that starts binary `bin` there with `args`, its PID written to
    /// `NAME.pid` in the run's folder (`name` tells apart several processes of one binary).
    pub fn command(&self, bin: &str, name: &str, args: &[String]) -> anyhow::Result<Command> {
        let bin = format!("{}/{bin}", self.bin_dir.trim_end_matches('/'));
        let pid = self.file(&format!("{name}.pid"));
        let log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        let rust_log = format!("RUST_LOG={log}");
        let mut words: Vec<&str> = vec!["env", &rust_log, &bin];
        words.extend(args.iter().map(String::as_str));
        let script = format!("echo $$ > {} && exec {}", join(&[&pid])?, join(&words)?);
        let mut c = Command::from(self.ssh());
        c.arg(script);
        Ok(c)
    }

    /// Sends `sig` (a name such as `KILL`) to the process started as `name`, by its PID.
    pub fn signal(&self, name: &str, sig: &str) -> anyhow::Result<()> {
        let pid = self.file(&format!("{name}.pid"));
        self.run(
            &format!("kill -s {sig} \"$(cat {})\"", join(&[&pid])?),
            None,
        )
        .map(drop)
    }

    /// Closes the shared connection (a missing one is no error).
    pub fn close(&self) {
        let _ = std::process::Command::new("ssh")
            .arg("-o")
            .arg(format!("ControlPath={}", self.control.display()))
            .args(&self.options)
            .args(["-O", "exit", &self.dest])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The name of a signal as `kill -s` takes it.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "KILL",
        libc::SIGTERM => "TERM",
        libc::SIGSTOP => "STOP",
        libc::SIGCONT => "CONT",
        libc::SIGINT => "INT",
        _ => "TERM",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_command_writes_its_pid_and_execs_the_binary_with_quoted_words() {
        let s = Ssh {
            dest: "pi@edge1".into(),
            options: vec!["-p".into(), "2222".into()],
            bin_dir: "/opt/edge pair/bin/".into(),
            run_dir: "/tmp/run 1".into(),
            control: PathBuf::from("/tmp/cm"),
        };
        let c = s
            .command("primary", "primary", &["7000".into(), "it's".into()])
            .expect("quotes");
        let args: Vec<String> = c
            .as_std()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let script = args.last().expect("script");
        assert!(
            script.starts_with("echo $$ > '/tmp/run 1/primary.pid' && exec env 'RUST_LOG="),
            "{script}"
        );
        assert!(
            script.ends_with("'/opt/edge pair/bin/primary' 7000 \"it's\""),
            "{script}"
        );
        assert!(args.contains(&"pi@edge1".to_string()) && args.contains(&"2222".to_string()));
        assert_eq!(s.file("data/primary"), "/tmp/run 1/data/primary");
        assert_eq!(signal_name(libc::SIGSTOP), "STOP");
    }
}
