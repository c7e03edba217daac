//! Revisions in the router (pure): which engines serve which revision, and which revision a
//! request is meant for. The controller publishes each revision's weight in the
//! InferenceService status (`status.revisions`). An engine's revision is its pod's: the
//! Deployment that made it names it (`<revision>-<replica set hash>-<suffix>`), whichever
//! Service lists it, so a pod never changes revision as the Services' endpoints update one
//! after the other. Without a pod name, an address another revision's Service lists is that
//! revision's, and the rest of `<name>-engine`'s (whose selector spans every engine pod) the
//! first revision's.

use std::collections::BTreeMap;
use std::sync::Arc;

/// A revision that takes requests, and its weight (percent); or, at weight 0, the share of
/// the others' requests mirrored to it (`shadow`, percent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub name: Arc<str>,
    pub weight: u32,
    pub shadow: u32,
}

/// Where the engines are: ready addresses by Service name, and the pod behind each address
/// (when the endpoint names one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listed {
    pub by_service: BTreeMap<String, Vec<String>>,
    pub pods: BTreeMap<String, String>,
}

/// The revision whose Deployment made pod `pod`: the route named as its prefix, followed by
/// the replica set's hash and the pod's own suffix.
fn of_pod<'a>(pod: &str, routes: &'a [Route]) -> Option<&'a Route> {
    routes.iter().find(|r| {
        pod.strip_prefix(&*r.name)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|rest| rest.split('-').count() == 2)
    })
}

/// Every address with its revision, sorted by address.
fn tagged<'a>(l: &Listed, broad: &str, routes: &'a [Route]) -> Vec<(String, Option<&'a Route>)> {
    let mut out: BTreeMap<&String, Option<&Route>> = BTreeMap::new();
    // Other revisions' Services first: an address they list is theirs, not the broad one's.
    let services = l
        .by_service
        .iter()
        .filter(|(s, _)| *s != broad)
        .chain(l.by_service.get_key_value(broad));
    for (svc, addrs) in services {
        for a in addrs {
            out.entry(a).or_insert_with(|| match l.pods.get(a) {
                Some(pod) => of_pod(pod, routes),
                None => routes.iter().find(|r| *r.name == **svc),
            });
        }
    }
    out.into_iter().map(|(a, r)| (a.clone(), r)).collect()
}

/// The revision requests are mirrored to, its share, and its engines' addresses.
pub fn mirrors(l: &Listed, broad: &str, routes: &[Route]) -> Option<(Arc<str>, u32, Vec<String>)> {
    let r = routes.iter().find(|r| r.weight == 0 && r.shadow > 0)?;
    let own = tagged(l, broad, routes)
        .into_iter()
        .filter(|(_, t)| t.is_some_and(|t| t.name == r.name))
        .map(|(a, _)| a)
        .collect();
    Some((r.name.clone(), r.shadow.min(100), own))
}

/// The engines that take requests, each with its revision (`None` without revisions: all of
/// `broad`'s, as before revisions existed).
pub fn engines(l: &Listed, broad: &str, routes: &[Route]) -> Vec<(String, Option<Arc<str>>)> {
    if routes.is_empty() {
        let all = l.by_service.get(broad).into_iter().flatten().cloned();
        return all.map(|a| (a, None)).collect();
    }
    tagged(l, broad, routes)
        .into_iter()
        .filter_map(|(a, t)| {
            let t = t.filter(|t| t.weight > 0)?;
            Some((a, Some(t.name.clone())))
        })
        .collect()
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

    fn slices(pairs: &[(&str, &[&str])]) -> Listed {
        Listed {
            by_service: pairs
                .iter()
                .map(|(s, a)| (s.to_string(), a.iter().map(|x| x.to_string()).collect()))
                .collect(),
            pods: BTreeMap::new(),
        }
    }

    /// A pod is its Deployment's revision whichever Service lists it: a new candidate pod that
    /// `<name>-engine`'s endpoints show before its own Service's is never the stable's.
    #[test]
    fn a_pod_is_of_the_revision_whose_deployment_made_it() {
        let mut l = slices(&[("svc-engine", &["a", "c"])]);
        l.pods = BTreeMap::from([
            ("a".to_string(), "svc-engine-5d8f9c7b6-x2x4q".to_string()),
            ("c".to_string(), "svc-1a2b3c-7f6d5c4b3-9zz8k".to_string()),
        ]);
        let routes = [route("svc-engine", 100), route("svc-1a2b3c", 0)];
        assert_eq!(
            engines(&l, "svc-engine", &routes),
            vec![("a".to_string(), Some(Arc::<str>::from("svc-engine")))]
        );
        // A pod of no listed revision (one being deleted) takes nothing.
        l.pods
            .insert("a".into(), "svc-0f0f0f-5d8f9c7b6-x2x4q".into());
        assert_eq!(engines(&l, "svc-engine", &routes), vec![]);
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
