//! Revisions in the router (pure): which engines serve which revision, and which revision a
//! request is meant for. The controller publishes each revision's weight in the
//! InferenceService status (`status.revisions`); each revision's engines are the endpoints of
//! its own Service. The first revision's Service, `<name>-engine`, selects every engine pod of
//! the service (its selector predates revisions), so an address another revision's Service
//! lists is that revision's.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// A revision that takes requests, and its weight (percent); or, at weight 0, the share of
/// the others' requests mirrored to it (`shadow`, percent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub name: Arc<str>,
    pub weight: u32,
    pub shadow: u32,
}

/// The revision requests are mirrored to, its share, and its engines' addresses.
pub fn mirrors(
    by_service: &BTreeMap<String, Vec<String>>,
    broad: &str,
    routes: &[Route],
) -> Option<(Arc<str>, u32, Vec<String>)> {
    let r = routes.iter().find(|r| r.weight == 0 && r.shadow > 0)?;
    let claimed: BTreeSet<&String> = by_service
        .iter()
        .filter(|(s, _)| *s != broad)
        .flat_map(|(_, a)| a)
        .collect();
    let all = by_service.get(&*r.name).into_iter().flatten().cloned();
    let own: Vec<String> = if &*r.name == broad {
        all.filter(|a| !claimed.contains(a)).collect()
    } else {
        all.collect()
    };
    Some((r.name.clone(), r.shadow.min(100), own))
}

/// The engines that take requests, each with its revision (`None` without revisions: all of
/// `broad`'s, as before revisions existed). `by_service`: ready addresses by Service name.
pub fn engines(
    by_service: &BTreeMap<String, Vec<String>>,
    broad: &str,
    routes: &[Route],
) -> Vec<(String, Option<Arc<str>>)> {
    let all = |s: &str| by_service.get(s).into_iter().flatten().cloned();
    if routes.is_empty() {
        return all(broad).map(|a| (a, None)).collect();
    }
    let claimed: BTreeSet<&String> = by_service
        .iter()
        .filter(|(s, _)| *s != broad)
        .flat_map(|(_, a)| a)
        .collect();
    let mut out = Vec::new();
    for r in routes.iter().filter(|r| r.weight > 0) {
        let own: Vec<String> = if &*r.name == broad {
            all(broad).filter(|a| !claimed.contains(a)).collect()
        } else {
            all(&r.name).collect()
        };
        out.extend(own.into_iter().map(|a| (a, Some(r.name.clone()))));
    }
    out
}

/// The revision request number `turn` (of a thread's sequence) is meant for: over any 100 turns
/// in a row each revision gets its weight, interleaved rather than in runs. `None` with fewer
/// than two revisions taking requests (nothing to choose).
pub fn choose(routes: &[Route], turn: u64) -> Option<&Arc<str>> {
    let taking: Vec<&Route> = routes.iter().filter(|r| r.weight > 0).collect();
    if taking.len() < 2 {
        return None;
    }
    let total: u64 = taking.iter().map(|r| u64::from(r.weight)).sum();
    // 37 is prime to 100 (weights add up to 100): a permutation of each 100 turns.
    let mut x = turn.wrapping_mul(37) % total;
    for r in &taking {
        let w = u64::from(r.weight);
        if x < w {
            return Some(&r.name);
        }
        x -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, weight: u32) -> Route {
        Route {
            name: name.into(),
            weight,
            shadow: 0,
        }
    }

    #[test]
    fn a_shadowed_revision_takes_no_requests_but_its_engines_are_mirrored_to() {
        let s = slices(&[("svc-engine", &["a", "c"]), ("svc-1a2b3c", &["c"])]);
        let shadowed = Route {
            shadow: 10,
            ..route("svc-1a2b3c", 0)
        };
        let routes = [route("svc-engine", 100), shadowed];
        assert_eq!(
            engines(&s, "svc-engine", &routes),
            vec![("a".to_string(), Some(Arc::<str>::from("svc-engine")))]
        );
        assert_eq!(
            mirrors(&s, "svc-engine", &routes),
            Some((Arc::<str>::from("svc-1a2b3c"), 10, vec!["c".to_string()]))
        );
        assert_eq!(mirrors(&s, "svc-engine", &routes[..1]), None);
    }

    fn slices(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        pairs
            .iter()
            .map(|(s, a)| (s.to_string(), a.iter().map(|x| x.to_string()).collect()))
            .collect()
    }

    #[test]
    fn without_revisions_every_engine_of_the_broad_service_serves() {
        let s = slices(&[("svc-engine", &["a", "b"]), ("svc-1a2b3c", &["b"])]);
        assert_eq!(
            engines(&s, "svc-engine", &[]),
            vec![("a".to_string(), None), ("b".to_string(), None)]
        );
    }

    #[test]
    fn another_revisions_service_claims_its_addresses_from_the_broad_one() {
        let s = slices(&[("svc-engine", &["a", "b", "c"]), ("svc-1a2b3c", &["c"])]);
        let got = engines(
            &s,
            "svc-engine",
            &[route("svc-engine", 90), route("svc-1a2b3c", 10)],
        );
        let tag = |a: &str, r: &str| (a.to_string(), Some(Arc::<str>::from(r)));
        assert_eq!(
            got,
            vec![
                tag("a", "svc-engine"),
                tag("b", "svc-engine"),
                tag("c", "svc-1a2b3c")
            ]
        );
        // A revision at weight 0 takes nothing; one not listed neither.
        let got = engines(&s, "svc-engine", &[route("svc-1a2b3c", 100)]);
        assert_eq!(got, vec![tag("c", "svc-1a2b3c")]);
        let got = engines(
            &s,
            "svc-engine",
            &[route("svc-engine", 100), route("svc-1a2b3c", 0)],
        );
        assert_eq!(got, vec![tag("a", "svc-engine"), tag("b", "svc-engine")]);
    }

    #[test]
    fn each_hundred_turns_split_exactly_by_weight_and_interleaved() {
        let routes = [route("stable", 90), route("candidate", 10)];
        for start in [0u64, 7, 1_000_003] {
            let picks: Vec<&str> = (start..start + 100)
                .map(|t| &**choose(&routes, t).unwrap())
                .collect();
            assert_eq!(picks.iter().filter(|p| **p == "candidate").count(), 10);
        }
        // Not in one run: no more than 10 stable turns in a row between candidate turns.
        let picks: Vec<&str> = (0..100).map(|t| &**choose(&routes, t).unwrap()).collect();
        let longest = picks
            .split(|p| *p == "candidate")
            .map(<[_]>::len)
            .max()
            .unwrap();
        assert!(longest <= 10, "longest run {longest}");
        assert_eq!(choose(&[route("only", 100)], 3), None);
        assert_eq!(choose(&[route("a", 100), route("b", 0)], 3), None);
    }
}
