//! One harness run: start the pair and the clients, inject the faults, drain, judge, report.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::check;
use crate::proxy::{self, Fault};
use crate::report;

use super::*;
use super::{chaos::*, plan::*, progress::*};
use crate::procs::*;
use edgepair::clock::now_us;
use edgepair::net::Net;
/// The `group` scenario's ack-wait: its slow member (1.5–2.5 s of work) outlasts it now and
/// then, so leases run out too.
const GROUP_ACK_WAIT: Duration = Duration::from_secs(2);

/// The `group` scenario's members, by name (their logs and CSVs are `<name>.log`/`.csv`).
const CONSUMERS: [&str; 3] = ["consumer-1", "consumer-2", "consumer-3"];

/// How long a restart waits for a node it sent SIGTERM to to finish stopping before it kills it.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// Runs the whole scenario and writes the report. The returned analysis says whether the run
/// passed (`verdict_ok`); the caller turns that into the exit status.
pub async fn run(opts: HarnessOpts) -> anyhow::Result<Outcome> {
    if !(opts.rate.is_finite() && opts.rate > 0.0) {
        bail!("--rate must be a positive number of messages per second");
    }
    let scenario = effective_scenario(&opts);
    let bin_dir = match &opts.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("harness binary has no folder")?
            .to_path_buf(),
    };
    for b in ["primary", "backup", "subscriber", "test-publisher"] {
        if !bin_dir.join(b).exists() {
            bail!(
                "{} not found in {} (build with `cargo build --release --workspace --bins`)",
                b,
                bin_dir.display()
            );
        }
    }
    let started_us = now_us();
    let dir = match &opts.out_dir {
        Some(d) => d.clone(),
        None => opts.out.join(utc_stamp(started_us)),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if opts.out_dir.is_none() {
        let latest = opts.out.join("latest");
        let _ = std::fs::remove_file(&latest);
        #[cfg(unix)]
        if let Some(name) = dir.file_name() {
            let _ = std::os::unix::fs::symlink(name, &latest);
        }
    }
    let hosts = match &opts.hosts {
        Some(f) => {
            let inv = super::hosts::Inventory::load(f)?;
            // The inventory is part of the report.
            std::fs::copy(f, dir.join("hosts.toml"))
                .with_context(|| format!("cannot copy {} into the report", f.display()))?;
            inv
        }
        None => super::hosts::Inventory::default(),
    };
    // Across namespaces a partition between the nodes is made by the network
    // (`hosts::partition`). The other link faults (a slow link, and a chaos run's partitions)
    // go through the fault proxy, which runs here: across hosts it listens on this host's
    // address toward the primary, and the report says so.
    let by_network =
        hosts.nodes_in_namespaces() && !opts.chaos && scenario == Scenario::PartitionPeers;
    let (pp, bp) = pick_ports(opts.port)?;
    let primary = format!("{}:{pp}", hosts.primary.host());
    let backup = format!("{}:{bp}", hosts.backup.host());
    // Processes on other hosts: each ssh host gets the run's own folder (and the binaries,
    // when the inventory says to copy them), and shares one ssh connection per host.
    let run_name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| utc_stamp(started_us));
    let control_dir = tempfile::Builder::new()
        .prefix("edgepair-ssh-")
        .tempdir()
        .context("cannot make a folder for the ssh connections")?;
    let control = control_dir.path().join("%C");
    let launchers = [
        hosts.primary.launcher(&run_name, &control),
        hosts.backup.launcher(&run_name, &control),
        hosts.subscriber.launcher(&run_name, &control),
        hosts.publisher.launcher(&run_name, &control),
    ];
    let _close_ssh = CloseSsh(launchers.clone());
    let placements = [
        &hosts.primary,
        &hosts.backup,
        &hosts.subscriber,
        &hosts.publisher,
    ];
    // A client elsewhere has its clock read by `edgepair-clock`, from here or copied there.
    let clock_from_here = |i: usize| match launchers[i] {
        Launcher::Local => false,
        Launcher::Netns(_) => true,
        Launcher::Ssh(_) => placements[i].copy_bins && placements[i].copy_from.is_none(),
    };
    if (2..4).any(clock_from_here) && !bin_dir.join("edgepair-clock").exists() {
        bail!(
            "edgepair-clock not found in {} (it reads the clock of a client's host; build with \
             `cargo build --release --workspace --bins`)",
            bin_dir.display()
        );
    }
    let group_run = (scenario == Scenario::Group && !opts.chaos) || opts.group;
    if group_run && !bin_dir.join("consumer").exists() {
        bail!(
            "consumer not found in {} (the group scenario runs three; build with \
             `cargo build --release --workspace --bins`)",
            bin_dir.display()
        );
    }
    let subscriber_bins: &[&str] = if group_run {
        &["subscriber", "edgepair-clock", "consumer"]
    } else {
        &["subscriber", "edgepair-clock"]
    };
    let role_bins: [&[&str]; 4] = [
        &["primary"],
        &["backup"],
        subscriber_bins,
        &["test-publisher", "edgepair-clock"],
    ];
    for ((l, p), bins) in launchers.iter().zip(placements).zip(role_bins) {
        let Launcher::Ssh(ssh) = l else { continue };
        ssh.prepare()?;
        if p.copy_bins {
            let from = p
                .copy_from
                .as_ref()
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| bin_dir.clone());
            for b in bins {
                ssh.put(&from.join(b), &format!("{}/{b}", ssh.bin_dir), "755")?;
            }
        }
    }
    // A file of the run, as the process in role `i` sees it: under the run's folder here, or
    // under the run's folder on its ssh host.
    let file_for = |i: usize, rel: &str| match &launchers[i] {
        Launcher::Ssh(ssh) => ssh.file(rel),
        _ => dir.join(rel).display().to_string(),
    };
    let node_host = [
        hosts.primary.host().to_string(),
        hosts.backup.host().to_string(),
    ];
    let publisher_id = format!("harness-{}", utc_stamp(started_us));
    let chaos_seed = opts.seed.unwrap_or(started_us);
    let (total, mut faults) = if opts.chaos {
        (
            opts.kill_at + opts.cycle * opts.cycles as u32 + opts.after,
            chaos_plan(&opts, chaos_seed),
        )
    } else {
        (opts.kill_at + opts.after, plan(&opts, scenario))
    };
    let mut chaos_events: Vec<ChaosEvent> = Vec::new();
    let label = ["primary", "backup"];
    println!(
        "failover test '{}': primary {primary}, backup {backup}, topic {}, {} msg/s, fault at {:?}, {:?} after; writing {}",
        if opts.chaos { format!("chaos, {} cycles, seed {chaos_seed}", opts.cycles) } else { scenario.name().to_string() },
        opts.topic,
        opts.rate,
        opts.kill_at,
        opts.after,
        dir.display()
    );
    if hosts.spread() {
        println!("hosts: {}", hosts.describe());
    }

    // Peer links go through fault proxies when the scenario needs them.
    let stop_proxies = tokio_util::sync::CancellationToken::new();
    let _stop_proxies_guard = stop_proxies.clone().drop_guard();
    let mut proxies = Vec::new();
    // On one host the proxies listen on loopback; with nodes elsewhere, on this host's address
    // toward them (the bridge of a namespace lab, this machine's LAN address).
    let proxy_host = if node_host.iter().all(|h| h == "127.0.0.1") {
        "127.0.0.1".to_string()
    } else {
        local_address_toward(&primary)?
    };
    let (primary_sees_backup, backup_sees_primary) =
        if !by_network && (opts.chaos || scenario.uses_proxies()) {
            let to_backup = proxy::start(
                Net::Tokio,
                &format!("{proxy_host}:0"),
                backup.clone(),
                stop_proxies.clone(),
            )
            .await?;
            let to_primary = proxy::start(
                Net::Tokio,
                &format!("{proxy_host}:0"),
                primary.clone(),
                stop_proxies.clone(),
            )
            .await?;
            let addrs = (to_backup.addr.clone(), to_primary.addr.clone());
            proxies.push(to_backup);
            proxies.push(to_primary);
            addrs
        } else {
            (backup.clone(), primary.clone())
        };

    let (ltx, lrx) = mpsc::unbounded_channel();
    let counters = Arc::new(Counters::default());
    let takeover_us = Arc::new(AtomicU64::new(0));
    watch_lines(lrx, counters.clone(), takeover_us.clone());

    // The pair's secret is made for this run and kept with it (`peer.secret`, mode 600): a run
    // depends on nothing in the user's home, and its nodes on no other run's.
    let secret = dir.join("peer.secret");
    edgepair::secret::create(&secret)?;
    for l in &launchers[..2] {
        if let Launcher::Ssh(ssh) = l {
            ssh.put(&secret, &ssh.file("peer.secret"), "600")?;
        }
    }
    // Each node serves its metrics, scraped during the run into `metrics.csv`/`metrics.svg`.
    let metrics_at = [
        format!("{}:{}", node_host[0], crate::procs::free_port()?),
        format!("{}:{}", node_host[1], crate::procs::free_port()?),
    ];
    // Each node keeps its log under the run's folder, so a restarted node starts on it and
    // the logs can be inspected after the run (`edgepair-log topics DIR`).
    let broker_args = |port: u16, peer: &str, seed_offset: u64| {
        let mut a = vec![
            port.to_string(),
            peer.to_string(),
            "--compute".into(),
            opts.compute.to_string(),
            "--secret-file".into(),
            file_for(seed_offset as usize, "peer.secret"),
            "--metrics".into(),
            metrics_at[seed_offset as usize].clone(),
            "--data-dir".into(),
            file_for(
                seed_offset as usize,
                &format!("data/{}", label[seed_offset as usize]),
            ),
        ];
        if let Some(s) = opts.seed {
            a.push("--seed".into());
            a.push((s + seed_offset).to_string());
        }
        if node_host[seed_offset as usize] != "127.0.0.1" {
            // Listen where the others reach it (another namespace, another host).
            a.push("--bind".into());
            a.push(node_host[seed_offset as usize].clone());
        }
        a
    };
    let node_args = [
        broker_args(pp, &primary_sees_backup, 0),
        broker_args(bp, &backup_sees_primary, 1),
    ];
    let node_bins = ["primary", "backup"];
    let mut procs: Vec<Proc> = Vec::new();
    procs.push(spawn_logged(
        &launchers[0],
        &bin_dir,
        "primary",
        &node_args[0],
        &dir,
        ltx.clone(),
    )?);
    procs.push(spawn_logged(
        &launchers[1],
        &bin_dir,
        "backup",
        &node_args[1],
        &dir,
        ltx.clone(),
    )?);
    let brokers_started = Instant::now();
    wait_paired(&primary, Some(&backup), Duration::from_secs(10), &mut procs).await?;
    let mut clocks = Vec::new();
    measure_clocks(
        &mut clocks,
        "before",
        [&primary, &backup],
        &launchers,
        &bin_dir,
    )
    .await;
    let (scraped, scraper) = super::scrape::start(vec![
        ("primary", metrics_at[0].clone()),
        ("backup", metrics_at[1].clone()),
    ]);
    let _stop_scraper = AbortOnDrop(scraper);
    let csv_path = dir.join("deliveries.csv");
    let sargs = vec![
        opts.topic.clone(),
        primary.clone(),
        backup.clone(),
        "--csv".into(),
        file_for(2, "deliveries.csv"),
    ];
    procs.push(spawn_logged(
        &launchers[2],
        &bin_dir,
        "subscriber",
        &sargs,
        &dir,
        ltx.clone(),
    )?);
    let c = counters.clone();
    wait_until(
        "the subscriber to reach both brokers",
        Duration::from_secs(10),
        &mut procs,
        || {
            let n = c.subscribed.load(Ordering::Relaxed);
            async move { n >= 2 }
        },
    )
    .await?;
    let acks_path = dir.join("acks.csv");
    let targs = vec![
        opts.topic.clone(),
        primary.clone(),
        backup.clone(),
        "--rate".into(),
        opts.rate.to_string(),
        "--id".into(),
        publisher_id.clone(),
        "--give-up".into(),
        "5s".into(),
        "--acks".into(),
        file_for(3, "acks.csv"),
    ];
    // A node holds the results it computes in its first STARTUP_GRACE (documented in
    // BACKUP_SYSTEM.md), so that subscribers it lost in a previous life can come back first.
    // Publishing before that is over would show the grace as latency of the first messages.
    tokio::time::sleep_until(brokers_started + edgepair::core::STARTUP_GRACE).await;
    let run_start_us = now_us();
    let run_start = Instant::now();
    procs.push(spawn_logged(
        &launchers[3],
        &bin_dir,
        "test-publisher",
        &targs,
        &dir,
        ltx.clone(),
    )?);

    // The group scenario's members: three consumers where the subscriber runs, joined on both
    // nodes (procs 4, 5, 6), and the group's figures scraped from both nodes.
    let mut group_scrape = None;
    // Each life of a member writes its own CSV (`consumer-2.csv`, `consumer-2.2.csv`, …).
    let mut consumer_files: Vec<String> = Vec::new();
    let mut consumer_lives = [1u32; 3];
    let consumer_args = |k: usize, file: &str| {
        let name = CONSUMERS[k];
        vec![
            "g".to_string(),
            opts.topic.clone(),
            primary.clone(),
            backup.clone(),
            "--name".into(),
            name.to_string(),
            "--work".into(),
            // The member killed mid-run is a slow one: it is working on an entry then.
            if k == 1 { "1500..2500" } else { "50..150" }.into(),
            "--ack-wait".into(),
            format!("{}ms", GROUP_ACK_WAIT.as_millis()),
            "--seed".into(),
            (chaos_seed + k as u64).to_string(),
            "--csv".into(),
            file_for(2, file),
        ]
    };
    if group_run {
        for (k, name) in CONSUMERS.iter().enumerate() {
            let file = format!("{name}.csv");
            let args = consumer_args(k, &file);
            consumer_files.push(file);
            procs.push(spawn_logged_as(
                &launchers[2],
                &bin_dir,
                "consumer",
                name,
                &args,
                &dir,
                ltx.clone(),
            )?);
        }
        let c = counters.clone();
        wait_until(
            "the consumers to join their group on the primary",
            Duration::from_secs(10),
            &mut procs,
            || {
                let n = c.joined.load(Ordering::Relaxed);
                async move { n >= CONSUMERS.len() as u64 }
            },
        )
        .await?;
        group_scrape = Some(super::scrape::start_groups(
            vec![("primary", primary.clone()), ("backup", backup.clone())],
            opts.topic.clone(),
        ));
    }
    let mut consumer_kills: Vec<u64> = Vec::new();
    let mut extra_marks: Vec<(u64, String)> = Vec::new();

    // Progress until the end of the publishing window; the faults happen on the way.
    let progress = Progress::new(total, opts.no_progress);
    let mut fault_us = None;
    // Every fault as the checker sees it, and which one is still open (node 0, node 1, link).
    let mut spans: Vec<check::FaultSpan> = Vec::new();
    let mut open: [Option<usize>; 3] = [None; 3];
    let mut next = 0;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        let elapsed = run_start.elapsed();
        while next < faults.len() && elapsed >= faults[next].0 {
            let (_, action) = faults[next];
            next += 1;
            let first_fault = fault_us.is_none();
            if !matches!(action, Action::KillConsumer(_) | Action::RestartConsumer(_)) {
                // A consumer's death is no fault of the pair: the failover is timed from the
                // node fault.
                fault_us.get_or_insert_with(now_us);
            }
            let mut chaos_note = String::new();
            let mut actions = vec![action];
            if let Action::Chaos(kind) = action {
                // Aim at whichever node is active now, and schedule the healing steps.
                let active = active_node(&primary, &backup).await;
                let standby = 1 - active;
                let (acts, target, heal_after, heals): (
                    Vec<Action>,
                    &'static str,
                    Duration,
                    Vec<Action>,
                ) = match kind {
                    ChaosFault::KillActive => (
                        vec![Action::Signal(active, KillSignal::Kill)],
                        label[active],
                        opts.restart_after,
                        vec![Action::Restart(active)],
                    ),
                    ChaosFault::TermActive => (
                        vec![Action::Signal(active, KillSignal::Term)],
                        label[active],
                        opts.restart_after,
                        vec![Action::Restart(active)],
                    ),
                    ChaosFault::HangActive => (
                        vec![Action::Signal(active, KillSignal::Stop)],
                        label[active],
                        opts.hang_for,
                        vec![Action::Resume(active)],
                    ),
                    ChaosFault::KillStandby => (
                        vec![Action::Signal(standby, KillSignal::Kill)],
                        label[standby],
                        opts.restart_after,
                        vec![Action::Restart(standby)],
                    ),
                    ChaosFault::Partition => (
                        vec![Action::Link(Fault::Blackhole)],
                        "link",
                        opts.fault_for,
                        vec![Action::Link(Fault::Pass)],
                    ),
                    ChaosFault::SlowLink => (
                        vec![Action::Link(Fault::Delay(opts.delay))],
                        "link",
                        opts.fault_for,
                        vec![Action::Link(Fault::Pass)],
                    ),
                    ChaosFault::KillConsumer => {
                        // The members in turn.
                        let k = chaos_events.len() % CONSUMERS.len();
                        (
                            vec![Action::KillConsumer(k)],
                            CONSUMERS[k],
                            opts.restart_after,
                            vec![Action::RestartConsumer(k)],
                        )
                    }
                    ChaosFault::PowerLoss | ChaosFault::RestartBoth => {
                        let sig = if kind == ChaosFault::PowerLoss {
                            KillSignal::Kill
                        } else {
                            KillSignal::Term
                        };
                        (
                            vec![Action::Signal(active, sig), Action::Signal(standby, sig)],
                            "both",
                            opts.restart_after,
                            vec![Action::Restart(active), Action::Restart(standby)],
                        )
                    }
                };
                let heal_at = elapsed + heal_after;
                let pos = faults[next..]
                    .iter()
                    .position(|f| f.0 > heal_at)
                    .map_or(faults.len(), |p| next + p);
                faults.splice(pos..pos, heals.into_iter().map(|h| (heal_at, h)));
                chaos_events.push(ChaosEvent {
                    cycle: chaos_events.len() + 1,
                    at_us: now_us(),
                    at_s: elapsed.as_secs_f64(),
                    fault: kind.name(),
                    target,
                    active_before: label[active],
                    failover_gap_ms: None,
                    longest_silence_ms: 0.0,
                    delivered: 0,
                });
                chaos_note = format!("chaos cycle {}: {} → ", chaos_events.len(), kind.name());
                actions = acts;
            }
            for action in actions {
                let now = now_us();
                let mut begin = |slot: usize, kind: check::FaultKind| {
                    open[slot] = Some(spans.len());
                    spans.push(check::FaultSpan {
                        kind,
                        from_us: now,
                        to_us: now,
                    });
                };
                match action {
                    Action::Signal(i, KillSignal::Stop) => begin(i, check::FaultKind::Hang),
                    Action::Signal(i, _) => begin(i, check::FaultKind::Crash),
                    Action::Link(Fault::Blackhole | Fault::Reset) => {
                        begin(2, check::FaultKind::Partition)
                    }
                    Action::Link(Fault::Delay(_)) => begin(2, check::FaultKind::Latency),
                    Action::Resume(i) | Action::Restart(i) => {
                        if let Some(k) = open[i].take() {
                            spans[k].to_us = now;
                        }
                    }
                    Action::Link(Fault::Pass) => {
                        if let Some(k) = open[2].take() {
                            spans[k].to_us = now;
                        }
                    }
                    Action::Chaos(_) | Action::KillConsumer(_) | Action::RestartConsumer(_) => {}
                }
                let what = match action {
                    Action::RestartConsumer(k) => {
                        let i = 4 + k;
                        if let Some(p) = procs.get_mut(i) {
                            let _ = p.child.wait().await;
                        }
                        consumer_lives[k] += 1;
                        let file = format!("{}.{}.csv", CONSUMERS[k], consumer_lives[k]);
                        let args = consumer_args(k, &file);
                        consumer_files.push(file);
                        let p = spawn_logged_as(
                            &launchers[2],
                            &bin_dir,
                            "consumer",
                            CONSUMERS[k],
                            &args,
                            &dir,
                            ltx.clone(),
                        )?;
                        let whereabouts = p.whereabouts();
                        if let Some(slot) = procs.get_mut(i) {
                            *slot = p;
                        }
                        format!("{} restarted ({whereabouts})", CONSUMERS[k])
                    }
                    Action::KillConsumer(k) => {
                        let i = 4 + k;
                        if let Some(p) = procs.get(i) {
                            p.signal(libc::SIGKILL);
                        }
                        consumer_kills.push(now_us());
                        if !opts.chaos {
                            // (A chaos run marks each of its faults already.)
                            extra_marks.push((now_us(), format!("SIGKILL {}", CONSUMERS[k])));
                        }
                        format!(
                            "SIGKILL sent to {} ({})",
                            CONSUMERS[k],
                            procs.get(i).map(|p| p.whereabouts()).unwrap_or_default()
                        )
                    }
                    Action::Signal(i, sig) => {
                        procs[i].signal(sig.number());
                        procs[i].stopped = sig == KillSignal::Stop;
                        if first_fault && procs[i].remote.is_some() {
                            // Over ssh the signal lands a round trip later: the failover is
                            // timed from when it has.
                            fault_us = Some(now_us());
                        }
                        format!(
                            "{} sent to the {} ({})",
                            sig.name(),
                            node_bins[i],
                            procs[i].whereabouts()
                        )
                    }
                    Action::Resume(i) => {
                        procs[i].signal(libc::SIGCONT);
                        procs[i].stopped = false;
                        format!("SIGCONT sent to the {}", node_bins[i])
                    }
                    Action::Restart(i) => {
                        if let Ok(None) = procs[i].child.try_wait() {
                            // A TERM still being honoured: let the clean stop finish (a stop
                            // turned into a crash would be another scenario), then make sure.
                            if tokio::time::timeout(TERM_GRACE, procs[i].child.wait())
                                .await
                                .is_err()
                            {
                                let _ = procs[i].child.kill().await;
                            }
                        }
                        let _ = procs[i].child.wait().await;
                        procs[i] = spawn_logged(
                            &launchers[i],
                            &bin_dir,
                            node_bins[i],
                            &node_args[i],
                            &dir,
                            ltx.clone(),
                        )?;
                        format!("{} restarted ({})", node_bins[i], procs[i].whereabouts())
                    }
                    Action::Link(f) if by_network => {
                        let cut = matches!(f, Fault::Blackhole | Fault::Reset);
                        hosts.partition(cut)?;
                        format!(
                            "primary<->backup link: {f:?} ({} in the nodes' namespaces)",
                            if cut {
                                "blackhole routes"
                            } else {
                                "blackhole routes removed"
                            }
                        )
                    }
                    Action::Link(f) => {
                        for p in &proxies {
                            p.set(f);
                        }
                        format!("primary<->backup link: {f:?}")
                    }
                    Action::Chaos(_) => String::new(),
                };
                progress.println(&format!(
                    "{:>6.2}s  {chaos_note}{what}",
                    elapsed.as_secs_f64()
                ));
            }
        }
        if elapsed >= total {
            break;
        }
        progress.update(elapsed, &counters, opts.kill_at);
        if let Ok(Some(st)) = procs[3].child.try_wait() {
            progress.finish();
            bail!("test-publisher exited early ({st}): see test-publisher.log");
        }
        let wake = faults
            .get(next)
            .map(|f| run_start + f.0)
            .unwrap_or(run_start + total);
        tokio::select! {
            _ = &mut ctrl_c => {
                progress.finish();
                for p in procs.iter_mut().rev() {
                    p.stop(Duration::from_secs(2)).await;
                }
                bail!("interrupted: all processes stopped; partial output in {}", dir.display());
            }
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
    progress.finish();
    drop(ltx);
    for p in &proxies {
        p.set(Fault::Pass);
    }
    if by_network {
        hosts.partition(false)?;
    }
    // A fault still open at the end of publishing (a link never healed) ends here.
    let healed = now_us();
    for k in open.iter().flatten() {
        spans[*k].to_us = healed;
    }

    // Stop publishing; the publisher still collects outstanding ACKs before it exits.
    let pub_status = procs[3].stop(Duration::from_secs(10)).await;
    fetch_back(&launchers[3], "acks.csv", &acks_path);
    // The publisher's own summary line says how many it produced; read it from its log, which
    // is complete once its output readers are done.
    let published = std::fs::read_to_string(dir.join("test-publisher.log"))
        .ok()
        .and_then(|log| {
            log.lines().rev().find_map(|l| {
                l.strip_prefix("published ")?
                    .split(',')
                    .next()?
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or_else(|| counters.published.load(Ordering::Relaxed));
    // Drain: wait until the subscriber has seen every published sequence number or has been
    // quiet for two seconds.
    let drain_deadline = Instant::now() + Duration::from_secs(10);
    let mut last_total = u64::MAX;
    let mut quiet_since = Instant::now();
    loop {
        let seen = distinct_seqs(&csv_path, &publisher_id);
        if published > 0 && seen >= published {
            break;
        }
        let delivered = counters.by_primary.load(Ordering::Relaxed)
            + counters.by_backup.load(Ordering::Relaxed);
        if delivered != last_total {
            last_total = delivered;
            quiet_since = Instant::now();
        }
        if quiet_since.elapsed() > Duration::from_secs(2) || Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    procs[2].stop(Duration::from_secs(5)).await;
    fetch_back(&launchers[2], "deliveries.csv", &csv_path);
    // The group's members finish what they hold (until the group's lag is 0 on a node that
    // serves it, or 15 s), then stop; their CSVs come back.
    let mut group_rows: Vec<edgepair::client::Consumed> = Vec::new();
    let mut group_scrapes: Vec<report::GroupRow> = Vec::new();
    if let Some((rows, task)) = group_scrape.take() {
        let deadline = Instant::now() + Duration::from_secs(15);
        let start_len = rows.lock().map(|g| g.len()).unwrap_or(0);
        loop {
            let done = rows.lock().is_ok_and(|g| {
                g.len() > start_len
                    && g[start_len..]
                        .iter()
                        .any(|r| r.lag == 0 && r.members > 0 && r.end > 0)
            });
            if done || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        task.abort();
        group_scrapes = rows.lock().map(|g| g.clone()).unwrap_or_default();
        for k in 0..CONSUMERS.len() {
            if let Some(p) = procs.get_mut(4 + k) {
                p.stop(Duration::from_secs(3)).await;
            }
        }
        for file in &consumer_files {
            let local = dir.join(file);
            fetch_back(&launchers[2], file, &local);
            if let Ok(mut r) = csv::Reader::from_path(&local) {
                group_rows.extend(r.deserialize().filter_map(Result::ok));
            }
        }
    }
    let end_us = now_us();
    measure_clocks(
        &mut clocks,
        "after",
        [&primary, &backup],
        &launchers,
        &bin_dir,
    )
    .await;
    for i in [1, 0] {
        procs[i].stop(Duration::from_secs(3)).await;
    }
    if !pub_status.is_some_and(|s| s.success()) {
        println!(
            "note: the test publisher reported unacknowledged messages (see test-publisher.log)"
        );
    }

    // What the publisher got acknowledged: without it (an unreadable file) every missing
    // message is judged as lost.
    let acked = match report::read_acks(&acks_path) {
        Ok(a) => Some(a),
        Err(e) => {
            println!("note: acknowledgements unknown ({e:#}): every missing message counts");
            None
        }
    };
    let mut deliveries = report::read_deliveries(&csv_path)?;
    // Across hosts every timestamp is put on this host's clock, by the offsets measured.
    let latency_correction_us = hosts
        .spread()
        .then(|| super::clocks::correct(&mut deliveries, &clocks));
    let info = report::RunInfo {
        published,
        publisher: Some(publisher_id),
        start_us: run_start_us,
        end_us,
        // A chaos run has many faults: no single failover gap, per-cycle figures instead.
        kill_at_us: if opts.chaos { None } else { fault_us },
        publish_period_us: (1e6 / opts.rate) as u64,
        scenario: if opts.chaos {
            format!("chaos ({} cycles, seed {chaos_seed})", opts.cycles)
        } else {
            scenario.name().to_string()
        },
        clocks,
        latency_correction_us,
        hosts: if hosts.spread() {
            format!(
                "{}; primary at {primary}, backup at {backup}{}{}",
                hosts.describe(),
                if by_network {
                    "; partitions made by the network (blackhole routes in the nodes' namespaces)"
                        .to_string()
                } else if !proxies.is_empty() {
                    format!(
                        "; link faults made by the harness's proxy at {proxy_host} (the \
                         peer links go through it)"
                    )
                } else {
                    String::new()
                },
                remote_folders(&launchers)
            )
        } else {
            String::new()
        },
        marks: chaos_events
            .iter()
            .map(|e| (e.at_us, e.fault.to_string()))
            .chain(extra_marks.iter().cloned())
            .collect(),
        faults: spans,
        // The binaries' defaults: the harness passes neither `--resend` nor `--ping-interval`.
        resend: 5,
        ping_interval_us: 1_000_000,
        acked,
        signal: match faults
            .iter()
            .map(|f| f.1)
            .find(|a| !matches!(a, Action::KillConsumer(_) | Action::RestartConsumer(_)))
        {
            Some(Action::Signal(_, s)) => s.name().to_string(),
            Some(Action::Link(f)) => format!("{f:?}"),
            _ => String::new(),
        },
    };
    let mut analysis = report::analyze(&deliveries, &info);
    let group_verdict = group_run.then(|| {
        report::judge_group(
            &group_rows,
            info.publisher.as_deref().unwrap_or_default(),
            published,
            &report::GroupFaults {
                consumer_kills: &consumer_kills,
                primary_kill: fault_us,
                ack_wait_us: GROUP_ACK_WAIT.as_micros() as u64,
                spans: &info.faults,
                ping_interval_us: info.ping_interval_us,
            },
        )
    });
    if let Some(v) = &group_verdict {
        analysis.verdict_ok &= v.ok;
        report::write_group(&dir, &group_scrapes, v, &info)?;
    }
    report::write_reports(&dir, &analysis, &deliveries, &info)?;
    let metrics_rows = scraped.lock().map(|g| g.clone()).unwrap_or_default();
    report::write_metrics(&dir, &metrics_rows, &info)?;
    let mut table = report::render_table(&analysis);
    if let Some(v) = &group_verdict {
        if !v.ok {
            table = table.replacen(
                "PASS:",
                "FAIL: the consumer group lost or acknowledged twice some entries (below);",
                1,
            );
        }
        table.push_str(&report::render_group(v));
    }
    if !info.hosts.is_empty() {
        table.push_str(&format!("  hosts            {}\n", info.hosts));
    }
    if !info.clocks.is_empty() {
        table.push_str(&format!(
            "  clock offsets    {}\n",
            super::clocks::describe(&info.clocks)
        ));
        if let Some((c, u)) = info.latency_correction_us {
            table.push_str(&format!(
                "  latency on one clock: {:+.3} ± {:.3} ms taken off every end-to-end latency \
                 (subscriber's host minus publisher's)\n",
                c as f64 / 1000.0,
                u as f64 / 1000.0
            ));
        }
        // Latencies between hosts are only as good as the clocks they were read on.
        let worst = info
            .clocks
            .iter()
            .map(|c| c.uncertainty_us)
            .max()
            .unwrap_or(0) as f64;
        if worst / 1000.0 > analysis.latency.p50_ms {
            table.push_str(&format!(
                "  warning          a clock offset is uncertain by up to {:.3} ms, more than \
                 the latency p50 ({:.3} ms) it would correct\n",
                worst / 1000.0,
                analysis.latency.p50_ms
            ));
        }
    }
    if opts.chaos {
        chaos_cycles(
            &mut chaos_events,
            &deliveries,
            info.publisher.as_deref(),
            end_us,
        );
        let mut w = csv::Writer::from_path(dir.join("chaos.csv"))?;
        for e in &chaos_events {
            w.serialize(e)?;
        }
        w.flush()?;
        table.push_str(&render_chaos(&chaos_events));
    }
    std::fs::write(dir.join("table.txt"), &table)?;
    println!("{table}");
    let takeover = takeover_us.load(Ordering::Relaxed);
    if let Ok(ev) = counters.events.lock() {
        if !ev.is_empty() {
            let mut notes =
                String::from("\nrole changes and degraded periods (from the brokers' logs):\n");
            for e in ev.iter() {
                notes.push_str(&format!("  {e}\n"));
            }
            print!("{notes}");
            let mut t = std::fs::read_to_string(dir.join("table.txt")).unwrap_or_default();
            t.push_str(&notes);
            std::fs::write(dir.join("table.txt"), t)?;
        }
    }
    if let (Some(k), true) = (fault_us, takeover > 0) {
        println!(
            "backup logged TAKEOVER {:.0} ms after the fault",
            (takeover.saturating_sub(k)) as f64 / 1000.0,
        );
    }
    println!("report: {}", dir.display());
    Ok(Outcome {
        analysis,
        dir,
        chaos: chaos_events,
    })
}

/// Aborts a task when dropped (the metrics scraper, however the run ends).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// This host's address toward `addr` (`host:port`): the source address the kernel picks for
/// it. Nothing is sent (a UDP socket is only connected).
fn local_address_toward(addr: &str) -> anyhow::Result<String> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").context("cannot open a UDP socket")?;
    s.connect(addr)
        .with_context(|| format!("no route from this host to {addr}"))?;
    Ok(s.local_addr()?.ip().to_string())
}

/// Closes the run's shared ssh connections, however the run ends.
struct CloseSsh([Launcher; 4]);

impl Drop for CloseSsh {
    fn drop(&mut self) {
        for l in &self.0 {
            if let Launcher::Ssh(ssh) = l {
                ssh.close();
            }
        }
    }
}

/// Brings the run's file `rel` back from the ssh host of a role (a local one is in place).
/// A failure is said and left to the analysis (a missing CSV is reported there).
fn fetch_back(launcher: &Launcher, rel: &str, to: &std::path::Path) {
    if let Launcher::Ssh(ssh) = launcher {
        if let Err(e) = ssh.fetch(&ssh.file(rel), to) {
            println!("note: {e:#}");
        }
    }
}

/// Reads the clocks of the nodes (over `TIME`, from here) and of the clients' hosts where
/// they run elsewhere (`edgepair-clock` run there against the primary), into `clocks`. A
/// reading that fails is said and left out: the report then shows fewer.
async fn measure_clocks(
    clocks: &mut Vec<super::clocks::ClockReading>,
    when: &str,
    nodes: [&String; 2],
    launchers: &[Launcher; 4],
    bin_dir: &std::path::Path,
) {
    for (name, at) in [("primary", nodes[0]), ("backup", nodes[1])] {
        clocks.extend(super::clocks::measure(name, when, at).await);
    }
    // Against whichever node answered (the primary may be gone after the run).
    let Some((node_addr, node)) = [("primary", nodes[0]), ("backup", nodes[1])]
        .into_iter()
        .find_map(|(n, a)| {
            clocks
                .iter()
                .rev()
                .find(|r| r.node == n && r.when == when)
                .map(|r| (a, r.clone()))
        })
    else {
        return;
    };
    for (i, role) in [(2, "subscriber"), (3, "publisher")] {
        if matches!(launchers[i], Launcher::Local) {
            continue;
        }
        match super::clocks::measure_client(role, when, &launchers[i], bin_dir, node_addr, &node)
            .await
        {
            Ok(r) => clocks.push(r),
            Err(e) => println!("note: the {role}'s clock: {e:#}"),
        }
    }
}

/// Where the roles on ssh hosts kept their files (their logs and CSVs were brought back; the
/// nodes' data stays there).
fn remote_folders(launchers: &[Launcher; 4]) -> String {
    let roles = ["primary", "backup", "subscriber", "publisher"];
    launchers
        .iter()
        .zip(roles)
        .filter_map(|(l, role)| match l {
            Launcher::Ssh(ssh) => Some(format!("; {role}'s files in {}:{}", ssh.dest, ssh.run_dir)),
            _ => None,
        })
        .collect()
}
