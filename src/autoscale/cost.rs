//! Cost-aware scaling (pure): how many replicas are worth their GPUs when providers could
//! serve the demand above them (`ScalingPolicy.spec.cost`).
//!
//! A replica costs its GPUs' price busy or idle; providers charge per request. A replica
//! whose slots are busy a fraction `u` of the time serves `u × slots` slot-seconds each
//! second, which the providers would charge `u × slots × provider` for (`provider`: their price
//! for the requests that hold one local slot for a second). It is worth its GPUs while that is
//! at least their price `gpu` a second: `u ≥ gpu / (slots × provider)`, the break-even
//! occupancy. Demand fills replicas in turn, so with `D` slots of demand the `k`-th replica is
//! busy `min(1, (D − (k − 1) × slots) / slots)`, and the replicas worth their GPUs are the
//! largest `k` with that at least the break-even. Demand that may not go to providers
//! (request classes with `burst: Never`) needs its replicas whatever they cost, with half a
//! replica to spare: other requests fill every slot that frees, so those requests wait for
//! releases, and the spare keeps releases well ahead of their arrivals.

/// The replicas worth their GPUs, and why.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Worth {
    /// The occupancy at which a replica costs what the providers charge for its requests (above
    /// 1, no replica ever does).
    pub break_even: f64,
    pub replicas: i32,
}

/// What [`worth`] needs, all per second and in one currency.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prices {
    /// One replica's GPUs.
    pub gpu: f64,
    /// The providers' charge for the requests that would hold one local slot.
    pub provider_per_slot: f64,
}

/// The replicas worth their GPUs for `demand` slots, `local_only` of which may not leave;
/// `None` when a price or the slot count is not positive and finite.
pub fn worth(demand: f64, local_only: f64, slots: f64, prices: Prices) -> Option<Worth> {
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !(positive(slots) && positive(prices.gpu) && positive(prices.provider_per_slot)) {
        return None;
    }
    let break_even = prices.gpu / (slots * prices.provider_per_slot);
    let demand = demand.max(0.0);
    let for_demand = if break_even <= 1.0 {
        (demand / slots + 1.0 - break_even).floor()
    } else {
        0.0
    };
    // Other requests take every slot that frees, so those that may not leave wait for the
    // next one: half a replica of slots to spare keeps that wait near a hold time over
    // `slots / 2`.
    let for_local = if local_only > 0.0 {
        ((local_only + slots / 2.0) / slots).ceil()
    } else {
        0.0
    };
    let replicas = for_demand
        .max(for_local)
        .clamp(0.0, f64::from(i32::MAX / 2)) as i32;
    Some(Worth {
        break_even,
        replicas,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replica of 10 slots whose GPUs cost 1 a second.
    fn at(provider_per_slot: f64) -> Prices {
        Prices {
            gpu: 1.0,
            provider_per_slot,
        }
    }

    #[test]
    fn a_replica_is_worth_it_only_busy_beyond_break_even() {
        // Providers charge 0.2 a slot-second: 10 busy slots cost 2, so a replica pays at 50 %.
        let w = worth(34.0, 0.0, 10.0, at(0.2)).unwrap();
        assert!((w.break_even - 0.5).abs() < 1e-9);
        // Three replicas full, the fourth 40 % busy: below break-even, the providers take it.
        assert_eq!(w.replicas, 3);
        assert_eq!(worth(35.0, 0.0, 10.0, at(0.2)).unwrap().replicas, 4);
    }

    #[test]
    fn providers_cheaper_than_a_full_replica_get_all_that_may_leave() {
        // 0.09 a slot-second: a full replica saves 0.9 of its 1.
        let w = worth(95.0, 0.0, 10.0, at(0.09)).unwrap();
        assert!(w.break_even > 1.0);
        assert_eq!(w.replicas, 0);
        // What may not leave keeps its replicas, half a replica to spare: 21 + 5 slots.
        assert_eq!(worth(95.0, 21.0, 10.0, at(0.09)).unwrap().replicas, 3);
        assert_eq!(worth(95.0, 26.0, 10.0, at(0.09)).unwrap().replicas, 4);
    }

    #[test]
    fn expensive_providers_leave_the_demand_to_gpus() {
        // 10 a slot-second: a replica pays at 1 % busy.
        assert_eq!(worth(34.0, 0.0, 10.0, at(10.0)).unwrap().replicas, 4);
    }

    #[test]
    fn no_price_is_no_opinion() {
        assert_eq!(worth(34.0, 0.0, 10.0, at(0.0)), None);
        assert_eq!(worth(34.0, 0.0, 0.0, at(0.2)), None);
        assert_eq!(worth(34.0, 0.0, 10.0, at(f64::NAN)), None);
    }
}
