//! The node's log as the core uses it: appending and syncing under the `--fsync` policy,
//! starting again from what an earlier life left, the backup's copy with its delivered marks,
//! and catching a backup's copy up with the primary's.
//!
//! A backup's "held" messages are no separate store any more: they are the entries of its log
//! between each topic's delivered mark and its end, less those cleared out of order.

use foldhash::{HashMap, HashMapExt, HashSet};
use std::collections::BTreeSet;
use std::sync::Arc;

use tracing::{error, info, warn};

use super::backup::Backup;
use super::failover::next_epoch;
use super::link::LinkState;
use super::time::Timer;
use super::{Broker, ConnId, Message, Output, RoleState, SEEN_REBUILD};
use crate::log::{Entry, Fsync, LogError, SyncJob, BATCH_ENTRIES, BATCH_INTERVAL};
use crate::protocol::{Frame, MsgId, Role};

/// How often segments past the retention bounds are looked for.
pub(super) const RETAIN_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Entries sent per topic in one go when catching a backup up.
pub(super) const CATCH_UP_CHUNK: usize = 4096;

/// How long a backup may take to read one chunk of a catch-up before the link is dropped.
const CATCH_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Where a backup's log of one topic ends, as its `TAIL` told.
#[derive(Debug)]
pub(super) struct Tail {
    pub topic: String,
    /// Its next offset.
    pub next: u64,
    /// The epoch of its last entry.
    pub epoch: u64,
    /// Each epoch of its log and the offset where it begins (empty from a backup that did
    /// not say).
    pub epochs: Vec<(u64, u64)>,
}

/// A sync running off the core's caller: what it answers when it ends.
#[derive(Debug)]
pub(super) struct Syncing {
    /// Every `mid` up to this one is covered.
    upto: u64,
    /// The `STORED` that waits for it (backup).
    stored: Option<(ConnId, u64)>,
}

impl Broker {
    /// True when an `ACK` (or a backup's `STORED`) waits for the local disk.
    pub(super) fn must_sync(&self) -> bool {
        self.cfg.fsync == Fsync::Always && self.log.is_durable()
    }

    /// Appends a new entry to `topic`; asks for the sync the policy wants.
    pub(super) fn append(&mut self, topic: &str, entry: &Entry) -> Result<(), LogError> {
        self.log.append(topic, entry)?;
        self.after_append();
        Ok(())
    }

    /// [`Broker::append`] at the topic's next offset, written into `entry` (a fresh publish).
    pub(super) fn append_next(&mut self, topic: &str, entry: &mut Entry) -> Result<(), LogError> {
        self.log.append_next(topic, entry)?;
        self.after_append();
        Ok(())
    }

    fn after_append(&mut self) {
        self.unflushed = true;
        if !self.log.is_durable() {
            return;
        }
        match self.cfg.fsync {
            Fsync::Always => self.ask_sync(),
            Fsync::Batch if self.log.unsynced() >= BATCH_ENTRIES => self.ask_sync(),
            Fsync::Batch => {
                if !self.timers.is_set(Timer::Sync) {
                    self.timers.set(Timer::Sync, self.now.mono + BATCH_INTERVAL);
                }
            }
            Fsync::Never => {}
        }
    }

    pub(super) fn ask_sync(&mut self) {
        if self.syncing.is_some() {
            self.sync_again = true;
            return;
        }
        if !self.sync_asked {
            self.sync_asked = true;
            self.out.push_back(Output::Sync);
        }
    }

    /// fsyncs the log, then answers what waited for it. A failed sync is a disk that can no
    /// longer be trusted: what waited is refused with `ERR`, so publishers resend elsewhere.
    pub(super) fn sync_log(&mut self) {
        self.sync_asked = false;
        self.timers.stop(Timer::Sync);
        let upto = self.next_mid - 1;
        match self.log.sync() {
            Ok(()) => {
                let stored = self.stored_after_sync.take();
                self.synced(upto, stored);
            }
            Err(e) => self.sync_failed(e),
        }
    }

    /// Starts the sync the core asked for, to run off the caller's thread: see
    /// [`Broker::begin_sync`](super::Broker::begin_sync).
    pub(super) fn begin_sync_job(&mut self) -> Option<SyncJob> {
        if self.syncing.is_some() {
            // One at a time: the next one starts when this one ends, covering all since.
            self.sync_asked = false;
            self.sync_again = true;
            return None;
        }
        match self.log.begin_sync() {
            Ok(Some(job)) => {
                self.sync_asked = false;
                self.timers.stop(Timer::Sync);
                self.syncing = Some(Syncing {
                    upto: self.next_mid - 1,
                    stored: self.stored_after_sync.take(),
                });
                Some(job)
            }
            Ok(None) => {
                self.sync_log();
                None
            }
            Err(e) => {
                self.sync_asked = false;
                self.sync_failed(e);
                None
            }
        }
    }

