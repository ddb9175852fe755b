//! Collecting every error in a config file at once, each with its dotted key
//! and line.
//!
//! Two kinds of error are collected:
//!
//! - **Shape** errors (unknown keys, values of the wrong type, values a raw
//!   field's own `Deserialize` refuses): [`Check::deserialize`] runs serde
//!   over the file; when it stops at an error, the error's span is traced
//!   back to the item in the document, recorded under that item's dotted
//!   key, the item is removed, and serde runs again, until the rest of the
//!   file deserializes. The keys a table may have exist only in the raw
//!   structs (`deny_unknown_fields`); there is no second list of them.
//! - **Semantic** errors (out of range, a bad digest, a tenant defined twice),
//!   recorded by each section's `load()` through [`Check::err`].
//!
//! Lines always refer to the file as written, never to the copy that had
//! items removed.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::ops::Range;

use serde::de::DeserializeOwned;
use toml_edit::{ImDocument, Item, TableLike, Value};

use super::ConfigError;
use crate::secret::Digest;

/// A file with more shape errors than this gets the first ones and a note
/// to fix those first: each error costs one more pass over the file, and an
/// operator fixes a hundred before reading further anyway.
const MAX_SHAPE_ERRORS: usize = 100;

/// Collects errors while a config file is read and validated.
pub(crate) struct Check<'a> {
    src: &'a str,
    /// The file as written: where lines are looked up.
    doc: ImDocument<&'a str>,
    errors: Vec<ConfigError>,
}

/// One step of a path into the document: a key in a table, or an index into
/// a list or a list of tables.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// The item a serde error points at.
struct Spot {
    path: Vec<Seg>,
    /// What the file has there, in the words of our messages.
    found: &'static str,
}

impl<'a> Check<'a> {
    /// Parses `src`; a syntax error ends the check at once, as nothing else
    /// about the file can be trusted.
    pub(crate) fn new(src: &'a str) -> Result<Check<'a>, ConfigError> {
        match ImDocument::parse(src) {
            Ok(doc) => Ok(Check {
                src,
                doc,
                errors: Vec::new(),
            }),
            Err(e) => Err(ConfigError {
                key: String::new(),
                line: e.span().map(|s| line_at(src, s.start)),
                message: syntax_message(e.message(), src, e.span()),
            }),
        }
    }

    /// Records a semantic error at `key` (e.g. `tenants[1].rate.burst`).
    /// Skipped when `key`, or an item inside it, already has an error: a
    /// value removed for its type is not also reported as missing.
    pub(crate) fn err(&mut self, key: &str, message: impl Into<String>) {
        if self.errors.iter().any(|e| covers(key, &e.key)) {
            return;
        }
        let line = self.line_of(&parse_path(key));
        self.errors.push(ConfigError {
            key: key.to_string(),
            line,
            message: message.into(),
        });
    }

    /// `value`, or the errors if there are any.
    pub(crate) fn finish<T>(self, value: T) -> Result<T, Vec<ConfigError>> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(self.into_errors())
        }
    }

    /// The errors, sorted by line (errors without a line last).
    pub(crate) fn into_errors(mut self) -> Vec<ConfigError> {
        self.errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
        self.errors
    }

    /// Deserializes the file into `T`, recording every shape error (see the
    /// module doc). `None` if the file could not be made to deserialize; the
    /// reason is among the errors.
    pub(crate) fn deserialize<T: DeserializeOwned>(&mut self) -> Option<T> {
        let mut edited = self.doc.clone().into_mut();
        let mut text = Cow::Borrowed(self.src);
        for recorded in 0..=MAX_SHAPE_ERRORS {
            let error = match toml::from_str::<T>(&text) {
                Ok(value) => return Some(value),
                Err(e) => e,
            };
            if recorded == MAX_SHAPE_ERRORS {
                self.errors.push(ConfigError {
                    key: String::new(),
                    line: None,
                    message: format!(
                        "more than {MAX_SHAPE_ERRORS} unknown keys or wrong types; fix these first"
                    ),
                });
                break;
            }
            let spot = error.span().and_then(|span| {
                let doc = ImDocument::parse(text.as_ref()).ok()?;
                let mut best = None;
                locate_in_table(doc.as_table(), span.start, &mut Vec::new(), &mut best);
                best
            });
            let Some(spot) = spot else {
                // Nothing to point at or remove: report it as it is and stop.
                let unedited = matches!(text, Cow::Borrowed(_));
                self.errors.push(ConfigError {
                    key: String::new(),
                    line: error
                        .span()
                        .filter(|_| unedited)
                        .map(|s| line_at(self.src, s.start)),
                    message: error.message().trim().to_string(),
                });
                return None;
            };
            self.errors.push(ConfigError {
                key: dotted(&spot.path),
                line: self.line_of(&spot.path),
                message: plain_message(error.message(), spot.found),
            });
            // The whole key goes, also when the error is in one of its list
            // items: removing an item from a list would renumber the rest.
            let key_end = spot
                .path
                .iter()
                .rposition(|s| matches!(s, Seg::Key(_)))
                .map_or(0, |i| i + 1);
            if !remove(edited.as_table_mut(), &spot.path[..key_end]) {
                return None;
            }
            text = Cow::Owned(edited.to_string());
        }
        None
    }

    /// Checks that an optional integer is > 0.
    pub(crate) fn positive<T: TryFrom<i64>>(
        &mut self,
        key: &str,
        raw: Option<i64>,
        default: T,
    ) -> T {
        match raw {
            None => default,
            Some(v) if v > 0 => match T::try_from(v) {
                Ok(n) => n,
                Err(_) => {
                    self.err(key, format!("is too large, got {v}"));
                    default
                }
            },
            Some(v) => {
                self.err(key, format!("must be a positive integer, got {v}"));
                default
            }
        }
    }

    /// Checks that an optional integer is >= 0.
    pub(crate) fn non_negative(&mut self, key: &str, raw: Option<i64>, default: u64) -> u64 {
        match raw.map(|v| (v, u64::try_from(v))) {
            None => default,
            Some((_, Ok(n))) => n,
            Some((v, Err(_))) => {
                self.err(key, format!("must be >= 0, got {v}"));
                default
            }
        }
    }

    /// Parses a key digest as `embedgate hash-key` prints it.
    pub(crate) fn digest(&mut self, key: &str, raw: &str) -> Option<Digest> {
        let digest = Digest::from_hex(raw);
        if digest.is_none() {
            self.err(
                key,
                "must be 64 hex characters (the SHA-256 digest printed by `embedgate hash-key`)",
            );
        }
        digest
    }

    /// The line of the item at `path` in the file as written, falling back
    /// to the nearest enclosing item the file spells out.
    fn line_of(&self, path: &[Seg]) -> Option<usize> {
        let mut item = self.doc.as_item();
        let mut best = None;
        for seg in path {
            let (next, key_span) = match seg {
                Seg::Key(k) => match item.as_table_like().and_then(|t| t.get_key_value(k)) {
                    Some((key, next)) => (next, key.span()),
                    None => break,
                },
                Seg::Index(i) => match item.get(*i) {
                    Some(next) => (next, None),
                    None => break,
                },
            };
            best = next.span().or(key_span).or(best);
            item = next;
        }
        best.map(|span| line_at(self.src, span.start))
    }
}

