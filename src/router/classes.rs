//! Request classes as the router uses them. A request's class is resolved once, at arrival,
//! from the `x-spillway-class` header, and the request keeps it for its whole life: a reload
//! while it waits does not change what it may do.

use std::sync::Arc;

use crate::api::{ClassBurst, IMPLICIT_CLASS, RequestClasses};

/// What a request of one class may do.
#[derive(Debug, PartialEq, Eq)]
pub struct ClassRule {
    pub name: String,
    /// Served only by the service's own engines.
    pub never_burst: bool,
    /// Higher goes first in the queue.
    pub priority: i32,
    /// The only providers that may take it; all when `None`.
    pub providers: Option<Vec<String>>,
}

/// A request's class.
pub type Class = Arc<ClassRule>;

impl ClassRule {
    /// Whether provider `name` may take a request of this class.
    pub fn may_use(&self, provider: &str) -> bool {
        !self.never_burst
            && self
                .providers
                .as_ref()
                .is_none_or(|ps| ps.iter().any(|p| p == provider))
    }

    /// Whether some provider is out of its reach: a waiter of this class lets those behind it
    /// by to providers (see `admission::QueuePass`).
    pub fn kept_from_providers(&self) -> bool {
        self.never_burst || self.providers.is_some()
    }
}

/// The classes of one config.
#[derive(Debug)]
pub struct Classes {
    rules: Vec<Class>,
    default: usize,
}

impl Default for Classes {
    /// A service without request classes: one class, bursting as the policy says.
    fn default() -> Self {
        Self {
            rules: vec![Arc::new(ClassRule {
                name: IMPLICIT_CLASS.into(),
                never_burst: false,
                priority: 0,
                providers: None,
            })],
            default: 0,
        }
    }
}

impl Classes {
    /// From a validated config (the default class is one of the classes).
    pub fn new(config: Option<&RequestClasses>) -> Self {
        let Some(c) = config else {
            return Self::default();
        };
        let rules: Vec<Class> = c
            .classes
            .iter()
            .map(|r| {
                Arc::new(ClassRule {
                    name: r.name.clone(),
                    never_burst: r.burst == ClassBurst::Never,
                    priority: r.priority,
                    providers: r.providers.clone(),
                })
            })
            .collect();
        let default = rules
            .iter()
            .position(|r| r.name == c.default_class)
            .unwrap_or(0);
        Self { rules, default }
    }

    /// The class named `name`, if this config has one.
    pub fn get(&self, name: &str) -> Option<&Class> {
        self.rules.iter().find(|r| r.name == name)
    }

    /// Whether a request of `class` (as it arrived) may burst now, and to `provider` when one
    /// is named: a reload since may have tightened its class, never loosened it.
    pub fn allows(&self, class: &ClassRule, provider: Option<&str>) -> bool {
        let now = self.get(&class.name);
        let allowed = |r: &ClassRule| match provider {
            Some(p) => r.may_use(p),
            None => !r.never_burst,
        };
        allowed(class) && now.is_none_or(|r| allowed(r))
    }

    /// Every class's name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str())
    }

    /// The class a request's header names (the default when it names none), or the error to
    /// answer with: an unknown name is never taken for the default, since a typo must not turn
    /// data that must stay in the cluster into data that may leave it.
    pub fn resolve(&self, header: Option<&[u8]>) -> Result<Class, String> {
        let Some(raw) = header else {
            return Ok(self.rules[self.default].clone());
        };
        let name = raw.trim_ascii();
        if let Some(r) = self.rules.iter().find(|r| r.name.as_bytes() == name) {
            return Ok(r.clone());
        }
        let shown: String = String::from_utf8_lossy(&name[..name.len().min(63)]).into();
        let valid: Vec<&str> = self.rules.iter().map(|r| r.name.as_str()).collect();
        Err(format!(
            "unknown request class {shown:?} in the x-spillway-class header; the classes are: {}",
            valid.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RequestClass;

    fn classes() -> Classes {
        let class = |name: &str, burst, priority, providers: Option<&[&str]>| RequestClass {
            name: name.into(),
            burst,
            priority,
            providers: providers.map(|p| p.iter().map(|s| s.to_string()).collect()),
        };
        Classes::new(Some(&RequestClasses {
            default_class: "standard".into(),
            classes: vec![
                class("restricted", ClassBurst::Never, 100, None),
                class("standard", ClassBurst::Policy, 50, None),
                class("batch", ClassBurst::Policy, 0, Some(&["cheap"])),
            ],
        }))
    }

    #[test]
    fn a_header_names_the_class_and_none_means_the_default() {
        let c = classes();
        assert_eq!(c.resolve(None).unwrap().name, "standard");
        assert_eq!(c.resolve(Some(b"restricted")).unwrap().priority, 100);
        assert_eq!(c.resolve(Some(b" batch ")).unwrap().name, "batch");
        let err = c.resolve(Some(b"Restricted")).unwrap_err();
        assert!(
            err.contains("\"Restricted\"") && err.contains("restricted, standard, batch"),
            "{err}"
        );
        // Without classes, only the implicit one exists.
        let none = Classes::default();
        assert_eq!(none.resolve(None).unwrap().name, IMPLICIT_CLASS);
        assert!(none.resolve(Some(b"restricted")).is_err());
    }

    #[test]
    fn what_each_class_may_use() {
        let c = classes();
        let r = c.resolve(Some(b"restricted")).unwrap();
        assert!(!r.may_use("cheap") && r.kept_from_providers());
        let b = c.resolve(Some(b"batch")).unwrap();
        assert!(b.may_use("cheap") && !b.may_use("fast") && b.kept_from_providers());
        let s = c.resolve(None).unwrap();
        assert!(s.may_use("fast") && !s.kept_from_providers());
    }
}