    /// The job from [`Broker::begin_sync_job`] ended with `result`.
    pub(super) fn end_sync_job(&mut self, job: SyncJob, result: Result<(), LogError>) {
        let Some(s) = self.syncing.take() else {
            return;
        };
        match self.log.end_sync(job, result) {
            Ok(()) => self.synced(s.upto, s.stored),
            Err(e) => {
                if let Some((conn, _)) = s.stored {
                    self.close(conn);
                }
                self.sync_failed(e);
            }
        }
        if std::mem::take(&mut self.sync_again) || self.stored_after_sync.is_some() {
            self.ask_sync();
        }
    }

    /// Every `mid` up to `upto` is on the disk: answer what waited for it.
    fn synced(&mut self, upto: u64, stored: Option<(ConnId, u64)>) {
        self.synced_mid = self.synced_mid.max(upto);
        self.release_ready_acks();
        if let Some((conn, mid)) = stored {
            self.reply(conn, Frame::Stored { mid });
        }
    }

    /// Writes what was appended since the last write (one `write` for a whole batch of events),
    /// then answers what waited for it; a failed write is treated as a failed sync.
    pub(super) fn write_log(&mut self) {
        match self.log.flush() {
            Ok(()) => {
                self.written_mid = self.next_mid - 1;
                self.release_ready_acks();
                self.release_stored();
                if let Some((conn, mid)) = self.stored_after_write.take() {
                    self.reply(conn, Frame::Stored { mid });
                }
            }
            Err(e) => {
                if let Some((conn, _)) = self.stored_after_write.take() {
                    self.close(conn);
                }
                // What was not written is refused below and must not be delivered either.
                let written = self.written_mid;
                if let Some(p) = self.primary() {
                    let dropped: Vec<u64> = p
                        .unstored
                        .iter()
                        .filter(|(m, _)| m.mid > written)
                        .map(|(m, _)| m.mid)
                        .collect();
                    p.unstored.retain(|(m, _)| m.mid <= written);
                    for mid in dropped {
                        p.inflight.remove(mid);
                    }
                }
                self.unpark_unwritten(written);
                self.sync_failed(e);
            }
        }
    }

    fn sync_failed(&mut self, e: LogError) {
        error!("the log could not be synced: {e}; refusing what waited for it");
        if let Some(p) = self.primary() {
            let acks = std::mem::take(&mut p.acks);
            self.refuse_acks(&acks, &format!("not stored: {e}"));
        }
        if let Some((conn, _)) = self.stored_after_sync.take() {
            self.close(conn);
        }
    }

    /// Saves the current epoch (fsync'd on a disk) before the node acts in it.
    pub(super) fn save_epoch(&mut self) {
        if let Err(e) = self.log.save_epoch(self.epoch) {
            error!("cannot save epoch {}: {e}", self.epoch);
        }
    }

    /// Removes old segments past the retention bounds (`--retain-bytes`, `--retain-age`).
    pub(super) fn retain(&mut self) {
        self.timers.set(Timer::Retain, self.now.mono + RETAIN_EVERY);
        match self.log.enforce_retention(self.now.wall_us) {
            Ok(moved) => {
                for (topic, first) in moved {
                    info!("retention: topic '{topic}' now starts at offset {first}");
                }
            }
            Err(e) => warn!("retention: {e}"),
        }
    }

    /// Every `ACK` waiting for a message up to this `mid` may go: the backup stored it (or there
    /// is no backup to wait for: none linked, or with a lease none running) and the local disk
    /// has it (when the policy says to wait).
    pub(super) fn ack_floor(&self) -> u64 {
        if !self.lease_held() {
            return 0;
        }
        let local = if self.must_sync() {
            self.synced_mid
        } else if self.log.is_durable() {
            self.written_mid
        } else {
            u64::MAX
        };
        let lease = self.cfg.lease.is_some() && self.cfg.peer.is_some();
        let backup = match &self.role {
            RoleState::Primary(p) => match p.link.up() {
                Some((_, false)) => p.confirmed,
                Some((_, true)) => u64::MAX,
                // With a lease, degraded only while the backup is known to be down: a backup
                // that is merely out of reach may be taking over, and a message acknowledged
                // here alone would reach it only when this node hands it over, after the
                // publisher's later ones (out of order), so its publisher resends it there.
                None if lease && !p.link.backup_down => p.confirmed,
                // Paused, and asking the peer who is primary: only what the backup stored.
                None if p.suspect => p.confirmed,
                None => u64::MAX,
            },
            RoleState::Backup(_) => u64::MAX,
        };
        local.min(backup)
    }

    /// Sends every `ACK` whose message is now safe.
    pub(super) fn release_ready_acks(&mut self) {
        let floor = self.ack_floor();
        let Some(p) = self.primary() else {
            return;
        };
        let mut conns: Vec<ConnId> = Vec::new();
        while p.acks.front().is_some_and(|a| a.mid <= floor) {
            if let Some(a) = p.acks.pop_front() {
                if conns.last() != Some(&a.conn) {
                    conns.push(a.conn);
                }
            }
        }
        for conn in conns {
            self.flush_replies(conn, Some(floor), None);
        }
    }

