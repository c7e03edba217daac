//! Request classes: each request of a service belongs to one, named by the client in the
//! `x-spillway-class` header. A class says whether its requests may ever leave the cluster,
//! where they stand in the queue, and which providers may take them.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The header a client names its request's class in.
pub const CLASS_HEADER: &str = "x-spillway-class";

/// The one class of a service that declares none: it bursts as the ScalingPolicy says.
pub const IMPLICIT_CLASS: &str = "default";

/// Not a class name: the router's metrics label requests refused before they had a class so.
pub const NO_CLASS: &str = "none";

/// The service's request classes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.classes.all(c, self.classes.exists_one(d, d.name == c.name))").message("request class names must be unique"))]
#[x_kube(validation = Rule::new("self.classes.exists(c, c.name == self.defaultClass)").message("requestClasses.defaultClass must name one of the classes"))]
pub struct RequestClasses {
    /// The class of a request whose client names none.
    #[schemars(length(min = 1, max = 63))]
    pub default_class: String,
    /// The classes, each with a unique name.
    #[schemars(length(min = 1, max = 16))]
    pub classes: Vec<RequestClass>,
}

/// One request class.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.name != 'none'").message("request class name none is reserved (metrics label requests without a class so)"))]
pub struct RequestClass {
    /// The name clients send in the `x-spillway-class` header (a DNS label).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// `Never`: requests of this class are served only by the service's own engines, on every
    /// path (first try, retries, cold start, spill wait, reloads); they wait for a local slot or
    /// get 503. `Policy`: they burst as the ScalingPolicy's burst mode says.
    #[serde(default)]
    pub burst: ClassBurst,
    /// Waiting requests are served highest priority first, first come first served within a
    /// priority.
    #[serde(default)]
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,
    /// Only these burst providers (by name) may take requests of this class; all when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub providers: Option<Vec<String>>,
}

/// Whether a class's requests may burst.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ClassBurst {
    /// Never leaves the cluster.
    Never,
    /// As the ScalingPolicy's burst mode says.
    #[default]
    Policy,
}

impl RequestClasses {
    /// The classes whose requests never leave the cluster (`burst: Never`).
    pub fn local_only(&self) -> Vec<&str> {
        self.classes
            .iter()
            .filter(|c| c.burst == ClassBurst::Never)
            .map(|c| c.name.as_str())
            .collect()
    }

    /// The names, as an error lists them.
    pub fn names(&self) -> Vec<&str> {
        self.classes.iter().map(|c| c.name.as_str()).collect()
    }

    /// What CEL checks, and that every provider a class names is one of `providers`.
    pub fn problems(&self, providers: &[&str]) -> Vec<String> {
        let mut errs = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for c in &self.classes {
            if !seen.insert(c.name.as_str()) {
                errs.push(format!("request class name {:?} is not unique", c.name));
            }
            if c.name == NO_CLASS {
                errs.push(format!("request class name {NO_CLASS:?} is reserved"));
            }
            for p in c.providers.iter().flatten() {
                if !providers.contains(&p.as_str()) {
                    errs.push(format!(
                        "request class {:?} names provider {p:?}, which is not a burst provider",
                        c.name
                    ));
                }
            }
        }
        if !seen.contains(self.default_class.as_str()) {
            errs.push(format!(
                "requestClasses.defaultClass {:?} is not one of the classes",
                self.default_class
            ));
        }
        errs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(name: &str, providers: Option<&[&str]>) -> RequestClass {
        RequestClass {
            name: name.into(),
            burst: ClassBurst::Policy,
            priority: 0,
            providers: providers.map(|p| p.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn duplicates_an_unlisted_default_and_unknown_providers_are_problems() {
        let ok = RequestClasses {
            default_class: "a".into(),
            classes: vec![class("a", None), class("b", Some(&["p"]))],
        };
        assert!(ok.problems(&["p"]).is_empty());
        let bad = RequestClasses {
            default_class: "c".into(),
            classes: vec![class("a", None), class("a", Some(&["q"]))],
        };
        let errs = bad.problems(&["p"]).join("; ");
        for want in [
            "\"a\" is not unique",
            "names provider \"q\"",
            "\"c\" is not one",
        ] {
            assert!(errs.contains(want), "{errs} lacks {want}");
        }
    }
}
