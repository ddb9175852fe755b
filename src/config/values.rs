//! Value types for the raw config structs whose `Deserialize` checks the
//! value itself, so a bad one is reported (with its key and line) by the
//! deserialize step and never reaches a section's `load()`.
//!
//! Error wording: a visitor's `expecting` is what follows "must be" when the
//! value has the wrong type; a custom error is shown as it is.

use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};

/// A humantime duration greater than zero and at most [`MAX_DURATION`]:
/// `"250ms"`, `"30s"`, `"30d"`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HumanDuration(pub(crate) Duration);

/// The longest duration a config may give: 100 years (humantime's, of
/// 365.25 days), more than any timeout or TTL needs. The gateway adds
/// durations to the clock (`Instant::now() + ttl`), which panics past
/// about 292 billion years; humantime reads up to 584 billion.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"30s\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<HumanDuration, E> {
                match humantime::parse_duration(s) {
                    Ok(d) if d.is_zero() => Err(E::custom("must be greater than zero")),
                    Ok(d) if d > MAX_DURATION => Err(E::custom(format!(
                        "`{s}` is too long; the longest is 100 years (\"100y\")"
                    ))),
                    Ok(d) => Ok(HumanDuration(d)),
                    Err(e) => Err(E::custom(format!(
                        "`{s}` is not a duration ({e}); use e.g. \"30s\", \"5m\", \"30d\""
                    ))),
                }
            }
        }
        d.deserialize_str(V)
    }
}

/// An `IP:PORT` socket address.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ListenAddr(pub(crate) SocketAddr);

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ListenAddr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an \"IP:PORT\" address")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ListenAddr, E> {
                s.parse().map(ListenAddr).map_err(|_| {
                    E::custom(format!(
                        "`{s}` is not an address; use IP:PORT, e.g. \"0.0.0.0:8080\""
                    ))
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// A string naming one of `choices`; for an enum's `Deserialize`.
pub(crate) fn one_of<'de, D, T>(d: D, choices: &'static [(&'static str, T)]) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Copy,
{
    struct V<T: 'static>(&'static [(&'static str, T)]);
    impl<T: Copy> Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            if self.0.len() > 2 {
                f.write_str("one of ")?;
            }
            for (i, (name, _)) in self.0.iter().enumerate() {
                match i {
                    0 => {}
                    i if i + 1 == self.0.len() && self.0.len() == 2 => f.write_str(" or ")?,
                    _ => f.write_str(", ")?,
                }
                write!(f, "\"{name}\"")?;
            }
            Ok(())
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
            match self.0.iter().find(|(name, _)| *name == s) {
                Some(&(_, value)) => Ok(value),
                None => Err(E::custom(format_args!(
                    "must be {}, got \"{s}\"",
                    Expecting(&self)
                ))),
            }
        }
    }
    d.deserialize_str(V(choices))
}

/// Prints a visitor's `expecting`.
struct Expecting<'a, V>(&'a V);

impl<'de, V: Visitor<'de>> fmt::Display for Expecting<'_, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }
}

/// A list whose wrong type is reported as `expecting` (serde's own word is
/// "a sequence", which does not say of what). A bad item is reported at the
/// item's own index.
pub(crate) fn list<'de, D, T>(d: D, expecting: &'static str) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T>(&'static str, PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            while let Some(item) = seq.next_element()? {
                items.push(item);
            }
            Ok(items)
        }
    }
    d.deserialize_seq(V(expecting, PhantomData))
}

/// For `#[serde(default, deserialize_with = "strings")]` on an
/// `Option<Vec<String>>`.
pub(crate) fn strings<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    list(d, "a list of strings").map(Some)
}

/// For `#[serde(default, deserialize_with = "integers")]` on an
/// `Option<Vec<i64>>`.
pub(crate) fn integers<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<i64>>, D::Error> {
    list(d, "a list of integers").map(Some)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Three {
        A,
        B,
        C,
    }

    fn three(s: &str) -> Result<Three, String> {
        let d = de::value::StrDeserializer::<de::value::Error>::new(s);
        one_of(d, &[("a", Three::A), ("b", Three::B), ("c", Three::C)]).map_err(|e| e.to_string())
    }

    #[test]
    fn choices_are_named_in_the_error() {
        assert_eq!(three("b"), Ok(Three::B));
        assert_eq!(three("c"), Ok(Three::C));
        assert_eq!(
            three("A").unwrap_err(),
            "must be one of \"a\", \"b\", \"c\", got \"A\""
        );
    }
}
