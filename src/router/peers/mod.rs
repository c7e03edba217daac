//! The shared view of an engine's load across a service's routers (pure): each router admits
//! against the engine's whole `maxConcurrency`, counting its own requests there and what each
//! peer last said of its own. A peer not heard from recently, or not yet, counts as using the
//! rest of the engine beyond this router's fixed share, split among the peers, so a router cut
//! off from its peers admits no more than its fixed share.
//!
//! The bound: a peer's count is at most `stale_after` old, so an engine may briefly run the
//! requests the other routers admitted within that time above its limit, and never more than
//! their fixed shares would have allowed them on top of what they reported.

use crate::clock::Millis;

pub mod ledger;
pub mod wire;

pub use ledger::{AHEAD, Ledger, Room};
pub use wire::{Counts, Report};

/// What one peer last said of its requests on one engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCount {
    pub in_flight: u32,
    /// When it was heard (ms on this router's clock).
    pub heard_ms: Millis,
}

/// An engine's fixed share for one of `routers` routers (what each admits against without a
/// shared view): at least one slot.
pub fn fixed_share(limit: u32, routers: u32) -> u32 {
    (limit / routers.max(1)).max(1)
}

/// What a peer not heard from counts as: an even part (rounded up) of the slots beyond this
/// router's fixed share.
pub fn silent_peer(limit: u32, routers: u32) -> u32 {
    let peers = routers.saturating_sub(1).max(1);
    limit
        .saturating_sub(fixed_share(limit, routers))
        .div_ceil(peers)
}

/// The requests this router counts on an engine of `limit` slots shared by `routers` routers:
/// its `own`, plus each peer's last count if heard within `stale_after` of `now`, else
/// [`silent_peer`] (`None`: never heard). Admission compares it with the whole `limit`.
pub fn counted(
    limit: u32,
    routers: u32,
    own: u32,
    peers: &[Option<PeerCount>],
    now: Millis,
    stale_after: Millis,
) -> u32 {
    let silent = silent_peer(limit, routers);
    peers
        .iter()
        .map(|p| match p {
            Some(c) if now - c.heard_ms <= stale_after => c.in_flight,
            _ => silent,
        })
        .fold(own, u32::saturating_add)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Millis = 100;

    fn heard(in_flight: u32, at: Millis) -> Option<PeerCount> {
        Some(PeerCount {
            in_flight,
            heard_ms: at,
        })
    }

    #[test]
    fn fresh_peers_count_what_they_said_and_silent_ones_the_rest() {
        // Two routers, 8 slots: a fresh idle peer leaves all 8.
        assert_eq!(counted(8, 2, 3, &[heard(0, 950)], 1_000, S), 3);
        assert_eq!(counted(8, 2, 3, &[heard(5, 950)], 1_000, S), 8);
        // Not heard within the bound, or never: the rest beyond this router's share (4).
        assert_eq!(counted(8, 2, 3, &[heard(0, 850)], 1_000, S), 7);
        assert_eq!(counted(8, 2, 0, &[None], 1_000, S), 4);
        // Three routers; one fresh, one silent (half of the 6 beyond a share of 3).
        assert_eq!(counted(9, 3, 1, &[heard(2, 1_000), None], 1_000, S), 6);
        // Shares that do not divide the limit: 64 over 5 is 12 each, the 4 left over spread.
        assert_eq!(silent_peer(64, 5), 13);
        // A peer back after a silence counts what it says again.
        assert_eq!(counted(8, 2, 0, &[heard(1, 1_000)], 1_000, S), 1);
    }

    /// Cut off from every peer, a router admits at most its fixed share, so routers that are
    /// all cut off together stay within the engine's limit.
    #[test]
    fn a_router_cut_off_admits_no_more_than_its_fixed_share() {
        for (limit, routers) in [(8, 2), (9, 3), (1, 2), (64, 5), (10, 4), (3, 3)] {
            let peers = vec![None; routers as usize - 1];
            let own_max = (0..=limit)
                .take_while(|&own| counted(limit, routers, own, &peers, 0, S) < limit)
                .count() as u32;
            let share = fixed_share(limit, routers);
            assert!(own_max <= share, "{limit}/{routers}: {own_max} > {share}");
            assert!(
                own_max * routers <= limit.max(routers),
                "{limit}/{routers}: together {}",
                own_max * routers
            );
        }
    }
}