/// Whether an error recorded at `existing` is about `key` or something in it.
fn covers(key: &str, existing: &str) -> bool {
    existing
        .strip_prefix(key)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

/// A syntax error in words. The TOML parser has none for some errors (a
/// control character in a comment): those get the column and what is
/// there.
fn syntax_message(message: &str, src: &str, span: Option<Range<usize>>) -> String {
    let message = message.trim();
    if !message.is_empty() {
        return message.to_string();
    }
    let Some(at) = span.map(|s| s.start.min(src.len())) else {
        return "not valid TOML".to_string();
    };
    let line_start = src
        .get(..at)
        .and_then(|before| before.rfind('\n'))
        .map_or(0, |i| i + 1);
    let column = src.get(line_start..at).map_or(0, |s| s.chars().count()) + 1;
    match src.get(at..).and_then(|rest| rest.chars().next()) {
        Some(c) => format!("not valid TOML at column {column}: unexpected {c:?}"),
        None => format!("not valid TOML at column {column}"),
    }
}

/// The 1-based line of a byte offset.
fn line_at(src: &str, offset: usize) -> usize {
    src.as_bytes()[..offset.min(src.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// `tenants[1].key_sha256[0]` as path segments.
fn parse_path(key: &str) -> Vec<Seg> {
    let mut path = Vec::new();
    for part in key.split('.') {
        let mut pieces = part.split('[');
        if let Some(name) = pieces.next().filter(|n| !n.is_empty()) {
            path.push(Seg::Key(name.to_string()));
        }
        for index in pieces {
            if let Ok(i) = index.trim_end_matches(']').parse() {
                path.push(Seg::Index(i));
            }
        }
    }
    path
}

/// Path segments as a dotted key; a key that is not a bare TOML key is quoted.
fn dotted(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !k.is_empty()
                    && k.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if bare {
                    out.push_str(k);
                } else {
                    let _ = write!(out, "{k:?}");
                }
            }
            Seg::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
        }
    }
    out
}

/// A serde message in the words `check-config` has always used.
fn plain_message(serde_message: &str, found: &str) -> String {
    let message = serde_message.trim();
    if message.starts_with("unknown field") {
        return "unknown key".to_string();
    }
    if let Some((_, expected)) = message
        .strip_prefix("invalid type: ")
        .and_then(|rest| rest.rsplit_once(", expected "))
    {
        return format!("must be {}, got {found}", expected_words(expected));
    }
    // Our own `Deserialize` impls (durations, addresses, choices) already
    // speak to the operator.
    message.to_string()
}

/// What serde's derive calls a type, in the operator's words.
fn expected_words(serde_name: &str) -> &str {
    match serde_name {
        "i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64" | "isize" | "usize" => {
            "an integer"
        }
        "f32" | "f64" => "a number",
        "a boolean" => "true or false",
        "a sequence" => "a list",
        "a map" => "a table",
        other if other.starts_with("struct ") => "a table",
        other => other,
    }
}

fn contains(span: Option<Range<usize>>, at: usize) -> bool {
    span.is_some_and(|s| s.start <= at && at < s.end.max(s.start + 1))
}

/// Keeps the deepest item whose key or value holds offset `at`.
fn consider(path: &[Seg], found: &'static str, best: &mut Option<Spot>) {
    if best.as_ref().is_none_or(|b| path.len() >= b.path.len()) {
        *best = Some(Spot {
            path: path.to_vec(),
            found,
        });
    }
}

fn locate_in_table(table: &dyn TableLike, at: usize, path: &mut Vec<Seg>, best: &mut Option<Spot>) {
    for (name, item) in table.iter() {
        path.push(Seg::Key(name.to_string()));
        let key_span = table.get_key_value(name).and_then(|(k, _)| k.span());
        if contains(key_span, at) || contains(item.span(), at) {
            consider(path, found_item(item), best);
        }
        match item {
            Item::None => {}
            Item::Value(v) => locate_in_value(v, at, path, best),
            Item::Table(t) => locate_in_table(t, at, path, best),
            Item::ArrayOfTables(tables) => {
                for (i, t) in tables.iter().enumerate() {
                    path.push(Seg::Index(i));
                    if contains(t.span(), at) {
                        consider(path, "a table", best);
                    }
                    locate_in_table(t, at, path, best);
                    path.pop();
                }
            }
        }
        path.pop();
    }
}

fn locate_in_value(value: &Value, at: usize, path: &mut Vec<Seg>, best: &mut Option<Spot>) {
    match value {
        Value::InlineTable(t) => locate_in_table(t, at, path, best),
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                if contains(v.span(), at) {
                    consider(path, found_value(v), best);
                }
                locate_in_value(v, at, path, best);
                path.pop();
            }
        }
        Value::String(_)
        | Value::Integer(_)
        | Value::Float(_)
        | Value::Boolean(_)
        | Value::Datetime(_) => {}
    }
}

