//! The routers of a service share every limit that holds across them (an engine's slots, a
//! provider's concurrency, the burst budget) instead of each keeping a fixed share (pure).
//! Each router reports its counts and acknowledges what it heard ([`wire`]); its [`Ledger`]
//! says how much of each limit it may use now. The rule and its bound are stated in
//! [`ledger`]; the exchange that carries the reports is `router::exchange`.

pub mod ledger;
pub mod wire;

pub use ledger::{Ledger, Room, ahead};
pub use wire::{Counts, Report};

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Cut off from every peer, a router admits at most its fixed share, so routers that are
    /// all cut off together stay within the limit.
    #[test]
    fn a_router_cut_off_admits_no_more_than_its_fixed_share() {
        for (limit, routers) in [(8, 2), (9, 3), (1, 2), (64, 5), (10, 4), (3, 3)] {
            let share = fixed_share(limit, routers);
            let silent = silent_peer(limit, routers) * (routers - 1);
            let own_max = limit.saturating_sub(silent);
            assert!(own_max <= share, "{limit}/{routers}: {own_max} > {share}");
            assert!(
                own_max * routers <= limit.max(routers),
                "{limit}/{routers}: together {}",
                own_max * routers
            );
        }
        // Shares that do not divide the limit: 64 over 5 is 12 each, the 4 left over spread.
        assert_eq!(silent_peer(64, 5), 13);
    }
}
