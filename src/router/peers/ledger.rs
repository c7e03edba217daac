//! What one router knows of its peers, and how much of each shared limit it may use (pure: the
//! clock is an argument, reports are plain values).
//!
//! The rule, for one shared limit `L` (an engine's slots, a provider's concurrency, requests per
//! minute) over `N` routers:
//!
//! - **room** = `L` minus what the peers use: a *fresh* peer (heard within `stale_after`, and
//!   acknowledging a report of ours sent within it) counts what it last reported; any other
//!   counts the larger of its last report and [`silent_peer`]; a router expected but not listed
//!   counts [`silent_peer`]. A peer that hears us but that we cannot hear, or one that we hear
//!   but that does not hear us, is thus silent to us, and we keep to our fixed share.
//! - **cap** = the room, and no more than [`ahead`]`(L)` (1, or `L / 32` for a large limit)
//!   above the lowest count this router reported since the last report every fresh peer
//!   acknowledged (no fresh peer: the room alone).
//!
//! So a router's count runs at most `ahead(L)` ahead of what any fresh peer believes of it, and
//! the routers together run at most `L + (N - 1) × ahead(L)`: whoever admitted last saw every
//! other router within `ahead(L)` of its real count. A router that hears nobody is held to its
//! fixed share by the silent counts, whatever it hears back.

use std::collections::{BTreeMap, VecDeque};

use super::silent_peer;
use super::wire::{Counts, Report};
use crate::clock::Millis;

/// How far a router's count on a shared limit of `limit` may run ahead of what its fresh peers
/// have acknowledged: the overshoot each other router can add (see the module's bound). One
/// slot, or 1/32 of a large limit, so that a router taking many requests at once waits for
/// fewer acknowledgements; either way at most about 3 % of the limit per other router.
pub fn ahead(limit: u32) -> u32 {
    (limit / AHEAD_DIVISOR).max(1)
}

const AHEAD_DIVISOR: u32 = 32;

/// Reports kept to look acknowledgements up in; an older acknowledgement counts as none.
const HISTORY: usize = 128;

/// How many staleness bounds a new router waits at most for its listed peers to be heard.
const SETTLE_STALE_TIMES: Millis = 4;

/// What this router may use of one shared limit now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Room {
    /// Its own count must stay below this to take one more.
    pub cap: u32,
    /// What the view leaves it (`cap` <= `room`): a slot between the two comes with the next
    /// acknowledgement, so a request waits for it rather than spilling.
    pub room: u32,
}

#[derive(Clone, Debug)]
struct Heard {
    name: String,
    boot: u64,
    seq: u64,
    at: Millis,
    counts: Counts,
    /// The last report of ours it heard (`None`: none of this boot).
    acked: Option<u64>,
}

/// One router's view of its peers.
#[derive(Clone, Debug)]
pub struct Ledger {
    name: String,
    boot: u64,
    seq: u64,
    /// How many routers the service runs (`router.replicas`).
    routers: u32,
    stale_after: Millis,
    /// What it sent, by seq (oldest first), and when.
    sent: VecDeque<(u64, Millis, Counts)>,
    /// By address (`host:port`); `None`: listed, never heard.
    peers: BTreeMap<String, Option<Heard>>,
    /// When it first reported.
    joined: Option<Millis>,
}

impl Ledger {
    /// `boot` tells this process from an earlier one of the same name (a restart).
    pub fn new(name: String, boot: u64, routers: u32, stale_after: Millis) -> Self {
        Self {
            name,
            boot,
            seq: 0,
            routers: routers.max(1),
            stale_after,
            sent: VecDeque::new(),
            peers: BTreeMap::new(),
            joined: None,
        }
    }

    pub fn set_routers(&mut self, routers: u32, stale_after: Millis) {
        self.routers = routers.max(1);
        self.stale_after = stale_after;
    }

    /// The peers' addresses now: those still listed keep what was heard of them.
    pub fn set_peers(&mut self, addrs: &[String]) {
        self.peers.retain(|a, _| addrs.contains(a));
        for a in addrs {
            self.peers.entry(a.clone()).or_insert(None);
        }
    }

    pub fn peer_addrs(&self) -> impl Iterator<Item = &str> {
        self.peers.keys().map(String::as_str)
    }

    /// The routers counted: as configured, or more while more are listed (a rollout's surge).
    pub fn routers(&self) -> u32 {
        self.routers.max(self.peers.len() as u32 + 1)
    }

    /// The report to send at `now` of this router's `counts`, acknowledging what it heard.
    pub fn report(&mut self, counts: Counts, now: Millis) -> Report {
        self.seq += 1;
        self.joined.get_or_insert(now);
        self.sent.push_back((self.seq, now, counts.clone()));
        if self.sent.len() > HISTORY {
            self.sent.pop_front();
        }
        let acks = self
            .peers
            .values()
            .flatten()
            .map(|h| (h.name.clone(), [h.boot, h.seq]))
            .collect();
        Report {
            from: self.name.clone(),
            boot: self.boot,
            seq: self.seq,
            counts,
            acks,
        }
    }