    /// At start: relearn publisher identities from the end of each topic, and take up what an
    /// earlier life did not deliver (a primary delivers it once the startup grace is over, a
    /// chunk at a time; a backup holds it, as it is already in its log).
    pub(super) fn recover(&mut self) {
        let topics = self.log.topics();
        let mut undelivered = 0u64;
        let mut last_epoch = 0u64;
        for t in &topics {
            last_epoch = last_epoch.max(self.relearn_seen(&t.topic, t.first, t.next));
            undelivered += t.next - t.delivered.max(t.first);
        }
        // The log remembers the newest reign it saw (the saved epoch, and the entries): a
        // primary starts a newer one (its own parity), a backup follows from there, so a node
        // that starts again after both were down never delivers in an epoch older than one its
        // subscribers have seen.
        let last_epoch = last_epoch.max(self.log.saved_epoch());
        if last_epoch > 0 {
            let born_primary = self.cfg.born == Role::Primary;
            self.epoch = match self.role() {
                Role::Primary => self.epoch.max(next_epoch(last_epoch, born_primary)),
                Role::Backup => self.epoch.max(last_epoch),
            };
        }
        self.save_epoch();
        if topics.is_empty() {
            return;
        }
        // The groups first: their journal is no one's to deliver.
        self.groups_recover();
        info!(
            "log: {} topic(s), {} entries, {undelivered} not yet delivered; epoch {}",
            topics.len(),
            topics.iter().map(|t| t.next - t.first).sum::<u64>(),
            self.epoch
        );
        if self.role() == Role::Primary {
            // A chunk now, the rest as deliveries go (`takeup.rs`): the node serves at once.
            let cleared = std::mem::take(&mut self.cleared);
            self.begin_take_up(cleared);
            if self.cfg.peer.is_some() {
                // The backup may have served while we were down: its records first.
                self.groups.hold = true;
            }
            self.groups_take_over();
        }
    }

    /// Records the identities of the last [`SEEN_REBUILD`] entries of `topic` (`first..next` in
    /// the log) as seen, so a resend of one is no new message; returns the newest epoch among
    /// them. At a start, and at a takeover: the undelivered entries are ours to deliver then,
    /// though taken up a chunk at a time (`takeup.rs`), and a node that stepped down forgot the
    /// identities it had accepted.
    pub(super) fn relearn_seen(&mut self, topic: &str, first: u64, next: u64) -> u64 {
        let entries = self.log_tail(topic, first, next);
        for e in entries.iter().filter(|e| !e.id.is_anonymous()) {
            self.seen.record(&e.id.publisher, e.id.seq);
        }
        entries.iter().map(|e| e.epoch).max().unwrap_or(0)
    }

    /// The identities of the last entries of `topic` (as many as a start reads to relearn
    /// publishers), to tell a message the log has from one it lacks.
    pub(super) fn recent_ids(&self, topic: &str) -> HashSet<MsgId> {
        let t = self.log.topic(topic);
        self.log_tail(topic, t.first, t.next)
            .into_iter()
            .map(|e| e.id.clone())
            .collect()
    }

    /// The last [`SEEN_REBUILD`] entries of `topic` (`first..next` in the log); none, and the
    /// error logged, if the log cannot be read.
    fn log_tail(&self, topic: &str, first: u64, next: u64) -> Vec<Arc<Entry>> {
        let from = next.saturating_sub(SEEN_REBUILD).max(first);
        self.log.read(topic, from, usize::MAX).unwrap_or_else(|e| {
            error!("topic '{topic}': cannot read the log back: {e}");
            Vec::new()
        })
    }

    /// The undelivered entries of every topic, oldest first within each topic.
    pub(super) fn held_entries(&self) -> Vec<(String, Arc<Entry>)> {
        let mut out = Vec::new();
        for t in self.log.topics() {
            match self.undelivered(&t.topic, 0) {
                Ok(entries) => out.extend(entries.into_iter().map(|e| (t.topic.clone(), e))),
                Err(e) => error!("topic '{}': cannot read held entries: {e}", t.topic),
            }
        }
        // Across topics, in the order they arrived.
        out.sort_by_key(|(_, e)| e.received_us);
        out
    }

    /// The entries of `topic` from `from` on that are not delivered: past its delivered mark,
    /// less those cleared out of order.
    fn undelivered(&self, topic: &str, from: u64) -> Result<Vec<Arc<Entry>>, LogError> {
        let from = from.max(self.log.delivered(topic));
        let cleared = self.cleared.get(topic);
        let mut entries = self.log.read(topic, from, usize::MAX)?;
        entries.retain(|e| !cleared.is_some_and(|c| c.contains(&e.offset)));
        Ok(entries)
    }

    /// How many entries a backup holds (not yet delivered).
    pub(super) fn held_count(&self) -> u64 {
        self.log
            .topics()
            .iter()
            .map(|t| {
                let cleared = self.cleared.get(&t.topic).map_or(0, |c| c.len() as u64);
                (t.next - t.delivered.max(t.first)).saturating_sub(cleared)
            })
            .sum()
    }

