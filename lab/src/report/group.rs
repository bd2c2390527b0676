//! The `group` scenario's judgement and pictures: every published entry acknowledged by one
//! member (none lost, none acknowledged twice), each redelivery explained by what came before
//! it, each member's share, and the group's lag and pending entries over the run.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::plot::{draw_fault, draw_legend, draw_marks, new_chart_from, plot_err, secs};
use super::RunInfo;
use edgepair::client::Consumed;

/// One scrape of `GROUP|list` on one node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GroupRow {
    /// When (harness clock, µs since the Unix epoch).
    pub at_us: u64,
    /// `primary` or `backup` (the role the node was started in).
    pub node: String,
    /// Every entry below it is done.
    pub floor: u64,
    /// The topic's next offset.
    pub end: u64,
    /// Entries leased now.
    pub pending: u64,
    /// Entries not done from the floor to the end.
    pub lag: u64,
    /// Redeliveries so far.
    pub redelivered: u64,
    /// Dead letters so far.
    pub dead: u64,
    /// Members joined to that node.
    pub members: u64,
}

/// Why an entry was delivered again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Redelivery {
    /// Its member was killed (it held the entry, or crashed on it).
    ConsumerDeath,
    /// The primary died; the new one delivered again what was in flight.
    Failover,
    /// Its member acknowledged too late (the lease had run out).
    LeaseExpiry,
    /// Its member gave it back.
    Nacked,
    /// Both nodes served the group during a link fault: the other node delivered it again.
    SplitBrain,
    /// None of the above.
    Unexplained,
}

/// The group's verdict.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct GroupVerdict {
    /// Entries published (the test publisher's sequence numbers `1..=published`).
    pub published: u64,
    /// Entries acknowledged by some member (confirmed, or sent when the node died).
    pub acked: u64,
    /// Sequence numbers never acknowledged.
    pub missing: Vec<u64>,
    /// Sequence numbers acknowledged more than once (outside a split brain).
    pub acked_twice: Vec<u64>,
    /// Acknowledged more than once, one of the acks inside a link fault's split-brain window:
    /// both nodes served the group then (reported, not judged; see `check::excused_until_us`).
    #[serde(default)]
    pub acked_twice_split_brain: Vec<u64>,
    /// Deliveries that were not an entry's first, by cause.
    pub redeliveries: BTreeMap<String, u64>,
    /// Acknowledged entries per member.
    pub shares: BTreeMap<String, u64>,
    /// Nothing missing, nothing acknowledged twice.
    pub ok: bool,
}

/// What explains a group's redeliveries, and excuses an ack twice.
#[derive(Debug, Clone, Copy, Default)]
pub struct GroupFaults<'a> {
    /// When members were killed (µs, harness clock).
    pub consumer_kills: &'a [u64],
    /// When the primary was first failed.
    pub primary_kill: Option<u64>,
    /// The group's ack-wait, µs.
    pub ack_wait_us: u64,
    /// Every fault of the run, for the split-brain windows of link faults.
    pub spans: &'a [crate::check::FaultSpan],
    /// The backup's ping interval (the windows' length depends on it).
    pub ping_interval_us: u64,
}

