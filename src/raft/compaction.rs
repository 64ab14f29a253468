//! How far the log may be compacted.
//!
//! Never above the durable applied index (the images do not hold anything above it durably
//! yet), keeping `log_keep_entries` below it; on the leader also not above what a follower
//! still needs, while that follower lags by at most `log_lag_entries_max` entries and
//! `log_lag_bytes_max` bytes. Beyond that the laggard is sent a snapshot instead.

use std::collections::VecDeque;

use raft::prelude::Entry;

use crate::config::RaftConfig;

/// Entries of appended-bytes history kept for compaction decisions.
const APPENDED_BYTES_HISTORY_MAX: usize = 65536;

/// (last index, cumulative bytes) of the entries appended per Ready: sizes the log a lagging
/// follower would need.
#[derive(Default)]
pub struct AppendedBytes {
    records: VecDeque<(u64, u64)>,
    total: u64,
}

impl AppendedBytes {
    /// Records the bytes of entries appended by a Ready.
    pub fn record(&mut self, entries: &[Entry]) {
        let Some(last) = entries.last() else {
            return;
        };
        let bytes: u64 = entries
            .iter()
            .map(|entry| (entry.data.len() + entry.context.len()) as u64)
            .sum();
        self.total += bytes;
        // A rewritten suffix (new leader) makes older records past it stale.
        while self
            .records
            .back()
            .is_some_and(|(index, _)| *index >= last.index)
        {
            self.records.pop_back();
        }
        self.records.push_back((last.index, self.total));
        if self.records.len() > APPENDED_BYTES_HISTORY_MAX {
            self.records.pop_front();
        }
    }

    /// Approximate bytes of the log between `low` and `high` (by recorded Ready sizes).
    pub fn between(&self, low: u64, high: u64) -> u64 {
        let at = |index: u64| {
            self.records
                .iter()
                .find(|(recorded, _)| *recorded >= index)
                .map(|(_, cumulative)| *cumulative)
                .unwrap_or(self.total)
        };
        at(high).saturating_sub(at(low))
    }
}

/// The highest index the log may be compacted to (entries below it dropped), given the
/// durable applied index and, on a leader, every follower's progress.
pub fn compaction_index<'a>(
    config: &RaftConfig,
    durable_applied_index: u64,
    followers: Option<impl Iterator<Item = &'a raft::Progress>>,
    appended: &AppendedBytes,
) -> u64 {
    let wanted = durable_applied_index.saturating_sub(config.log_keep_entries);
    let Some(followers) = followers else {
        return wanted;
    };
    let mut needed = wanted;
    for progress in followers {
        // A follower being sent a snapshot needs the entries after it. raft-rs may probe
        // below `matched` after a stale rejection (it sets `next_idx` from the hint alone),
        // so keep what `next_idx` points at as well.
        let next_needed = if progress.state == raft::ProgressState::Snapshot {
            progress.pending_snapshot + 1
        } else {
            (progress.matched + 1).min(progress.next_idx)
        };
        needed = needed.min(next_needed);
    }
    if needed >= wanted {
        return wanted;
    }
    let lag_entries = wanted - needed;
    let lag_bytes = appended.between(needed, wanted);
    if lag_entries <= config.log_lag_entries_max && lag_bytes <= config.log_lag_bytes_max {
        needed
    } else {
        wanted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(matched: u64, next_idx: u64) -> raft::Progress {
        let mut progress = raft::Progress::new(next_idx, 16);
        progress.matched = matched;
        progress
    }

    fn config(keep: u64, lag_entries_max: u64, lag_bytes_max: u64) -> RaftConfig {
        RaftConfig {
            log_keep_entries: keep,
            log_lag_entries_max: lag_entries_max,
            log_lag_bytes_max: lag_bytes_max,
            tick_interval_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            proposals_pending_max: 1024,
            mailbox_capacity: 1024,
            read_lease_ms: 0,
        }
    }

    fn entries(first: u64, count: u64, bytes: usize) -> Vec<Entry> {
        (first..first + count)
            .map(|index| Entry {
                index,
                data: vec![0u8; bytes].into(),
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn a_follower_never_compacts_above_its_durable_applied_index_less_what_it_keeps() {
        let config = config(10, 1000, 1 << 20);
        let none: Option<std::iter::Empty<&raft::Progress>> = None;
        assert_eq!(
            compaction_index(&config, 100, none, &AppendedBytes::default()),
            90
        );
        let none: Option<std::iter::Empty<&raft::Progress>> = None;
        assert_eq!(
            compaction_index(&config, 5, none, &AppendedBytes::default()),
            0
        );
    }

    #[test]
    fn the_leader_keeps_what_a_lagging_follower_needs_within_the_budget_and_no_more() {
        // Ten Readies of ten 100-byte entries each: the history is per Ready.
        let mut appended = AppendedBytes::default();
        for ready in 0..10 {
            appended.record(&entries(1 + ready * 10, 10, 100));
        }
        let lagging = [progress(39, 40)];
        // 50 entries and about 5,000 bytes behind: within the budget, kept.
        let generous = config(10, 1000, 1 << 20);
        assert_eq!(
            compaction_index(&generous, 100, Some(lagging.iter()), &appended),
            40
        );
        // Over the entry budget: compacted anyway, the follower gets a snapshot.
        let few_entries = config(10, 20, 1 << 20);
        assert_eq!(
            compaction_index(&few_entries, 100, Some(lagging.iter()), &appended),
            90
        );
        // Over the byte budget: the same.
        let few_bytes = config(10, 1000, 1000);
        assert_eq!(
            compaction_index(&few_bytes, 100, Some(lagging.iter()), &appended),
            90
        );
        // A follower probed below its match (stale rejection) keeps what `next_idx` needs.
        let probed = [progress(60, 45)];
        assert_eq!(
            compaction_index(&generous, 100, Some(probed.iter()), &appended),
            45
        );
    }
}
