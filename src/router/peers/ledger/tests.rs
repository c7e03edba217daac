use super::*;

const S: Millis = 100;
const K: &str = "engine/e:1";

fn counts(n: u32) -> Counts {
    let mut c = Counts::default();
    c.set(K.to_string(), n);
    c
}

/// Router `name` at `addr`, with the others of `all` listed as peers.
fn ledger(name: &str, all: &[&str], routers: u32) -> Ledger {
    let mut l = Ledger::new(name.into(), 1, routers, S);
    let peers: Vec<String> = all
        .iter()
        .filter(|a| **a != name)
        .map(|a| a.to_string())
        .collect();
    l.set_peers(&peers);
    l
}

/// `from` tells `to` its count at `now`, acknowledging what it heard of `to`.
fn tell(from: &mut Ledger, from_addr: &str, to: &mut Ledger, n: u32, now: Millis) {
    let r = from.report(counts(n), now);
    to.hear(from_addr, r, now);
}

#[test]
fn a_router_that_has_heard_nobody_keeps_to_its_fixed_share() {
    // Listed but never heard, or not listed yet at all.
    let a = ledger("a", &["a", "b"], 2);
    assert_eq!(a.room(K, 8, 0), Room { cap: 4, room: 4 });
    let alone = Ledger::new("a".into(), 1, 3, S);
    assert_eq!(alone.room(K, 9, 0).cap, 3);
    // One router: the whole limit.
    assert_eq!(Ledger::new("a".into(), 1, 1, S).room(K, 8, 0).cap, 8);
}

#[test]
fn fresh_peers_leave_the_rest_one_acknowledged_step_at_a_time() {
    let (mut a, mut b) = (ledger("a", &["a", "b"], 2), ledger("b", &["a", "b"], 2));
    // b has acknowledged nothing of a: it is silent to a, which keeps to its share.
    tell(&mut b, "b", &mut a, 1, 0);
    assert_eq!(a.room(K, 8, 0), Room { cap: 4, room: 4 });
    // a reports 0 and b acknowledges it, saying 1: room 7, one step ahead of 0.
    tell(&mut a, "a", &mut b, 0, 1);
    tell(&mut b, "b", &mut a, 1, 2);
    assert_eq!(a.room(K, 8, 2), Room { cap: 1, room: 7 });
    tell(&mut a, "a", &mut b, 1, 3);
    tell(&mut b, "b", &mut a, 1, 4);
    assert_eq!(a.room(K, 8, 4), Room { cap: 2, room: 7 });
    // An acknowledgement counts the lowest report since: a reported 5 then 2, b heard the 5.
    tell(&mut a, "a", &mut b, 5, 5);
    tell(&mut b, "b", &mut a, 1, 6);
    let _ = a.report(counts(2), 7);
    assert_eq!(a.room(K, 8, 7).cap, 3);
    // A large limit lets a router run further ahead: 1/32 of it.
    assert_eq!((ahead(8), ahead(64), ahead(256)), (1, 2, 8));
    assert_eq!(a.room(K, 256, 7).cap, 2 + 8);
    // Heard lately but acknowledging only reports older than the bound: silent again.
    assert_eq!(a.room(K, 8, 5 + S + 1), Room { cap: 4, room: 4 });
    // A count past the limit is taken for the limit, and makes this router no more than full.
    tell(&mut a, "a", &mut b, 0, 200);
    tell(&mut b, "b", &mut a, u32::MAX, 201);
    assert_eq!(a.room(K, 8, 201).room, 0);
}

#[test]
fn a_silent_peer_counts_its_last_report_or_its_share_and_counts_again_when_back() {
    let (mut a, mut b) = (ledger("a", &["a", "b"], 2), ledger("b", &["a", "b"], 2));
    tell(&mut a, "a", &mut b, 0, 0);
    tell(&mut b, "b", &mut a, 6, 0);
    assert_eq!(a.room(K, 8, 0).room, 2);
    // Not heard for longer than the bound: the larger of 6 and its share (4).
    assert_eq!(a.room(K, 8, S + 1), Room { cap: 2, room: 2 });
    // Heard again, but acknowledging a report older than the bound: still silent.
    tell(&mut b, "b", &mut a, 1, 500);
    assert_eq!(a.room(K, 8, 500), Room { cap: 4, room: 4 });
    // Back: it acknowledges a fresh report, and counts what it says again.
    tell(&mut a, "a", &mut b, 0, 600);
    tell(&mut b, "b", &mut a, 0, 650);
    assert_eq!(a.room(K, 8, 650).room, 8);
}

