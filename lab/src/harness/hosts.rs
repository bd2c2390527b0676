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

use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// How a process is started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Launch {
    /// A child of the harness, on this host.
    #[default]
    Local,
    /// A child of the harness inside a network namespace (`ip netns exec`).
    Netns,
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
}

impl Placement {
    /// The command words put before the binary's path.
    pub fn via(&self) -> Vec<String> {
        match (self.launch, &self.netns) {
            (Launch::Netns, Some(ns)) => {
                vec!["ip".into(), "netns".into(), "exec".into(), ns.clone()]
            }
            _ => Vec::new(),
        }
    }

    /// The address of a node placed here.
    pub fn host(&self) -> &str {
        self.address.as_deref().unwrap_or("127.0.0.1")
    }

    /// How the report names it.
    pub fn describe(&self) -> String {
        let place = match (self.launch, &self.netns) {
            (Launch::Netns, Some(ns)) => format!("netns {ns}"),
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
            if node && p.launch == Launch::Netns && p.address.is_none() {
                bail!("[{role}]: a node in a namespace needs the address the others reach it at");
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
        assert_eq!(ok.primary.via(), ["ip", "netns", "exec", "a"]);
        assert!(ok.backup.via().is_empty() && ok.spread());
        let no_addr: Inventory =
            toml::from_str("[backup]\nlaunch = \"netns\"\nnetns = \"b\"\n").expect("parses");
        let e = format!("{:#}", no_addr.check().expect_err("needs an address"));
        assert!(e.contains("[backup]") && e.contains("address"), "{e}");
        assert!(toml::from_str::<Inventory>("[primary]\nlaunch = \"ssh\"\n").is_err());
        assert!(toml::from_str::<Inventory>("[primary]\nhost = \"x\"\n").is_err());
    }
}
