//! Secrets (ChurnZero app key, write keys, admin token) wrapped so that they
//! cannot reach a log line, an error or a status output by accident.

use std::fmt;
use subtle::ConstantTimeEq;

/// A secret string. `Debug` and `Display` print `***`; the value is only
/// reachable through [`Secret::expose`], which makes every use greppable.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The raw value, for the one place that must send it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Compares in constant time so that response timing does not leak how
    /// much of a guessed key was right.
    /// Both sides are hashed first (SHA-256), so neither the bytes nor the
    /// length of the secret show in the time taken.
    pub fn matches(&self, candidate: &str) -> bool {
        use sha2::{Digest, Sha256};
        let a = Sha256::digest(self.0.as_bytes());
        let b = Sha256::digest(candidate.as_bytes());
        bool::from(a.as_slice().ct_eq(b.as_slice()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// Finds which of several secrets a candidate matches, touching every one so
/// the time taken does not depend on which (if any) matched. Takes the
/// secrets by reference wherever they sit (a write key's is inside its
/// `WriteKey`), so that checking a request copies none of them.
pub fn find_match<'a>(
    secrets: impl IntoIterator<Item = &'a Secret>,
    candidate: &str,
) -> Option<usize> {
    let mut found = None;
    for (i, s) in secrets.into_iter().enumerate() {
        if s.matches(candidate) && found.is_none() {
            found = Some(i);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn matches_exactly() {
        let s = Secret::new("abc");
        assert!(s.matches("abc"));
        assert!(!s.matches("abd"));
        assert!(!s.matches("ab"));
        assert!(!s.matches("abcd"));
        let keys = [Secret::new("one"), Secret::new("two")];
        assert_eq!(find_match(&keys, "two"), Some(1));
        assert_eq!(find_match(&keys, "three"), None);
    }
}