    /// Entry `offset` of `topic` was delivered: move the mark over it and over whatever was
    /// cleared out of order just above it.
    pub(super) fn mark_delivered(&mut self, topic: &str, offset: u64) {
        let mark = self.log.delivered(topic);
        if offset == mark {
            self.move_mark(topic, mark + 1);
        } else if offset > mark {
            // Out of order: kept aside until the mark reaches it.
            self.cleared
                .entry(topic.to_string())
                .or_default()
                .insert(offset);
        }
    }

    /// Moves `topic`'s delivered mark up to `to`, and on over what was cleared out of order just
    /// above it; what was cleared below it is done with. (The log keeps its mark where it is if
    /// `to` is below it, and stops it at its end.)
    fn move_mark(&mut self, topic: &str, to: u64) {
        let mut upto = to;
        if let Some(cleared) = self.cleared.get_mut(topic) {
            cleared.retain(|o| *o >= upto);
            while cleared.remove(&upto) {
                upto += 1;
            }
            if cleared.is_empty() {
                self.cleared.remove(topic);
            }
        }
        self.log.set_delivered(topic, upto);
    }

    /// Where this link's catch-up left `topic`: below it our log is the primary's (0 if it
    /// did not catch `topic` up, or on another link).
    fn caught_up_to(&self, conn: ConnId, topic: &str) -> u64 {
        match &self.role {
            RoleState::Backup(Backup {
                caught_up: Some((c, marks)),
                ..
            }) if *c == conn => marks.get(topic).copied().unwrap_or(0),
            _ => 0,
        }
    }

    /// `REPL` on a backup: append the entry at its offset (answer `STORED`, after the sync when
    /// the policy says so), or refuse it.
    pub(super) fn on_repl(&mut self, conn: ConnId, mid: u64, topic: String, entry: Entry) {
        if self.role() != Role::Backup {
            self.reply(conn, not_a_backup());
            return;
        }
        let entry = Arc::new(entry);
        if mid == 0 && entry.offset > self.log.next_offset(&topic) {
            // A catch-up that starts past our end: the primary no longer keeps what we lack
            // (its retention removed it while we were away).
            if let Err(e) = self.restart_topic(&topic, entry.offset) {
                error!(
                    "topic '{topic}': cannot start our copy again at {}: {e}",
                    entry.offset
                );
            }
        }
        if let Err(e) = self.store(conn, &topic, &entry) {
            warn!("cannot store entry {} of '{topic}': {e}", entry.offset);
            self.reply(
                conn,
                Frame::Err {
                    reason: format!("not stored: {e}"),
                },
            );
            return;
        }
        if topic == super::JOURNAL {
            // A group record: applied now, delivered to no one, never cleared.
            self.journal_stored(&entry);
            if super::groups::is_snapshot(&entry.payload) {
                self.trim_journal(entry.offset);
            }
        }
        if mid == 0 {
            // Catching up: the primary expects no answer.
            return;
        }
        if !self.must_sync() && self.unflushed {
            // Answered once the entry is written (see `Broker::poll_output`): one `STORED`
            // for every `REPL` of a batch of events (the primary takes it as cumulative), in
            // memory too.
            self.stored_after_write = Some((conn, mid));
        } else if self.log.is_durable() && !self.must_sync() {
            // An entry we had (sent again at link-up, or taken up again from the primary's
            // log), with all before it written: no write is coming to answer it after, and
            // the primary's deliveries wait for it.
            self.reply(conn, Frame::Stored { mid });
        } else if self.must_sync() && self.log.unsynced() > 0 {
            self.stored_after_sync = Some((conn, mid));
            self.ask_sync();
        } else {
            self.reply(conn, Frame::Stored { mid });
        }
    }

    /// Appends a replicated entry at its offset. The same entry again is fine; a different one
    /// at an offset we have means our tail diverged from the primary's log: it is cut (and
    /// what of it was not delivered is handed to the primary) before the entry is appended.
    /// Below where this link's catch-up left the topic our log is the primary's: an entry there
    /// is the same one, and is not read back (a primary taking its log up again sends each of
    /// them, thousands a chunk, and reading each back stalled this node for longer than its
    /// primary's ping timeout).
    fn store(&mut self, conn: ConnId, topic: &str, entry: &Arc<Entry>) -> Result<(), LogError> {
        let next = self.log.next_offset(topic);
        if entry.offset < next && entry.offset < self.caught_up_to(conn, topic) {
            return Ok(());
        }
        if entry.offset < next {
            let have = self.log.read(topic, entry.offset, 1)?;
            if have
                .first()
                .is_some_and(|h| h.id == entry.id && h.epoch == entry.epoch)
            {
                return Ok(());
            }
            self.cut_tail(topic, entry.offset)?;
        } else if entry.offset > next {
            return Err(LogError::NotDense {
                topic: topic.to_string(),
                want: next,
                got: entry.offset,
            });
        }
        self.append(topic, entry)?;
        if !entry.id.is_anonymous() {
            self.seen.record(&entry.id.publisher, entry.id.seq);
        }
        Ok(())
    }

