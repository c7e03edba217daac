//! The report routers exchange (pure): one UDP datagram of JSON (a few dozen bytes per engine
//! and provider: one packet for dozens of engines, fragments beyond), carrying absolute counts
//! so a lost one is made good by the next.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The largest report sent or read. A router whose report would be larger sends none (logged):
/// its peers then count it silent, and it, unacknowledged, counts them silent, so each keeps
/// to its fixed share.
pub const MAX_REPORT: usize = 60_000;

/// One router's use of the shared limits.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// By limit: `engine/<host:port>`, `provider/<name>`, [`RPM`].
    #[serde(default)]
    pub slots: BTreeMap<String, u32>,
    /// Spent at providers over the last hour.
    #[serde(default)]
    pub spend: f64,
}

/// The key of the requests-per-minute budget.
pub const RPM: &str = "rpm";

pub fn engine_key(addr: &str) -> String {
    format!("engine/{addr}")
}

pub fn provider_key(name: &str) -> String {
    format!("provider/{name}")
}

impl Counts {
    pub fn slot(&self, key: &str) -> u32 {
        self.slots.get(key).copied().unwrap_or(0)
    }

    /// Records a non-zero count (zeros are left out: absent reads as 0).
    pub fn set(&mut self, key: String, n: u32) {
        if n > 0 {
            self.slots.insert(key, n);
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The sender's name (its pod name).
    pub from: String,
    /// Tells a restarted sender from its earlier process.
    pub boot: u64,
    /// Rises with every report of one boot; an older one arriving late is ignored.
    pub seq: u64,
    pub counts: Counts,
    /// For each peer the sender heard (by name): the `[boot, seq]` of its last report heard.
    #[serde(default)]
    pub acks: BTreeMap<String, [u64; 2]>,
}

impl Report {
    pub fn encode(&self) -> Option<Vec<u8>> {
        serde_json::to_vec(self)
            .ok()
            .filter(|b| b.len() <= MAX_REPORT)
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_round_trips_and_garbage_is_refused() {
        let mut counts = Counts::default();
        counts.set(engine_key("10.0.0.1:8000"), 3);
        counts.set(provider_key("together"), 0);
        counts.spend = 0.25;
        let r = Report {
            from: "router-a".into(),
            boot: 7,
            seq: 42,
            counts,
            acks: BTreeMap::from([("router-b".into(), [9, 17])]),
        };
        let bytes = r.encode().expect("small");
        assert_eq!(Report::decode(&bytes), Some(r.clone()));
        // Zero counts are left out; absent reads as 0.
        assert_eq!(r.counts.slots.len(), 1);
        assert_eq!(r.counts.slot(&provider_key("together")), 0);
        assert_eq!(Report::decode(b"{\"from\": 1}"), None);
        assert_eq!(Report::decode(&[0xff, 0x00]), None);
    }
}