/// Judges the members' rows against what was published; `f` explains redeliveries.
pub fn judge_group(
    rows: &[Consumed],
    publisher: &str,
    published: u64,
    f: &GroupFaults<'_>,
) -> GroupVerdict {
    let (consumer_kills, primary_kill, ack_wait_us) =
        (f.consumer_kills, f.primary_kill, f.ack_wait_us);
    let in_split_brain = |t: u64| {
        f.spans.iter().any(|s| {
            s.kind.excuses_split_brain()
                && s.from_us <= t
                && t <= crate::check::excused_until_us(s, f.ping_interval_us)
        })
    };
    let mine: Vec<&Consumed> = rows.iter().filter(|r| r.publisher == publisher).collect();
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    for r in mine.iter().filter(|r| r.outcome == "acked") {
        *acked.entry(r.seq).or_default() += 1;
    }
    let mut shares = BTreeMap::new();
    for r in mine.iter().filter(|r| r.outcome == "acked") {
        *shares.entry(r.consumer.clone()).or_default() += 1;
    }
    let mut redeliveries: BTreeMap<String, u64> = BTreeMap::new();
    for r in mine.iter().filter(|r| r.attempt >= 2) {
        let prev = mine
            .iter()
            .find(|p| p.seq == r.seq && p.attempt + 1 == r.attempt);
        let after = |k: Option<u64>| k.is_some_and(|k| r.received_at_us >= k);
        // What a killed member held goes out again as soon as its connection closes, or
        // within a lease once a member has room.
        let killed_before = consumer_kills
            .iter()
            .any(|k| r.received_at_us >= *k && r.received_at_us - k <= ack_wait_us + 1_000_000);
        let waited_a_lease = r.received_at_us.saturating_sub(r.sent_at_us) >= ack_wait_us;
        let why = match prev.map(|p| (p.outcome.as_str(), p.acked_at_us)) {
            Some(("nacked", _)) => Redelivery::Nacked,
            Some(("refused", _)) => Redelivery::LeaseExpiry,
            // Its member acknowledged after the lease had run out and the entry had gone out
            // again (to it again, when no other member had room, so the late ack still held).
            Some(("acked", at)) if at > r.received_at_us => Redelivery::LeaseExpiry,
            Some(("crashed", _)) => Redelivery::ConsumerDeath,
            // Never answered: the member was still working when its lease ran out (the run's
            // end stopped it later), or its consumer stopped first.
            Some(("dropped", _))
                if prev.is_some_and(|p| {
                    r.received_at_us.saturating_sub(p.received_at_us) >= ack_wait_us
                }) =>
            {
                Redelivery::LeaseExpiry
            }
            Some(("dropped", _)) => Redelivery::ConsumerDeath,
            Some(("unconfirmed", _)) if after(primary_kill) => Redelivery::Failover,
            // A member killed by SIGKILL wrote no row for what it held.
            None if after(primary_kill) && prev_holder_failed_over(r, primary_kill) => {
                Redelivery::Failover
            }
            None | Some(("unconfirmed", _)) if killed_before => Redelivery::ConsumerDeath,
            None if after(primary_kill) => Redelivery::Failover,
            // Its member worked longer than the lease and wrote its row after this one.
            None if waited_a_lease => Redelivery::LeaseExpiry,
            _ if in_split_brain(r.received_at_us)
                || prev.is_some_and(|p| in_split_brain(p.acked_at_us)) =>
            {
                Redelivery::SplitBrain
            }
            _ => Redelivery::Unexplained,
        };
        let key = serde_json::to_value(why)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "unexplained".into());
        *redeliveries.entry(key).or_default() += 1;
    }
    // An ack whose answer never came (the node died first) may have been stored: then the
    // entry is rightly never delivered again, and it counts as finished.
    let finished: std::collections::BTreeSet<u64> = mine
        .iter()
        .filter(|r| r.outcome == "acked" || r.outcome == "unconfirmed")
        .map(|r| r.seq)
        .collect();
    let missing: Vec<u64> = (1..=published).filter(|s| !finished.contains(s)).collect();
    let twice: Vec<u64> = acked
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(s, _)| *s)
        .collect();
    let (acked_twice_split_brain, acked_twice): (Vec<u64>, Vec<u64>) =
        twice.into_iter().partition(|s| {
            mine.iter()
                .filter(|r| r.seq == *s && r.outcome == "acked")
                .any(|r| in_split_brain(r.acked_at_us))
        });
    GroupVerdict {
        published,
        acked: finished.len() as u64,
        ok: missing.is_empty() && acked_twice.is_empty(),
        missing,
        acked_twice,
        acked_twice_split_brain,
        redeliveries,
        shares,
    }
}

/// A redelivery from the node that took over, soon after the primary's death.
fn prev_holder_failed_over(r: &Consumed, primary_kill: Option<u64>) -> bool {
    r.source == "backup"
        && primary_kill.is_some_and(|k| r.received_at_us.saturating_sub(k) < 10_000_000)
}

