//! Lease reads (opt-in, `raft.read_lease_ms`), and the vote rules that keep them safe.
//!
//! Without a lease every read barrier is a ReadIndex round: the leader confirms with a
//! heartbeat to a majority that it still leads before it names a read index. A lease lets the
//! leader skip that round for a while after one succeeded:
//!
//! - A round the leader started at `t0` in term `T` and that completed in `T` proves that a
//!   majority heard from it at `t0` or later (raft-rs counts only acks of heartbeats carrying
//!   the round's context, sent after `t0`). The leader itself refuses every non-transfer vote
//!   while it leads, and stops using the lease the moment it does not. Each follower of that
//!   majority refuses votes and pre-votes of a higher term while it knows a leader and
//!   `election_elapsed < election_timeout` (raft-rs's check_quorum lease in `Raft::step`):
//!   until its `election_ticks`-th tick after the heartbeat, at least
//!   `(election_ticks - 1) * 0.9 * tick_interval_ms` later (the tick rule below). A follower
//!   forgets its leader before that only by restarting (the vote hold below), or on a
//!   message of a higher term from a leader already elected or a transfer's campaign. So no
//!   other leader can exist before that bound, and the lease ends at `t0 + read_lease_ms`,
//!   which the configuration keeps at most 0.9 of it (room for clock rates).
//! - Within it a read waits only for this node to apply up to its commit index, which holds
//!   every acknowledged write: raft-rs completes no round before the leader committed an
//!   entry of its own term.
//! - No lease is granted or used while a membership change is pending (a new leader counts
//!   its whole log as pending until applied), from a round that started before the last
//!   change took effect, or in a term in which a leader transfer was started: `MsgTimeoutNow`
//!   makes its target campaign with votes that bypass the followers' refusal.
//! - The vote hold ([`VoteHold`]): a node that (re)starts has forgotten whom it heard from, so
//!   it refuses votes and pre-votes (other than a transfer's) for one election timeout.
//! - The tick rule: raft-rs is not ticked twice within nine tenths of the interval (the Raft
//!   actor's tick), so a node that stalled does not catch up its election clock in a burst.
//!
//! The vote hold and the tick rule protect the leases of *other* nodes, and run on a node only
//! while its own `read_lease_ms` is set (a cluster without leases keeps its elections as they
//! were). Stated assumptions, none of which a node can check for its peers:
//! - every member has the same `read_lease_ms`, `election_ticks` and `tick_interval_ms`, and
//!   runs a version with these rules (turn leases on only after every member runs one);
//! - the servers' clocks run at rates within 10 % of each other;
//! - a machine is not paused and resumed with its boot-time clock held back (some
//!   hypervisors' pause does that). Lease time is measured on `CLOCK_BOOTTIME`, which goes on
//!   counting while the machine is suspended: a leader that wakes from a suspend finds its
//!   lease expired.

use std::time::Duration;

use crate::config::RaftConfig;

/// A reading of `CLOCK_BOOTTIME`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LeaseInstant(Duration);