fn found_item(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Value(v) => found_value(v),
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "a list of tables",
    }
}

fn found_value(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date",
        Value::Array(_) => "a list",
        Value::InlineTable(_) => "a table",
    }
}

/// Removes the key at `path` (which ends in a key); whether it was there.
fn remove(table: &mut dyn TableLike, path: &[Seg]) -> bool {
    match path {
        [Seg::Key(k)] => table.remove(k).is_some(),
        [Seg::Key(k), rest @ ..] => table.get_mut(k).is_some_and(|item| remove_in(item, rest)),
        _ => false,
    }
}

fn remove_in(item: &mut Item, path: &[Seg]) -> bool {
    match path {
        [Seg::Index(i), rest @ ..] => match item {
            Item::ArrayOfTables(tables) => tables.get_mut(*i).is_some_and(|t| remove(t, rest)),
            Item::Value(Value::Array(items)) => items
                .get_mut(*i)
                .and_then(Value::as_inline_table_mut)
                .is_some_and(|t| remove(t, rest)),
            Item::None | Item::Value(_) | Item::Table(_) => false,
        },
        _ => item.as_table_like_mut().is_some_and(|t| remove(t, path)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip() {
        let path = parse_path("tenants[1].key_sha256[0]");
        assert_eq!(
            path,
            vec![
                Seg::Key("tenants".into()),
                Seg::Index(1),
                Seg::Key("key_sha256".into()),
                Seg::Index(0),
            ]
        );
        assert_eq!(dotted(&path), "tenants[1].key_sha256[0]");
        assert_eq!(
            dotted(&[Seg::Key("server".into()), Seg::Key("a b".into())]),
            "server.\"a b\""
        );
    }

    #[test]
    fn an_error_covers_the_items_inside_its_key() {
        assert!(covers("tenants[0].key_sha256", "tenants[0].key_sha256"));
        assert!(covers("tenants[0].key_sha256", "tenants[0].key_sha256[2]"));
        assert!(covers("tenants[0].rate", "tenants[0].rate.burst"));
        assert!(!covers("tenants[0].rate", "tenants[0].rates"));
        assert!(!covers("tenants[0].rate.burst", "tenants[0].rate"));
    }

    #[test]
    fn serde_words_become_ours() {
        assert_eq!(
            plain_message("invalid type: string \"big\", expected i64", "a string"),
            "must be an integer, got a string"
        );
        assert_eq!(
            plain_message(
                "invalid type: integer `5`, expected struct RawRate",
                "an integer"
            ),
            "must be a table, got an integer"
        );
        assert_eq!(
            plain_message("unknown field `lisen`, expected one of `listen`", ""),
            "unknown key"
        );
        assert_eq!(plain_message("our own words", ""), "our own words");
    }
}
