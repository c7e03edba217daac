//! Provider API keys, read from files (a mounted Secret in a cluster) and re-read periodically so
//! a rotated Secret applies without a restart. A key only ever leaves as a sensitive header value.

use std::fmt;

use http::HeaderValue;

/// A provider's bearer header; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Bearer(HeaderValue);

impl Bearer {
    /// `Authorization: Bearer <key>` for a key file's content (trimmed); `None` when empty or
    /// not a valid header value.
    pub fn from_file_content(content: &str) -> Option<Self> {
        let key = content.trim();
        if key.is_empty() {
            return None;
        }
        let mut v = HeaderValue::from_str(&format!("Bearer {key}")).ok()?;
        // Keeps it out of HTTP/2 header compression tables and hyper's debug output.
        v.set_sensitive(true);
        Some(Self(v))
    }

    pub fn header(&self) -> &HeaderValue {
        &self.0
    }
}

impl fmt::Debug for Bearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Bearer(<redacted>)")
    }
}

/// Whether a provider can be called as far as its key goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyState {
    /// The provider has no key file configured (e.g. an in-house gateway).
    NotNeeded,
    /// Configured but unreadable or empty: the provider is skipped.
    Missing,
    Present(Bearer),
}

impl KeyState {
    pub fn usable(&self) -> bool {
        !matches!(self, KeyState::Missing)
    }

    pub fn bearer(&self) -> Option<&Bearer> {
        match self {
            KeyState::Present(b) => Some(b),
            _ => None,
        }
    }
}

/// Reads one key file. Errors are reported by kind only: the path is config, the content is not.
pub fn read_key(path: Option<&str>) -> KeyState {
    let Some(path) = path else {
        return KeyState::NotNeeded;
    };
    match std::fs::read_to_string(path) {
        Ok(s) => Bearer::from_file_content(&s).map_or(KeyState::Missing, KeyState::Present),
        Err(_) => KeyState::Missing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_trimmed_and_redacted() {
        let b = Bearer::from_file_content("  sk-secret-1\n").unwrap();
        assert_eq!(b.header().to_str().unwrap(), "Bearer sk-secret-1");
        assert!(b.header().is_sensitive());
        assert!(!format!("{b:?}").contains("sk-secret"));
        assert!(!format!("{:?}", KeyState::Present(b)).contains("sk-secret"));
        assert_eq!(Bearer::from_file_content(" \n"), None);
        assert_eq!(Bearer::from_file_content("a\u{0}b"), None);
    }

    #[test]
    fn missing_files_and_rotation() {
        let dir = crate::test_support::net::TempDir::new("keys");
        let path = dir.0.join("p");
        let p = path.to_str().unwrap();
        assert_eq!(read_key(None), KeyState::NotNeeded);
        assert_eq!(read_key(Some(p)), KeyState::Missing);
        assert!(!read_key(Some(p)).usable());
        std::fs::write(&path, "k1").unwrap();
        assert_eq!(
            read_key(Some(p)).bearer().unwrap().header(),
            &HeaderValue::from_static("Bearer k1")
        );
        std::fs::write(&path, "k2\n").unwrap();
        assert_eq!(
            read_key(Some(p)).bearer().unwrap().header(),
            &HeaderValue::from_static("Bearer k2")
        );
    }
}