/// The table lines of the verdict.
pub fn render_group(v: &GroupVerdict) -> String {
    let mut s = format!(
        "  group            {}: {} of {} entries acknowledged{}{}\n",
        if v.ok { "PASS" } else { "FAIL" },
        v.acked,
        v.published,
        if v.missing.is_empty() {
            String::new()
        } else {
            format!(", missing {:?}", v.missing)
        },
        if v.acked_twice.is_empty() {
            ", none twice".to_string()
        } else {
            format!(", acknowledged twice {:?}", v.acked_twice)
        }
    );
    if !v.acked_twice_split_brain.is_empty() {
        s.push_str(&format!(
            "  split brain      {} entr{} acknowledged on both nodes while they both served (excused): {:?}\n",
            v.acked_twice_split_brain.len(),
            if v.acked_twice_split_brain.len() == 1 { "y" } else { "ies" },
            v.acked_twice_split_brain
        ));
    }
    let redel: Vec<String> = v
        .redeliveries
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    s.push_str(&format!(
        "  redeliveries     {}\n",
        if redel.is_empty() {
            "none".into()
        } else {
            redel.join(", ")
        }
    ));
    let shares: Vec<String> = v.shares.iter().map(|(k, n)| format!("{k} {n}")).collect();
    s.push_str(&format!("  shares           {}\n", shares.join(", ")));
    s
}

/// Writes `group.csv` (the scrapes), `group.json` (the verdict) and `group.svg`.
pub fn write_group(
    dir: &Path,
    scrapes: &[GroupRow],
    verdict: &GroupVerdict,
    info: &RunInfo,
) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(dir.join("group.csv"))?;
    for r in scrapes {
        w.serialize(r)?;
    }
    w.flush()?;
    std::fs::write(
        dir.join("group.json"),
        serde_json::to_string_pretty(verdict)?,
    )?;
    let shown: Vec<&GroupRow> = scrapes.iter().filter(|r| r.at_us <= info.end_us).collect();
    if !shown.is_empty() {
        group_svg(&dir.join("group.svg"), &shown, info)?;
    }
    Ok(())
}

const NODE_COLOURS: [RGBColor; 2] = [RGBColor(31, 119, 180), RGBColor(255, 127, 14)];