    /// Takes in a report that came from `addr`. `None`: not from a listed peer, or older than
    /// one already heard (ignored). `Some(moved)`: whether its counts changed, so that it waits
    /// for an acknowledgement to go on.
    pub fn hear(&mut self, addr: &str, r: Report, now: Millis) -> Option<bool> {
        let slot = self.peers.get_mut(addr)?;
        if let Some(h) = slot
            && h.boot == r.boot
            && h.seq >= r.seq
        {
            return None;
        }
        let moved = slot
            .as_ref()
            .is_none_or(|h| h.boot != r.boot || h.counts != r.counts);
        let acked = r
            .acks
            .get(&self.name)
            .and_then(|&[boot, seq]| (boot == self.boot).then_some(seq));
        *slot = Some(Heard {
            name: r.from,
            boot: r.boot,
            seq: r.seq,
            at: now,
            counts: r.counts,
            acked,
        });
        Some(moved)
    }

    /// Heard within the staleness bound, acknowledging a report of ours sent within it.
    fn fresh(&self, h: &Heard, now: Millis) -> bool {
        let recent = |t: Millis| now - t <= self.stale_after;
        recent(h.at)
            && h.acked.is_some_and(|seq| {
                self.sent
                    .iter()
                    .find(|(s, _, _)| *s == seq)
                    .is_some_and(|(_, at, _)| recent(*at))
            })
    }

    /// The lowest count of `key` this router reported since `seq` (0 when that report is no
    /// longer kept): what a peer that acknowledged `seq` believes of it, at the least.
    fn reported_since(&self, seq: u64, key: &str) -> u32 {
        match self.sent.front() {
            Some((first, _, _)) if *first <= seq => self
                .sent
                .iter()
                .filter(|(s, _, _)| *s >= seq)
                .map(|(_, _, c)| c.slot(key))
                .min()
                .unwrap_or(0),
            _ => 0,
        }
    }

    /// Whether this router knows every listed peer counts it: each has been heard from (a
    /// peer reports only to routers it lists), or the wait for them is over. A router takes
    /// no traffic before (its readiness waits), so routers that do not know each other yet
    /// never share a limit unawares.
    pub fn settled(&self, now: Millis) -> bool {
        self.peers.values().all(Option::is_some)
            || self
                .joined
                .is_some_and(|j| now - j >= SETTLE_STALE_TIMES * self.stale_after)
    }

    /// What this router may use now of the shared limit `key` of `limit` in all.
    pub fn room(&self, key: &str, limit: u32, now: Millis) -> Room {
        let n = self.routers();
        let silent = silent_peer(limit, n);
        let missing = n - 1 - self.peers.len() as u32;
        let mut others = missing.saturating_mul(silent);
        let mut acked = u32::MAX;
        for h in self.peers.values() {
            let used = match h {
                // A count past the limit is nonsense: no peer makes this router spill more.
                Some(h) if self.fresh(h, now) => {
                    let seen = h.acked.map_or(0, |seq| self.reported_since(seq, key));
                    acked = acked.min(seen);
                    h.counts.slot(key).min(limit)
                }
                Some(h) => h.counts.slot(key).min(limit).max(silent),
                None => silent,
            };
            others = others.saturating_add(used);
        }
        let room = limit.saturating_sub(others);
        Room {
            cap: room.min(acked.saturating_add(ahead(limit))),
            room,
        }
    }

    /// What the peers last reported of `key`, silent or not: what the view shows, before
    /// the fallback for silence.
    pub fn reported(&self, key: &str) -> u32 {
        self.peers
            .values()
            .flatten()
            .map(|h| h.counts.slot(key))
            .fold(0, u32::saturating_add)
    }

    /// What the peers have spent of a shared spend cap, counted as [`Self::room`] counts
    /// slots (a silent peer: the larger of its last report and its even share of `cap`).
    pub fn others_spend(&self, cap: f64, now: Millis) -> f64 {
        let n = self.routers();
        let share = cap / f64::from(n);
        let missing = n - 1 - self.peers.len() as u32;
        let mut spent = f64::from(missing) * share;
        // A spend that is no amount counts as the whole cap: it must not let anything through.
        let said = |h: &Heard| {
            let s = h.counts.spend;
            if s.is_finite() {
                s.clamp(0.0, cap)
            } else {
                cap
            }
        };
        for h in self.peers.values() {
            spent += match h {
                Some(h) if self.fresh(h, now) => said(h),
                Some(h) => said(h).max(share),
                None => share,
            };
        }
        spent
    }

    /// Each listed peer by address, with its name once heard and how long ago it was heard.
    pub fn ages(&self, now: Millis) -> Vec<(String, Option<(String, Millis)>)> {
        self.peers
            .iter()
            .map(|(a, h)| (a.clone(), h.as_ref().map(|h| (h.name.clone(), now - h.at))))
            .collect()
    }
}

#[cfg(test)]
mod tests;