impl LeaseInstant {
    pub fn now() -> Self {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid, writable timespec for the duration of the call.
        let result = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
        // CLOCK_BOOTTIME exists since Linux 2.6.39; without it no lease can be measured.
        assert_eq!(result, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
        LeaseInstant(Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
    }

    /// The instant `since_boot` after boot: a simulated clock's readings.
    pub fn from_boot(since_boot: Duration) -> Self {
        LeaseInstant(since_boot)
    }

    pub fn plus(self, duration: Duration) -> Self {
        LeaseInstant(self.0 + duration)
    }

    pub fn until(self, later: LeaseInstant) -> Duration {
        later.0.saturating_sub(self.0)
    }
}

/// The longest `read_lease_ms` a configuration may set: the shortest time a follower that
/// heard a heartbeat refuses votes, `(election_ticks - 1)` ticks at nine tenths of the
/// interval (see the tick rule in the module doc), less 10 % for clock rates.
pub fn read_lease_ms_max(election_ticks: usize, tick_interval_ms: u64) -> u64 {
    (election_ticks.saturating_sub(1) as u64) * tick_interval_ms * 9 / 10 * 9 / 10
}

/// What the leader knows of its lease. Pure bookkeeping: the Raft core tells it what
/// happened and asks it whether a read may skip its round.
#[derive(Debug)]
pub struct ReadLease {
    /// `None`: lease reads are off.
    duration: Option<Duration>,
    /// The term the lease belongs to and when it ends.
    granted: Option<(u64, LeaseInstant)>,
    /// Rounds started before this grant nothing (the last membership change took effect).
    rounds_not_before: Option<LeaseInstant>,
    /// A term in which a leader transfer was started: no lease for the rest of it.
    transfer_term: Option<u64>,
    /// When a read last used the lease, to renew it only while reads come.
    last_used: Option<LeaseInstant>,
    reads_served: u64,
}

/// The leader's state that decides whether its lease may be used now.
#[derive(Clone, Copy, Debug)]
pub struct LeaderState {
    pub is_leader: bool,
    pub term: u64,
    pub transfer_in_progress: bool,
    pub conf_change_pending: bool,
}

impl LeaderState {
    fn may_hold_lease(&self) -> bool {
        self.is_leader && !self.transfer_in_progress && !self.conf_change_pending
    }
}

impl ReadLease {
    /// `read_lease_ms` 0 turns lease reads off.
    pub fn new(read_lease_ms: u64) -> Self {
        ReadLease {
            duration: (read_lease_ms > 0).then(|| Duration::from_millis(read_lease_ms)),
            granted: None,
            rounds_not_before: None,
            transfer_term: None,
            last_used: None,
            reads_served: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.duration.is_some()
    }

    /// Starts counting served reads at `served` (a rebuilt core carries its predecessor's
    /// count).
    pub fn carry_reads_served(&mut self, served: u64) {
        self.reads_served = served;
    }

    /// Reads served from the lease since the node started.
    pub fn reads_served(&self) -> u64 {
        self.reads_served
    }

    /// A ReadIndex round this node started at `started_at`, as leader in `started_term`,
    /// completed while the node is in `now`.
    pub fn round_completed(
        &mut self,
        started_at: LeaseInstant,
        started_term: u64,
        started_as_leader: bool,
        now: LeaderState,
    ) {
        let Some(duration) = self.duration else {
            return;
        };
        if !started_as_leader
            || started_term != now.term
            || !now.may_hold_lease()
            || self.transfer_term == Some(now.term)
            || self
                .rounds_not_before
                .is_some_and(|not_before| started_at <= not_before)
        {
            return;
        }
        let until = started_at.plus(duration);
        match self.granted {
            Some((term, current)) if term == now.term && current >= until => {}
            _ => self.granted = Some((now.term, until)),
        }
    }

    /// Whether a read at `now` may skip its round. Counts the reads it admits.
    pub fn admit_read(&mut self, at: LeaseInstant, now: LeaderState) -> bool {
        if !self.is_valid(at, now) {
            return false;
        }
        self.last_used = Some(at);
        self.reads_served += 1;
        true
    }

    fn is_valid(&self, at: LeaseInstant, now: LeaderState) -> bool {
        now.may_hold_lease()
            && self.transfer_term != Some(now.term)
            && self
                .granted
                .is_some_and(|(term, until)| term == now.term && at < until)
    }

    /// Whether the leader should start a round now only to renew its lease: reads used it
    /// within the last lease, and less than half of it is left.
    pub fn wants_renewal(&self, at: LeaseInstant, now: LeaderState) -> bool {
        let Some(duration) = self.duration else {
            return false;
        };
        if !now.may_hold_lease() || self.transfer_term == Some(now.term) {
            return false;
        }
        let recently_used = self.last_used.is_some_and(|used| used.until(at) < duration);
        let left = match self.granted {
            Some((term, until)) if term == now.term => at.until(until),
            _ => Duration::ZERO,
        };
        recently_used && left < duration / 2
    }

    /// A membership change took effect at `at`: the lease ends, and rounds started before
    /// `at` (whose majority was counted in the old membership) grant nothing.
    pub fn membership_changed(&mut self, at: LeaseInstant) {
        self.granted = None;
        self.rounds_not_before = Some(at);
    }

    /// A leader transfer was started in `term`: no lease for the rest of it.
    pub fn transfer_started(&mut self, term: u64) {
        self.granted = None;
        self.transfer_term = Some(term);
    }
}

/// The vote rule of a (re)started node: for one election timeout after it starts, it
/// refuses votes and pre-votes that are not a leader transfer's.
#[derive(Debug)]
pub struct VoteHold {
    until: LeaseInstant,
}

impl VoteHold {
    /// A hold starting at `at`: one election timeout long where lease reads are on, none
    /// where they are off.
    pub fn starting_at(config: &RaftConfig, at: LeaseInstant) -> Self {
        let length = if config.read_lease_ms > 0 {
            Duration::from_millis(config.election_ticks as u64 * config.tick_interval_ms)
        } else {
            Duration::ZERO
        };
        VoteHold {
            until: at.plus(length),
        }
    }

    /// Whether `message`, arriving at `at` at a node in `term`, is a vote this node must not
    /// step. Requests for the node's own term or older are left to raft-rs, which refuses
    /// them itself.
    pub fn refuses(&self, message: &raft::prelude::Message, term: u64, at: LeaseInstant) -> bool {
        use raft::prelude::MessageType;
        let is_vote = matches!(
            message.get_msg_type(),
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
        );
        is_vote
            && message.term > term
            && message.context.as_ref() != raft::CAMPAIGN_TRANSFER
            && at < self.until
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::prelude::{Message, MessageType};

    const TERM: u64 = 5;

    fn leader() -> LeaderState {
        LeaderState {
            is_leader: true,
            term: TERM,
            transfer_in_progress: false,
            conf_change_pending: false,
        }
    }

    fn at(ms: u64) -> LeaseInstant {
        LeaseInstant(Duration::from_secs(1000) + Duration::from_millis(ms))
    }

    #[test]
    fn a_round_grants_a_lease_from_its_start_which_expires() {
        let mut lease = ReadLease::new(400);
        assert!(
            !lease.admit_read(at(0), leader()),
            "no lease before any round"
        );
        lease.round_completed(at(100), TERM, true, leader());
        assert!(lease.admit_read(at(150), leader()));
        assert!(lease.admit_read(at(499), leader()));
        assert!(
            !lease.admit_read(at(500), leader()),
            "the lease runs from the round's start, not its end"
        );
        assert_eq!(lease.reads_served(), 2);
        // An older round finishing late does not shorten a newer lease.
        lease.round_completed(at(450), TERM, true, leader());
        lease.round_completed(at(300), TERM, true, leader());
        assert!(lease.admit_read(at(849), leader()));
        assert!(!lease.admit_read(at(850), leader()));
    }

    #[test]
    fn off_grants_nothing() {
        let mut lease = ReadLease::new(0);
        assert!(!lease.enabled());
        lease.round_completed(at(0), TERM, true, leader());
        assert!(!lease.admit_read(at(1), leader()));
        assert!(!lease.wants_renewal(at(1), leader()));
    }

    #[test]
    fn the_lease_belongs_to_its_term_and_to_a_leader() {
        let mut lease = ReadLease::new(400);
        lease.round_completed(at(0), TERM, true, leader());
        let follower = LeaderState {
            is_leader: false,
            ..leader()
        };
        assert!(!lease.admit_read(at(10), follower));
        let next_term = LeaderState {
            term: TERM + 1,
            ..leader()
        };
        assert!(
            !lease.admit_read(at(10), next_term),
            "leader again in a later term"
        );
        // A round from an earlier term, or started as a follower, grants nothing.
        let mut lease = ReadLease::new(400);
        lease.round_completed(at(0), TERM - 1, true, leader());
        lease.round_completed(at(0), TERM, false, leader());
        assert!(!lease.admit_read(at(10), leader()));
    }

    #[test]
    fn membership_changes_and_transfers_end_the_lease() {
        let mut lease = ReadLease::new(400);
        lease.round_completed(at(0), TERM, true, leader());
        let pending = LeaderState {
            conf_change_pending: true,
            ..leader()
        };
        assert!(!lease.admit_read(at(10), pending));
        lease.round_completed(at(20), TERM, true, pending);
        lease.membership_changed(at(30));
        assert!(!lease.admit_read(at(40), leader()));
        lease.round_completed(at(25), TERM, true, leader());
        assert!(
            !lease.admit_read(at(40), leader()),
            "a round from before the change counted the old majority"
        );
        lease.round_completed(at(35), TERM, true, leader());
        assert!(lease.admit_read(at(40), leader()));

        let transferring = LeaderState {
            transfer_in_progress: true,
            ..leader()
        };
        assert!(!lease.admit_read(at(41), transferring));
        lease.transfer_started(TERM);
        lease.round_completed(at(50), TERM, true, leader());
        assert!(
            !lease.admit_read(at(60), leader()),
            "no lease for the rest of a term in which a transfer started, even if it aborted"
        );
        let next_term = LeaderState {
            term: TERM + 1,
            ..leader()
        };
        lease.round_completed(at(70), TERM + 1, true, next_term);
        assert!(lease.admit_read(at(80), next_term));
    }

    #[test]
    fn renewal_only_while_reads_use_the_lease_and_half_of_it_is_gone() {
        let mut lease = ReadLease::new(400);
        assert!(
            !lease.wants_renewal(at(0), leader()),
            "never used: no renewal"
        );
        lease.round_completed(at(0), TERM, true, leader());
        assert!(lease.admit_read(at(10), leader()));
        assert!(!lease.wants_renewal(at(100), leader()));
        assert!(lease.wants_renewal(at(201), leader()));
        assert!(
            lease.wants_renewal(at(405), leader()),
            "expired and used recently"
        );
        assert!(
            !lease.wants_renewal(at(411), leader()),
            "not used for a lease"
        );
        let follower = LeaderState {
            is_leader: false,
            ..leader()
        };
        assert!(!lease.wants_renewal(at(201), follower));
    }

    #[test]
    fn the_longest_lease_leaves_room_for_ticks_and_clock_rates() {
        assert_eq!(read_lease_ms_max(10, 100), 729);
        assert!(read_lease_ms_max(10, 100) < 9 * 100);
        assert_eq!(read_lease_ms_max(1, 100), 0);
    }

    fn vote(kind: MessageType, term: u64, transfer: bool) -> Message {
        let mut message = Message::default();
        message.set_msg_type(kind);
        message.term = term;
        if transfer {
            message.context = raft::CAMPAIGN_TRANSFER.to_vec().into();
        }
        message
    }

    #[test]
    fn a_started_node_refuses_votes_for_an_election_timeout() {
        let hold = VoteHold { until: at(1000) };
        for kind in [MessageType::MsgRequestVote, MessageType::MsgRequestPreVote] {
            assert!(hold.refuses(&vote(kind, TERM + 1, false), TERM, at(999)));
            assert!(!hold.refuses(&vote(kind, TERM + 1, false), TERM, at(1000)));
            assert!(
                !hold.refuses(&vote(kind, TERM + 1, true), TERM, at(0)),
                "a leader transfer's vote"
            );
            assert!(
                !hold.refuses(&vote(kind, TERM, false), TERM, at(0)),
                "raft-rs answers votes of its own term"
            );
        }
        let mut append = vote(MessageType::MsgAppend, TERM + 1, false);
        append.set_msg_type(MessageType::MsgAppend);
        assert!(!hold.refuses(&append, TERM, at(0)));
        let mut config = RaftConfig {
            tick_interval_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            proposals_pending_max: 1,
            mailbox_capacity: 1,
            log_keep_entries: 1,
            log_lag_entries_max: 1,
            log_lag_bytes_max: 1,
            read_lease_ms: 700,
        };
        let started = VoteHold::starting_at(&config, LeaseInstant::now());
        let now = LeaseInstant::now();
        assert!(started.until > now && now.until(started.until) <= Duration::from_secs(1));
        let vote_now = vote(MessageType::MsgRequestVote, TERM + 1, false);
        assert!(started.refuses(&vote_now, TERM, now));
        config.read_lease_ms = 0;
        let without_leases = VoteHold::starting_at(&config, LeaseInstant::now());
        assert!(
            !without_leases.refuses(&vote_now, TERM, LeaseInstant::now()),
            "no hold where leases are off"
        );
    }
}