/// Two panels: the group's lag, and its pending (leased) entries, as each node reports them;
/// the primary's fault and the consumer kills as vertical lines.
fn group_svg(path: &Path, rows: &[&GroupRow], info: &RunInfo) -> anyhow::Result<()> {
    let xmax = secs(info.end_us, info.start_us).max(1.0);
    let xmin = rows
        .iter()
        .map(|r| secs(r.at_us, info.start_us))
        .fold(0.0f64, f64::min);
    let root = SVGBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let panels = root.split_evenly((2, 1));
    let nodes = ["primary", "backup"];
    type Pick = fn(&GroupRow) -> u64;
    let picks: [(&str, &str, Pick); 2] = [
        (
            "consumer group: lag (entries not yet acknowledged), per node",
            "entries",
            |r| r.lag,
        ),
        (
            "consumer group: pending (leased to a member now), per node",
            "entries",
            |r| r.pending,
        ),
    ];
    for (area, (title, y_desc, pick)) in panels.iter().zip(picks) {
        let ymax = rows.iter().map(|r| pick(r) as f64).fold(8.0f64, f64::max) * 1.15;
        let mut chart = new_chart_from(area, title.to_string(), xmin, xmax, ymax, y_desc)?;
        if let Some(k) = info.kill_at_us {
            draw_fault(&mut chart, secs(k, info.start_us), ymax, &info.signal)?;
        }
        draw_marks(&mut chart, info, ymax)?;
        for (i, node) in nodes.iter().enumerate() {
            let c = NODE_COLOURS[i];
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.node == *node)
                .map(|r| (secs(r.at_us, info.start_us), pick(r) as f64))
                .collect();
            chart
                .draw_series(
                    super::metrics::segments(pts)
                        .into_iter()
                        .map(|seg| PathElement::new(seg, c.stroke_width(2))),
                )
                .map_err(plot_err)?
                .label(format!("node started as {node}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 12, y)], c.stroke_width(2))
                });
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        consumer: &str,
        seq: u64,
        attempt: u32,
        at: u64,
        source: &str,
        outcome: &str,
    ) -> Consumed {
        Consumed {
            received_at_us: at,
            source: source.into(),
            consumer: consumer.into(),
            group: "g".into(),
            offset: seq - 1,
            attempt,
            publisher: "p".into(),
            seq,
            sent_at_us: 0,
            acked_at_us: if outcome == "acked" { at + 1 } else { 0 },
            outcome: outcome.into(),
        }
    }

    #[test]
    fn a_group_run_is_judged_and_its_redeliveries_explained() {
        let rows = vec![
            row("a", 1, 1, 10, "primary", "acked"),
            row("b", 2, 1, 20, "primary", "crashed"),
            row("a", 2, 2, 30, "primary", "acked"),
            // Held by a member killed by SIGKILL (no row), then delivered again.
            row("a", 3, 2, 40, "primary", "acked"),
            row("c", 4, 1, 50, "primary", "nacked"),
            row("a", 4, 2, 60, "primary", "acked"),
            // In flight when the primary died.
            row("c", 5, 1, 70, "primary", "unconfirmed"),
            row("c", 5, 2, 110, "backup", "acked"),
        ];
        let f = GroupFaults {
            consumer_kills: &[35],
            primary_kill: Some(100),
            ack_wait_us: 20,
            ..Default::default()
        };
        let v = judge_group(&rows, "p", 5, &f);
        assert!(v.ok, "{v:?}");
        assert_eq!(v.acked, 5);
        assert_eq!(v.redeliveries.get("consumer-death"), Some(&2), "{v:?}");
        assert_eq!(v.redeliveries.get("nacked"), Some(&1));
        assert_eq!(v.redeliveries.get("failover"), Some(&1));
        assert_eq!(v.shares.get("a"), Some(&4));
        // A slow member acknowledged after its lease ran out and the entry went out again, to
        // it again: the late ack held, the second delivery is refused; a lease expiry.
        let mut late = rows.clone();
        late.push(row("d", 7, 1, 200, "primary", "acked"));
        if let Some(r) = late.last_mut() {
            r.acked_at_us = 260;
        }
        late.push(row("d", 7, 2, 240, "primary", "refused"));
        // A member still working when its lease ran out, stopped before it answered.
        late.push(row("e", 8, 1, 300, "primary", "dropped"));
        late.push(row("a", 8, 2, 320, "primary", "acked"));
        let v = judge_group(&late, "p", 5, &f);
        assert_eq!(v.redeliveries.get("lease-expiry"), Some(&2), "{v:?}");
        assert_eq!(v.redeliveries.get("unexplained"), None, "{v:?}");
        let mut twice = rows.clone();
        twice.push(row("c", 1, 2, 120, "backup", "acked"));
        let v = judge_group(&twice, "p", 6, &f);
        assert!(
            !v.ok && v.acked_twice == vec![1] && v.missing == vec![6],
            "{v:?}"
        );
        assert!(render_group(&v).contains("FAIL"));
        // The same second ack inside a partition's window is split brain: excused.
        let spans = [crate::check::FaultSpan {
            kind: crate::check::FaultKind::Partition,
            from_us: 100,
            to_us: 130,
        }];
        let v = judge_group(
            &twice,
            "p",
            5,
            &GroupFaults {
                spans: &spans,
                ping_interval_us: 1000,
                ..f
            },
        );
        assert!(v.ok && v.acked_twice_split_brain == vec![1], "{v:?}");
        // And its delivery again, by the other node, is explained by it.
        assert_eq!(v.redeliveries.get("split-brain"), Some(&1), "{v:?}");
        assert_eq!(v.redeliveries.get("unexplained"), None, "{v:?}");
    }
}