#[test]
fn a_restarted_peer_counts_from_its_new_report_and_old_acknowledgements_do_not_count() {
    let (mut a, mut b) = (ledger("a", &["a", "b"], 2), ledger("b", &["a", "b"], 2));
    tell(&mut a, "a", &mut b, 0, 0);
    tell(&mut b, "b", &mut a, 5, 0);
    assert_eq!(a.room(K, 8, 0).room, 3);
    // b restarts: a new boot that has heard nothing of a yet counts as silent (its share)...
    let mut b2 = Ledger::new("b".into(), 2, 2, S);
    b2.set_peers(&["a".into()]);
    tell(&mut b2, "b", &mut a, 0, 2);
    assert_eq!(a.room(K, 8, 2).room, 4);
    // ... and as what it says once it acknowledges a.
    tell(&mut a, "a", &mut b2, 0, 3);
    tell(&mut b2, "b", &mut a, 0, 4);
    assert_eq!(a.room(K, 8, 4).room, 8);
    // a restarts: b's acknowledgement names a's old boot, so it is none.
    let mut a2 = Ledger::new("a".into(), 3, 2, S);
    a2.set_peers(&["b".into()]);
    let _ = a2.report(counts(0), 5);
    tell(&mut b, "b", &mut a2, 0, 5);
    assert_eq!(a2.room(K, 8, 5), Room { cap: 4, room: 4 });
    // A late report of a boot already heard is ignored, as is one from an unlisted address.
    let old = b2.report(counts(4), 6);
    let newer = b2.report(counts(1), 6);
    assert_eq!(a.hear("b", newer, 7), Some(true));
    assert_eq!(a.hear("b", old, 7), None);
    assert_eq!(a.hear("x", b2.report(counts(0), 8), 8), None);
}

#[test]
fn a_surge_counts_every_router_listed_and_spend_is_shared_alike() {
    // Configured for 2, three listed (a rollout): the fixed shares are of 3.
    let a = ledger("a", &["a", "b", "c"], 2);
    assert_eq!(a.routers(), 3);
    assert_eq!(a.room(K, 9, 0).cap, 3);
    // Spend: an unheard peer counts its share of the cap; a fresh one what it says.
    let (mut a, mut b) = (ledger("a", &["a", "b"], 2), ledger("b", &["a", "b"], 2));
    assert_eq!(a.others_spend(10.0, 0), 5.0);
    let spends = |a: &mut Ledger, b: &mut Ledger, spend: f64, now: Millis| {
        tell(a, "a", b, 0, now);
        let mut c = counts(0);
        c.spend = spend;
        let r = b.report(c, now);
        a.hear("b", r, now);
        a.others_spend(10.0, now)
    };
    assert_eq!(spends(&mut a, &mut b, 1.5, 0), 1.5);
    assert_eq!(a.others_spend(10.0, S + 1), 5.0);
    // No amount, or a negative one, must let nothing more through than its bounds.
    assert_eq!(spends(&mut a, &mut b, -3.0, 200), 0.0);
    assert_eq!(spends(&mut a, &mut b, f64::NAN, 300), 10.0);
}

#[test]
fn a_new_router_settles_once_it_has_heard_every_listed_peer_or_waited() {
    let (mut a, mut b) = (
        ledger("a", &["a", "b", "c"], 3),
        ledger("b", &["a", "b"], 2),
    );
    let _ = a.report(counts(0), 0);
    assert!(!a.settled(0));
    tell(&mut b, "b", &mut a, 0, 10);
    assert!(!a.settled(10), "c not heard yet");
    assert!(a.settled(4 * S), "waited long enough for c");
    a.set_peers(&["b".into()]);
    assert!(a.settled(20), "every listed peer heard");
}