    /// Cuts the entries of `topic` from `from` on, handing the undelivered ones to the peer
    /// (which drops those it already has, by identity).
    fn cut_tail(&mut self, topic: &str, from: u64) -> Result<(), LogError> {
        if from >= self.log.next_offset(topic) {
            return Ok(());
        }
        let undelivered = self.undelivered(topic, from)?;
        // Delivered entries a consumer group has not finished go over too, for the groups
        // only (`GROUP|requeue`: the subscribers had them).
        let unfinished: Vec<Arc<Entry>> = self
            .groups_unfinished(topic, from, self.log.delivered(topic))
            .into_iter()
            .filter_map(|o| self.log.read(topic, o, 1).ok())
            .flatten()
            .collect();
        if topic == super::JOURNAL {
            // Our records past the cut go back to the primary (`GROUP|merge`, at its `MARK`).
            let mut cut = self.journal_cut(from);
            self.groups.to_merge.append(&mut cut);
        }
        // Below our oldest entry (the primary started again without its log, and we have
        // removed old entries since): the topic starts again there, empty.
        let cut = if from < self.log.topic(topic).first {
            self.log.restart_at(topic, from)?
        } else {
            self.log.truncate(topic, from)?
        };
        if let RoleState::Backup(Backup {
            caught_up: Some((_, marks)),
            ..
        }) = &mut self.role
        {
            if let Some(m) = marks.get_mut(topic) {
                *m = (*m).min(from);
            }
        }
        if let Some(c) = self.cleared.get_mut(topic) {
            c.retain(|o| *o < from);
        }
        self.offsets_reused(topic, from);
        self.groups_offsets_reused(topic, from);
        warn!(
            "topic '{topic}': cut {cut} entr{} from offset {from} that the primary's log does not have; handing {} undelivered one(s) to it",
            if cut == 1 { "y" } else { "ies" },
            undelivered.len()
        );
        let quiet = unfinished.into_iter().map(|e| (e, true));
        self.hand_over_entries(
            topic,
            quiet.chain(undelivered.into_iter().map(|e| (e, false))),
        );
        Ok(())
    }

    /// Hands entries of `topic` our log no longer keeps to the primary, each `(entry, quiet)`:
    /// quiet for the groups only (`GROUP|requeue`: the subscribers had it).
    fn hand_over_entries(
        &mut self,
        topic: &str,
        entries: impl Iterator<Item = (Arc<Entry>, bool)>,
    ) {
        let msgs: Vec<Arc<Message>> = entries
            .map(|(entry, quiet)| {
                Arc::new(Message {
                    mid: 0,
                    topic: topic.to_string(),
                    entry: Arc::unwrap_or_clone(entry),
                    quiet,
                })
            })
            .collect();
        if !msgs.is_empty() && self.cfg.peer.is_some() {
            self.hand_over(msgs);
        }
    }

    /// Our copy of `topic` ends before the oldest entry the primary keeps: it starts again,
    /// empty, at `at`. What of it was not delivered goes to the primary first (which drops
    /// by identity what it has). The groups' state is left to the journal, which is never cut
    /// and comes after: the primary's groups finished what its retention removed.
    fn restart_topic(&mut self, topic: &str, at: u64) -> Result<(), LogError> {
        let t = self.log.topic(topic);
        let undelivered = self.undelivered(topic, t.first)?;
        let gone = self.log.restart_at(topic, at)?;
        if let Some(c) = self.cleared.get_mut(topic) {
            c.clear();
        }
        if topic == super::JOURNAL {
            // The groups are read again from what is left (nothing): the primary's journal
            // from `at` on begins with a snapshot of them.
            self.groups_offsets_reused(topic, at);
        }
        warn!(
            "topic '{topic}': our copy ends at {} and the primary keeps only from {at} on: dropped its {gone} entr{} and went on from {at}; handing {} undelivered one(s) to the primary",
            t.next,
            if gone == 1 { "y" } else { "ies" },
            undelivered.len()
        );
        self.hand_over_entries(topic, undelivered.into_iter().map(|e| (e, false)));
        Ok(())
    }

    /// Seed `REPLICATE`: append at our own next offset, anonymous.
    pub(super) fn store_seed(&mut self, topic: String, payload: String) -> bool {
        if self.role() != Role::Backup {
            return false;
        }
        let entry = Arc::new(Entry {
            offset: self.log.next_offset(&topic),
            epoch: self.epoch,
            id: MsgId::anonymous(),
            sent_us: self.now.wall_us,
            received_us: self.now.wall_us,
            payload,
        });
        match self.append(&topic, &entry) {
            Ok(()) => true,
            Err(e) => {
                error!("cannot store a seed REPLICATE on '{topic}': {e}");
                false
            }
        }
    }

