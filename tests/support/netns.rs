//! A lab of network namespaces for one test (`scripts/netns-lab.sh`), removed when dropped:
//! shared by the broker's namespace test (`tests/netns.rs`) and the lab's harness tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Namespaces `PREFIX1..PREFIXn` on `NET.0/24`, this host at `NET.1`.
pub struct NetnsLab {
    script: PathBuf,
    /// The namespaces' names without their number (at most 9 characters).
    pub prefix: String,
    /// The first three octets of the lab's addresses.
    pub net: String,
}

impl NetnsLab {
    /// `n` namespaces, or why not. `tag` (two letters) and `net16` (`10.X`) keep the labs of
    /// different test binaries apart; labs of one process get names of their own.
    pub fn up(n: usize, tag: &str, net16: &str) -> Result<NetnsLab, String> {
        static LABS: AtomicU32 = AtomicU32::new(0);
        let k = LABS.fetch_add(1, Ordering::Relaxed) % 10;
        let id = std::process::id();
        // The script is at the workspace root, above this crate or in it.
        let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let script = [here.join("scripts"), here.join("../scripts")]
            .into_iter()
            .map(|d| d.join("netns-lab.sh"))
            .find(|p| p.exists())
            .ok_or("scripts/netns-lab.sh not found")?;
        let lab = NetnsLab {
            script,
            prefix: format!("{tag}{}{k}", id % 100_000),
            net: format!("{net16}.{}", 20 + (id * 10 + k) % 230),
        };
        let out = Command::new("bash")
            .arg(&lab.script)
            .args(["up", &n.to_string(), &lab.prefix, &lab.net])
            .output()
            .map_err(|e| format!("cannot run netns-lab.sh: {e}"))?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
            drop(lab);
            return Err(why);
        }
        // Namespaces that can be made but not entered (some containers) are no lab either.
        let enter = Command::new("ip")
            .args(["netns", "exec", &lab.ns(1), "true"])
            .output()
            .map_err(|e| e.to_string())?;
        if !enter.status.success() {
            let why = String::from_utf8_lossy(&enter.stderr).trim().to_string();
            drop(lab);
            return Err(format!("cannot run a process in a namespace: {why}"));
        }
        Ok(lab)
    }

    /// Namespace `i`'s name.
    pub fn ns(&self, i: usize) -> String {
        format!("{}{i}", self.prefix)
    }

    /// `host:port` of namespace `i`.
    pub fn addr(&self, i: usize, port: u16) -> String {
        format!("{}.{}:{port}", self.net, 10 + i)
    }

    /// Takes namespace `i`'s link down (`false`) or up: a partition by the network.
    pub fn link(&self, i: usize, up: bool) {
        let st = Command::new("ip")
            .args([
                "link",
                "set",
                &format!("{}v{i}", self.prefix),
                if up { "up" } else { "down" },
            ])
            .status()
            .expect("ip link");
        assert!(st.success(), "ip link set failed");
    }
}

impl Drop for NetnsLab {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(&self.script)
            .args(["down", &self.prefix])
            .status();
    }
}