/// A tiny deterministic generator for the model below.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Model {
    ledgers: Vec<Ledger>,
    own: Vec<u32>,
    dirty: Vec<bool>,
    last_sent: Vec<Millis>,
    /// (deliver at, to, from, report)
    wire: Vec<(Millis, usize, usize, Report)>,
}

/// Routers admitting against one limit while reports are delayed (sometimes past the
/// staleness bound), lost, reordered, and routers restart: the sum of their counts never
/// passes `limit + (N - 1) × ahead(limit)`.
#[test]
fn routers_together_never_pass_the_limit_by_more_than_the_stated_bound() {
    let mut worst = 0i64;
    for seed in 0..300u64 {
        let mut rng = Rng(seed);
        let n = 2 + rng.below(3) as usize;
        let limit = [1, 3, 8, 9, 32, 100, 256][rng.below(7) as usize];
        let lossy = rng.chance(50);
        let max_delay = [1, 5, 40, 300][rng.below(4) as usize];
        let names: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
        let all: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut m = Model {
            ledgers: names.iter().map(|x| ledger(x, &all, n as u32)).collect(),
            own: vec![0; n],
            dirty: vec![true; n],
            last_sent: vec![-1000; n],
            wire: Vec::new(),
        };
        let bound = limit + (n as u32 - 1) * ahead(limit);
        for now in 0..3_000 as Millis {
            for i in 0..n {
                // Arrivals (skewed to router 0) and completions.
                if rng.chance(if i == 0 { 60 } else { 25 }) {
                    let cap = m.ledgers[i].room(K, limit, now).cap;
                    if m.own[i] < cap {
                        m.own[i] += 1;
                        m.dirty[i] = true;
                    }
                }
                if m.own[i] > 0 && rng.chance(15) {
                    m.own[i] -= 1;
                    m.dirty[i] = true;
                }
                if rng.below(2000) == 0 {
                    // A restart: its requests die with it.
                    let boot = rng.next();
                    let mut l = Ledger::new(names[i].clone(), boot, n as u32, S);
                    let peers: Vec<String> =
                        names.iter().filter(|x| **x != names[i]).cloned().collect();
                    l.set_peers(&peers);
                    m.ledgers[i] = l;
                    m.own[i] = 0;
                    m.dirty[i] = true;
                }
                let heartbeat = now - m.last_sent[i] >= 20;
                if (m.dirty[i] && now - m.last_sent[i] >= 1) || heartbeat {
                    let r = m.ledgers[i].report(counts(m.own[i]), now);
                    for j in (0..n).filter(|j| *j != i) {
                        if lossy && rng.chance(20) {
                            continue;
                        }
                        let at = now + 1 + rng.below(max_delay) as Millis;
                        m.wire.push((at, j, i, r.clone()));
                    }
                    m.dirty[i] = false;
                    m.last_sent[i] = now;
                }
            }
            let (due, later): (Vec<_>, Vec<_>) = m.wire.drain(..).partition(|w| w.0 <= now);
            m.wire = later;
            for (_, to, from, r) in due {
                if m.ledgers[to].hear(&names[from], r, now) == Some(true) {
                    m.dirty[to] = true;
                }
            }
            let total: u32 = m.own.iter().sum();
            worst = worst.max(i64::from(total) - i64::from(limit));
            assert!(
                total <= bound,
                "seed {seed}: {n} routers, limit {limit}, at {now} ms: {:?} = {total} > {bound}",
                m.own
            );
        }
    }
    // The bound is reached, not just stayed under by idling.
    assert!(worst >= 1, "worst overshoot {worst}");
}

/// All traffic on one router of two: with prompt reports it comes to the whole limit, one
/// acknowledged step per exchange.
#[test]
fn one_busy_router_fills_the_whole_limit() {
    let (mut a, mut b) = (ledger("a", &["a", "b"], 2), ledger("b", &["a", "b"], 2));
    let mut own = 0;
    for now in 1..=40 {
        while own < a.room(K, 8, now).cap {
            own += 1;
        }
        tell(&mut a, "a", &mut b, own, now);
        tell(&mut b, "b", &mut a, 0, now);
    }
    assert_eq!(own, 8);
}
