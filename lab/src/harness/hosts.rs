//! Where each process of a run goes (`--hosts FILE`): on this host, or in a network namespace
//! of this host (`scripts/netns-lab.sh`), as if on a machine of its own.
//!
//! ```toml
//! [primary]
//! launch = "netns"          # "local" (the default) or "netns"
//! netns = "eplab1"          # the namespace, for "netns"
//! address = "10.203.0.11"   # where the others reach it (a node also listens there)
//!
//! [backup]
//! launch = "netns"
//! netns = "eplab2"
//! address = "10.203.0.12"
//!
//! [subscriber]
//! launch = "netns"
//! netns = "eplab3"
//!
//! [publisher]
//! launch = "netns"
//! netns = "eplab4"
//! ```
//!
//! Or on another machine, through the OpenSSH client with the user's own config and keys
//! ([`crate::ssh`]):
//!
//! ```toml
//! [backup]
//! launch = "ssh"
//! ssh = "pi@edge1"                  # [user@]host, or a Host of ~/.ssh/config
//! ssh_options = ["-p", "22"]        # more ssh options, if any
//! address = "192.168.1.50"          # where the others reach it
//! bin_dir = "/home/pi/edgepair/bin" # the binaries there (built for that machine)
//! # copy_bins = true                # or copy them there first, from copy_from (default:
//! # copy_from = "target/aarch64-unknown-linux-gnu/release"   # the harness's own folder)
//! # work_dir = "/tmp/edgepair-harness"                        # the runs' files there
//! ```

use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::procs::Launcher;
use crate::ssh::Ssh;

/// How a process is started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Launch {
    /// A child of the harness, on this host.
    #[default]
    Local,
    /// A child of the harness inside a network namespace (`ip netns exec`).
    Netns,
    /// On another machine, through `ssh`.
    Ssh,
}

/// Where one role runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// How it is started.
    #[serde(default)]
    pub launch: Launch,
    /// The namespace, for `netns`.
    pub netns: Option<String>,
    /// The address others reach it at (nodes only; default 127.0.0.1).
    pub address: Option<String>,
    /// The ssh destination, for `ssh`.
    pub ssh: Option<String>,
    /// More options for `ssh`.
    #[serde(default)]
    pub ssh_options: Vec<String>,
    /// Where the binaries are on the remote host (default `WORK_DIR/bin` with `copy_bins`).
    pub bin_dir: Option<String>,
    /// Copy the binaries there before the run.
    #[serde(default)]
    pub copy_bins: bool,
    /// The local folder the binaries are copied from (default: the harness's `--bin-dir`).
    pub copy_from: Option<String>,
    /// The folder on the remote host under which each run gets its own (default
    /// `/tmp/edgepair-harness`).
    pub work_dir: Option<String>,
}

/// Where runs keep their files on a remote host unless told otherwise.
pub const REMOTE_WORK_DIR: &str = "/tmp/edgepair-harness";

impl Placement {
    /// How a run started at `run` (its folder's name) starts this role's processes; `control`
    /// is the local path of the ssh connection shared by the run's commands to that host.
    pub fn launcher(&self, run: &str, control: &Path) -> Launcher {
        match (self.launch, &self.netns, &self.ssh) {
            (Launch::Netns, Some(ns), _) => Launcher::Netns(ns.clone()),
            (Launch::Ssh, _, Some(dest)) => {
                let work = self.work_dir.as_deref().unwrap_or(REMOTE_WORK_DIR);
                let work = work.trim_end_matches('/');
                Launcher::Ssh(std::sync::Arc::new(Ssh {
                    dest: dest.clone(),
                    options: self.ssh_options.clone(),
                    bin_dir: self
                        .bin_dir
                        .clone()
                        .unwrap_or_else(|| format!("{work}/bin")),
                    run_dir: format!("{work}/{run}"),
                    control: control.to_path_buf(),
                }))
            }
            _ => Launcher::Local,
        }
    }

    /// The address of a node placed here.
    pub fn host(&self) -> &str {
        self.address.as_deref().unwrap_or("127.0.0.1")
    }

    /// How the report names it.
    pub fn describe(&self) -> String {
        let place = match (self.launch, &self.netns, &self.ssh) {
            (Launch::Netns, Some(ns), _) => format!("netns {ns}"),
            (Launch::Ssh, _, Some(dest)) => format!("ssh {dest}"),
            _ => "local".to_string(),
        };
        match &self.address {
            Some(a) => format!("{place} ({a})"),
            None => place,
        }
    }
}

/// Every role's placement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// The node started as primary.
    #[serde(default)]
    pub primary: Placement,
    /// The node started as backup.
    #[serde(default)]
    pub backup: Placement,
    /// The subscriber.
    #[serde(default)]
    pub subscriber: Placement,
    /// The test publisher.
    #[serde(default)]
    pub publisher: Placement,
}