    /// `CLR|topic|upto`: the primary delivered every entry of `topic` below `upto`. The log
    /// takes the mark no further than our copy goes, and never back: what we do not have yet is
    /// cleared by a later `CLR` (or by the `MARK` that ends a catch-up).
    pub(super) fn clear_upto(&mut self, topic: &str, upto: u64) {
        if self.role() == Role::Backup {
            self.move_mark(topic, upto);
        }
    }

    /// `CLEAR|topic|payload` (seed): the oldest held entry of `topic` with this payload.
    pub(super) fn clear_seed(&mut self, topic: &str, payload: &str) {
        if self.role() != Role::Backup {
            return;
        }
        let found = self
            .undelivered(topic, 0)
            .ok()
            .and_then(|v| v.into_iter().find(|e| e.payload == payload));
        if let Some(e) = found {
            self.mark_delivered(topic, e.offset);
        }
    }

    /// `MARK|topic|upto|next` after a catch-up: our log of `topic` must end at `next` and is
    /// delivered below `upto`.
    pub(super) fn on_mark(&mut self, conn: ConnId, topic: &str, upto: u64, next: u64) {
        if self.role() != Role::Backup {
            return;
        }
        let cut = self.cut_tail(topic, next);
        if topic == super::JOURNAL {
            // Our records past the primary's journal (a reign it did not see) go back to it:
            // those cut during the catch-up, then those cut just now (`cut_tail` keeps each
            // for here); then `merged` says that was all.
            for record in std::mem::take(&mut self.groups.to_merge) {
                self.send_frame(
                    conn,
                    &Frame::Group(crate::protocol::GroupOp::Merge { record }),
                );
            }
            self.send_frame(conn, &Frame::Group(crate::protocol::GroupOp::Merged));
        }
        if let Err(e) = cut {
            error!("topic '{topic}': cannot cut the log at {next}: {e}");
        } else if self.log.next_offset(topic) == next {
            if let RoleState::Backup(b) = &mut self.role {
                let marks = match &mut b.caught_up {
                    Some((c, marks)) if *c == conn => marks,
                    other => &mut other.insert((conn, HashMap::new())).1,
                };
                marks.insert(topic.to_string(), next);
            }
        }
        self.log.set_delivered(topic, upto);
        if let Some(c) = self.cleared.get_mut(topic) {
            c.retain(|o| *o >= upto);
        }
    }

    /// A backup answering its primary's `HELLO`: where its log of each topic ends, and where
    /// each epoch of it begins.
    pub(super) fn send_tails(&mut self, conn: ConnId) {
        for t in self.log.topics() {
            let epochs = self.epochs(&t.topic);
            let epoch = epochs.last().map_or(0, |(e, _)| *e);
            let f = Frame::Tail {
                topic: t.topic,
                next: t.next,
                epoch,
                epochs,
            };
            self.reply(conn, f);
        }
        self.reply(conn, Frame::TailEnd);
    }

    /// The primary, once its backup said where its log ends (`tails`: topic, next, epoch of
    /// the last entry): sends each topic's missing entries, [`CATCH_UP_CHUNK`] at a time, the
    /// next chunk once the link has written out the last one (so a primary restarted on a
    /// million undelivered entries neither stops serving while it reads them all, past its
    /// backup's ping timeout, nor queues them all in memory); then, in one go, every topic's
    /// delivered mark and end, and the link is up.
    pub(super) fn begin_catch_up(&mut self, conn: ConnId, tails: Vec<Tail>) {
        let mut topics: BTreeSet<String> = tails.iter().map(|t| t.topic.clone()).collect();
        let mut journal_ahead = false;
        let mut ahead = false;
        topics.extend(self.log.topics().into_iter().map(|t| t.topic));
        let mut from = Vec::new();
        for topic in topics {
            let t = self.log.topic(&topic);
            let b = tails.iter().find(|x| x.topic == topic);
            let start = match b {
                None => 0,
                // A backup that did not list its epochs: only its last one is compared.
                Some(b) if b.epochs.is_empty() => b.next.min(self.end_of_epoch(&topic, b.epoch)),
                Some(b) => diverge(&self.epochs(&topic), t.next, &b.epochs, b.next),
            }
            .max(t.first);
            let b_next = b.map_or(0, |b| b.next);
            if topic == super::JOURNAL {
                // Records of the backup's we do not have come back as `GROUP|merge`.
                journal_ahead = b_next > start;
            } else {
                // Entries of the backup's we do not have come back as hand-overs.
                ahead |= b_next > start;
            }
            from.push((topic, start));
        }
        // The groups' journal last: the backup cuts a diverged topic while its groups still
        // know what they finished there (what they did not goes over to us), and only then
        // its journal.
        from.sort_by_key(|(t, _)| t == super::JOURNAL);
        self.groups_hold(journal_ahead);
        self.settle_catch_up(ahead);
        if let Some(p) = self.primary() {
            p.link.catching_up = from;
            p.link.caught_up_sent = 0;
            p.link.marked_early = false;
        }
        self.catch_up_step(conn);
    }

