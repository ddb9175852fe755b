//! Secrets and key digests.
//!
//! Keys are never kept or compared in plaintext: tenants and the admin are
//! identified by the SHA-256 digest of their key. The upstream key and the
//! Redis URL (which may hold a password) are [`Secret`]s that print `*****`.

use std::fmt;

use sha2::{Digest as _, Sha256};

/// A value that must not reach logs, errors or metrics.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The plaintext, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

/// SHA-256 digest of a key, as configured in `key_sha256` / `token_sha256`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// Digest of a presented key.
    pub fn of(key: &[u8]) -> Self {
        Digest(Sha256::digest(key).into())
    }

    /// Parses 64 hex characters (either case).
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).ok()?;
        Some(Digest(out))
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    /// Compares without an early exit, so timing does not tell how much of a
    /// guessed digest matched.
    pub fn ct_eq(&self, other: &Digest) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A prefix is enough to tell digests apart in a debug dump.
        write!(f, "Digest({}…)", &self.to_hex()[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_redacted() {
        let s = Secret::new("sk-very-secret");
        assert_eq!(format!("{s} {s:?}"), "***** *****");
        assert_eq!(s.expose(), "sk-very-secret");
    }

    #[test]
    fn digest_round_trips_and_compares() {
        let d = Digest::of(b"foo");
        assert_eq!(
            d.to_hex(),
            "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
        );
        let parsed = Digest::from_hex(&d.to_hex().to_uppercase()).unwrap();
        assert!(parsed.ct_eq(&d));
        assert!(!Digest::of(b"bar").ct_eq(&d));
        assert!(Digest::from_hex("abc").is_none());
    }
}