impl Inventory {
    /// Reads and checks an inventory file.
    pub fn load(path: &Path) -> anyhow::Result<Inventory> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the inventory {}", path.display()))?;
        let inv: Inventory =
            toml::from_str(&text).with_context(|| format!("inventory {}", path.display()))?;
        inv.check()
            .with_context(|| format!("inventory {}", path.display()))?;
        Ok(inv)
    }

    fn check(&self) -> anyhow::Result<()> {
        for (role, p, node) in [
            ("primary", &self.primary, true),
            ("backup", &self.backup, true),
            ("subscriber", &self.subscriber, false),
            ("publisher", &self.publisher, false),
        ] {
            if p.launch == Launch::Netns && p.netns.is_none() {
                bail!("[{role}]: launch = \"netns\" needs netns = \"NAME\"");
            }
            if node && p.launch != Launch::Local && p.address.is_none() {
                bail!("[{role}]: a node elsewhere needs the address the others reach it at");
            }
            if p.launch == Launch::Ssh {
                if p.ssh.is_none() {
                    bail!("[{role}]: launch = \"ssh\" needs ssh = \"[USER@]HOST\"");
                }
                if p.bin_dir.is_none() && !p.copy_bins {
                    bail!(
                        "[{role}]: say where the binaries are there (bin_dir = \"PATH\") or \
                         copy them (copy_bins = true)"
                    );
                }
            } else if p.ssh.is_some() || p.copy_bins || p.bin_dir.is_some() {
                bail!("[{role}]: ssh, bin_dir and copy_bins are for launch = \"ssh\"");
            }
            if let Some(a) = &p.address {
                a.parse::<std::net::IpAddr>()
                    .map_err(|_| anyhow::anyhow!("[{role}]: address '{a}' is not an IP address"))?;
            }
        }
        Ok(())
    }

    /// Whether any process runs in a namespace (then the fault proxy cannot sit between the
    /// nodes: it runs on this host).
    pub fn spread(&self) -> bool {
        [
            &self.primary,
            &self.backup,
            &self.subscriber,
            &self.publisher,
        ]
        .iter()
        .any(|p| p.launch != Launch::Local)
    }

    /// Whether both nodes run in namespaces with their own addresses: then a partition between
    /// them can be made by the network.
    pub fn nodes_in_namespaces(&self) -> bool {
        [&self.primary, &self.backup]
            .iter()
            .all(|p| p.launch == Launch::Netns && p.netns.is_some() && p.address.is_some())
    }

    /// Cuts (`true`) or heals the link between the two nodes by the network: a blackhole
    /// route to the other node in each node's namespace, so their packets to each other are
    /// dropped while clients still reach both. Healing removes the routes (a missing one is no
    /// error).
    pub fn partition(&self, cut: bool) -> anyhow::Result<()> {
        let pairs = [(&self.primary, &self.backup), (&self.backup, &self.primary)];
        for (me, other) in pairs {
            let (Some(ns), Some(to)) = (&me.netns, &other.address) else {
                bail!("a partition by the network needs both nodes in namespaces with addresses");
            };
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", ns, "ip", "route"])
                .arg(if cut { "add" } else { "del" })
                .args(["blackhole", &format!("{to}/32")])
                .output()
                .context("cannot run ip")?;
            if cut && !out.status.success() {
                bail!(
                    "cannot cut {ns} off from {to}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(())
    }

    /// One line per role, for the report.
    pub fn describe(&self) -> String {
        format!(
            "primary {}, backup {}, subscriber {}, publisher {}",
            self.primary.describe(),
            self.backup.describe(),
            self.subscriber.describe(),
            self.publisher.describe()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inventory_reads_checks_and_says_what_is_wrong() {
        let ok: Inventory = toml::from_str(
            "[primary]\nlaunch = \"netns\"\nnetns = \"a\"\naddress = \"10.1.0.11\"\n",
        )
        .expect("parses");
        ok.check().expect("valid");
        let cm = Path::new("/tmp/cm");
        assert!(matches!(ok.primary.launcher("r", cm), Launcher::Netns(ns) if ns == "a"));
        assert!(matches!(ok.backup.launcher("r", cm), Launcher::Local) && ok.spread());
        let no_addr: Inventory =
            toml::from_str("[backup]\nlaunch = \"netns\"\nnetns = \"b\"\n").expect("parses");
        let e = format!("{:#}", no_addr.check().expect_err("needs an address"));
        assert!(e.contains("[backup]") && e.contains("address"), "{e}");
        let no_dest: Inventory =
            toml::from_str("[subscriber]\nlaunch = \"ssh\"\ncopy_bins = true\n").expect("parses");
        let e = format!("{:#}", no_dest.check().expect_err("needs a destination"));
        assert!(e.contains("[subscriber]") && e.contains("ssh ="), "{e}");
        let no_bins: Inventory =
            toml::from_str("[publisher]\nlaunch = \"ssh\"\nssh = \"pi@edge1\"\n").expect("parses");
        let e = format!("{:#}", no_bins.check().expect_err("needs binaries"));
        assert!(e.contains("bin_dir"), "{e}");
        let far: Inventory = toml::from_str(
            "[backup]\nlaunch = \"ssh\"\nssh = \"pi@edge1\"\naddress = \"192.168.1.50\"\n\
             copy_bins = true\nwork_dir = \"/srv/ep/\"\n",
        )
        .expect("parses");
        far.check().expect("valid");
        match far.backup.launcher("20261130T000000Z", cm) {
            Launcher::Ssh(s) => {
                assert_eq!(s.bin_dir, "/srv/ep/bin");
                assert_eq!(s.run_dir, "/srv/ep/20261130T000000Z");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(far.backup.describe(), "ssh pi@edge1 (192.168.1.50)");
        assert!(toml::from_str::<Inventory>("[primary]\nlaunch = \"telnet\"\n").is_err());
        // The examples the README points to stay valid.
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for f in ["hosts-netns.toml", "hosts-two-devices.toml"] {
            Inventory::load(&examples.join(f)).unwrap_or_else(|e| panic!("{f}: {e:#}"));
        }
        assert!(toml::from_str::<Inventory>("[primary]\nhost = \"x\"\n").is_err());
    }
}