    /// The link's connection wrote out what it was sent: the catch-up's next chunk may go.
    pub(super) fn catch_up_written(&mut self, conn: ConnId) {
        if self
            .primary()
            .is_some_and(|p| p.link.state == LinkState::CatchUp(conn))
        {
            self.catch_up_step(conn);
        }
    }

    /// Sends the next chunk of the catch-up (entries appended meanwhile included), or, when
    /// every topic's log has been sent to its end, the marks, and brings the link up.
    fn catch_up_step(&mut self, conn: ConnId) {
        let Some(p) = self.primary() else {
            return;
        };
        let mut from = std::mem::take(&mut p.link.catching_up);
        let mut marked_early = p.link.marked_early;
        // Topics created since the catch-up began are sent from their start.
        for t in self.log.topics() {
            if !from.iter().any(|(topic, _)| *topic == t.topic) {
                from.push((t.topic, t.first));
            }
        }
        let mut sent = 0usize;
        for i in 0..from.len() {
            if from[i].0 == super::JOURNAL
                && !marked_early
                && from[..i]
                    .iter()
                    .all(|(t, at)| *at >= self.log.next_offset(t))
            {
                // Every other topic is sent to its end: their `MARK`s go before the journal's
                // entries, so a backup cuts a diverged topic (handing over what its groups had
                // not finished there) while its groups still know what they finished, before
                // an entry of the journal that differs from ours cuts the journal and reads
                // the groups back from what is left. They go again with the journal's.
                marked_early = true;
                for (topic, _) in &from[..i] {
                    self.send_mark(conn, topic);
                }
            }
            let (topic, at) = &mut from[i];
            let t = self.log.topic(topic);
            *at = (*at).max(t.first);
            while *at < t.next && sent < CATCH_UP_CHUNK {
                let chunk = match self.log.read(topic, *at, CATCH_UP_CHUNK - sent) {
                    Ok(c) if !c.is_empty() => c,
                    Ok(_) => break,
                    Err(e) => {
                        error!("topic '{topic}': cannot read the log to catch the backup up: {e}");
                        break;
                    }
                };
                let mut buf = Vec::new();
                for e in &chunk {
                    crate::protocol::repl_line_into(&mut buf, 0, topic, e);
                }
                *at = chunk.last().map_or(t.next, |e| e.offset + 1);
                sent += chunk.len();
                self.out.push_back(Output::Send {
                    conn,
                    line: buf.into(),
                    delivery: false,
                });
            }
        }
        let Some(p) = self.primary() else {
            return;
        };
        p.link.caught_up_sent += sent as u64;
        p.link.marked_early = marked_early;
        if sent > 0 {
            p.link.catching_up = from;
            self.out.push_back(Output::Writable { conn });
            // A backup that does not take a chunk in time is hung: the link is dropped and
            // tried again (see `Broker::on_link_silent`).
            let deadline = self.now.mono + CATCH_UP_WAIT;
            self.timers.set(Timer::Answer(conn), deadline);
            return;
        }
        // Every topic sent to its end, within this one step: its marks, and the link is up.
        let total = p.link.caught_up_sent;
        for (topic, _) in from {
            self.send_mark(conn, &topic);
        }
        if total > 0 {
            info!(
                "caught the backup up: {total} log entr{} sent",
                if total == 1 { "y" } else { "ies" }
            );
        }
        self.link_up(conn, total);
    }

    /// `MARK`: where our log of `topic` ends and up to where it is delivered.
    fn send_mark(&mut self, conn: ConnId, topic: &str) {
        let t = self.log.topic(topic);
        let mark = Frame::Mark {
            topic: topic.to_string(),
            upto: t.delivered.max(t.first),
            next: t.next,
        };
        self.send_frame(conn, &mark);
    }

    /// Each epoch of our log of `topic` with the offset where it begins, in order (see
    /// [`crate::log::Storage::epochs`]).
    fn epochs(&self, topic: &str) -> Vec<(u64, u64)> {
        self.log.epochs(topic)
    }

    /// The first offset of `topic` whose entry is of a later epoch than `epoch` (entries of
    /// one epoch were all written by one primary, so up to there a backup's copy of that
    /// epoch agrees with ours).
    fn end_of_epoch(&self, topic: &str, epoch: u64) -> u64 {
        crate::log::end_of_epoch(&self.epochs(topic), self.log.next_offset(topic), epoch)
    }
}

