//! The labels on the objects spillway renders: what the controller selects its objects by, and
//! what routers find their engines by.

pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "spillway";
/// On a revision's pods (and its Deployment and Service): its hash. A service's first
/// revision, `<name>-engine`, has none (its selector predates revisions and cannot change).
pub const LABEL_REVISION: &str = "spillway.dev/revision";