/// Where two logs of one topic part: the first offset both hold whose entries are of
/// different epochs, or the end of the shorter. Each log is its epochs with the offset each
/// begins at (rising) and its next offset. An entry is known by its epoch and offset: one
/// epoch's entries were all written by one primary (the two nodes' epochs never meet, see
/// `failover::next_epoch`), and a log takes an entry only after it agrees with its writer's
/// log below it (this comparison), so where the epochs agree the entries are the same.
///
/// Comparing only the backup's last epoch (where our entries of that epoch end) missed
/// logs that parted earlier: a backup whose last epoch is one we never had, over entries of
/// an older reign that ours replaced, kept those entries beside ours.
pub(super) fn diverge(a: &[(u64, u64)], a_next: u64, b: &[(u64, u64)], b_next: u64) -> u64 {
    let end = a_next.min(b_next);
    let (Some(a0), Some(b0)) = (a.first(), b.first()) else {
        return end;
    };
    let epoch_at = |list: &[(u64, u64)], o: u64| {
        list.iter()
            .take_while(|(_, start)| *start <= o)
            .last()
            .map(|(e, _)| *e)
    };
    let lo = a0.1.max(b0.1);
    let mut points: Vec<u64> = a
        .iter()
        .chain(b)
        .map(|(_, start)| *start)
        .filter(|o| *o > lo && *o < end)
        .collect();
    points.push(lo);
    points.sort_unstable();
    points
        .into_iter()
        .filter(|o| *o < end)
        .find(|o| epoch_at(a, *o) != epoch_at(b, *o))
        .unwrap_or(end)
}

pub(super) fn not_a_backup() -> Frame {
    Frame::Err {
        reason: "not a backup".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::diverge;
    use crate::core::{Broker, Config, Now, Time};
    use crate::protocol::Role;

    /// A backup with no peer, holding `n` seed entries of topic `t` (offsets `0..n`).
    fn backup_holding(n: usize) -> Broker {
        let cfg = Config {
            born: Role::Backup,
            peer: None,
            compute_off: true,
            ping_interval: std::time::Duration::from_secs(1),
            ping_timeout: std::time::Duration::from_millis(300),
            repl_timeout: std::time::Duration::from_millis(250),
            forward_timeout: std::time::Duration::from_secs(1),
            incarnation: 1,
            fsync: crate::log::Fsync::default(),
            lease: None,
            peer_key: None,
            allow_seed_replicate: false,
            seed_backup: false,
            nonce_seed: [0; 32],
            max_unacked: crate::core::MAX_UNACKED,
            max_subscriptions: crate::core::MAX_SUBSCRIPTIONS,
            max_topic_len: crate::core::MAX_TOPIC_LEN,
            journal_compact: crate::core::JOURNAL_COMPACT,
            require_client_cert: false,
        };
        let now = Now {
            mono: Time::default(),
            wall_us: 1,
        };
        let mut b = Broker::new(cfg, now);
        for i in 0..n {
            assert!(b.store_seed("t".into(), format!("m{i}")));
        }
        b
    }

    #[test]
    fn the_delivered_mark_moves_over_clears_in_order_out_of_order_and_cumulative() {
        let mut b = backup_holding(6);
        let mark = |b: &Broker| b.log.delivered("t");
        b.mark_delivered("t", 0);
        assert_eq!(mark(&b), 1, "in order: over it");
        b.mark_delivered("t", 3);
        b.mark_delivered("t", 4);
        assert_eq!(mark(&b), 1, "out of order: kept aside");
        b.mark_delivered("t", 1);
        assert_eq!(mark(&b), 2);
        // A cumulative CLR up to 3 reaches the entries cleared aside and moves on over them.
        b.clear_upto("t", 3);
        assert_eq!(mark(&b), 5);
        assert!(!b.cleared.contains_key("t"), "nothing left aside");
        // Never past our own copy, never back.
        b.clear_upto("t", 99);
        assert_eq!(mark(&b), 6);
        b.clear_upto("t", 2);
        assert_eq!(mark(&b), 6);
    }

    #[test]
    fn logs_part_where_their_epochs_first_differ() {
        // Same epochs throughout: the shorter log's end.
        assert_eq!(diverge(&[(1, 0), (3, 10)], 20, &[(1, 0), (3, 10)], 15), 15);
        // The backup had more of epoch 1 than we kept: from where ours moved to epoch 2.
        assert_eq!(diverge(&[(1, 0), (2, 3)], 10, &[(1, 0)], 5), 3);
        // Seed 964's shape: the backup's last epoch (3) is one we never had, over entries
        // of epoch 1 that our epoch 2 replaced. Its last epoch alone would say "from 7".
        assert_eq!(
            diverge(&[(1, 0), (2, 3), (4, 8)], 9, &[(1, 0), (3, 5)], 7),
            3
        );
        // Either log empty, or starting later (retention): compared where both have entries.
        assert_eq!(diverge(&[], 0, &[(1, 0)], 5), 0);
        assert_eq!(diverge(&[(1, 0), (2, 50)], 80, &[(1, 40), (2, 50)], 70), 70);
        assert_eq!(diverge(&[(1, 0), (2, 50)], 80, &[(2, 40)], 70), 40);
        assert_eq!(diverge(&[(1, 0), (2, 50)], 80, &[(1, 40)], 70), 50);
        // An unreadable entry on one side parts the logs there.
        assert_eq!(diverge(&[(1, 0)], 9, &[(1, 0), (u64::MAX, 4)], 9), 4);
    }
}
