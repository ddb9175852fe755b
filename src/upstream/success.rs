//! Upstream's 200 answer to a ONE-PEACE call, read in one pass.
//!
//! The answer is ~30 KB, almost all of it the 1536 floats of
//! `output.embedding`, and it is read on every miss. One hand-written
//! scanner checks the whole body is JSON, validates the embedding as it
//! goes (exactly [`valid_embedding`](crate::cache::valid_embedding)'s
//! rules: `dimension` finite JSON numbers), and notes where the vector and
//! the few small fields are. The vector is then a slice of the body (no
//! copy); the small fields (`code`, `message`, `request_id`, `usage`) are
//! decoded by serde_json from their own slices, as they were before.
//!
//! It accepts no more than serde_json did (a body it refuses is a 502,
//! never cached): an invalid document, a repeated `output`, `usage`,
//! `request_id`, `code`, `message` or `output.embedding`, a field of the
//! wrong type. It is stricter in three corners no real answer reaches:
//! `output` (or the whole answer) written as a JSON list instead of an
//! object, which serde's derive read positionally, and values nested more
//! than [`MAX_DEPTH`] deep.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::GatewayError;
use crate::metering::Usage;
use crate::request::{Counts, Modality};
use crate::request_id;

/// Lists and objects nest at most this deep anywhere in an answer
/// (serde_json's own recursion limit); a real answer nests 3 deep.
const MAX_DEPTH: u32 = 128;

pub(crate) struct Success {
    /// Upstream's body, passed to the client as is.
    pub(crate) body: Bytes,
    /// `output.embedding` as upstream wrote it: a slice of `body`.
    pub(crate) embedding: Bytes,
    pub(crate) request_id: String,
    /// Upstream's `usage` block, when it had a readable one.
    pub(crate) usage: Option<Usage>,
}

/// Accepts only a real success: no `code`, a numeric `output.embedding` of
/// the expected length.
pub(crate) fn parse_success(body: Bytes, dimension: usize) -> Result<Success, GatewayError> {
    let found = scan(&body, dimension)
        .map_err(|e| GatewayError::BadGateway(format!("upstream 200 is not JSON: {e}")))?;
    let code: Option<serde_json::Value> = decode(&body, &found.code)?;
    let message: Option<String> = decode(&body, &found.message)?;
    let request_id: Option<String> = decode(&body, &found.request_id)?;
    let usage: Option<serde_json::Value> = decode(&body, &found.usage)?;
    let code = match code {
        Some(serde_json::Value::String(c)) if !c.is_empty() => Some(c),
        Some(serde_json::Value::Null) | None => None,
        Some(serde_json::Value::String(_)) => None,
        Some(other) => Some(other.to_string()),
    };
    if let Some(code) = code {
        return Err(GatewayError::Upstream {
            status: StatusCode::BAD_GATEWAY,
            code,
            message: message.unwrap_or_default(),
            request_id,
        });
    }
    let at = match found.embedding {
        Embedding::Valid(at) => at,
        Embedding::Absent => {
            return Err(GatewayError::BadGateway(
                "upstream 200 without output.embedding".into(),
            ))
        }
        Embedding::Invalid => {
            return Err(GatewayError::BadGateway(format!(
                "upstream 200 whose output.embedding is not {dimension} numbers"
            )))
        }
    };
    Ok(Success {
        embedding: body.slice(at),
        body,
        request_id: request_id.unwrap_or_else(request_id::fresh),
        usage: usage.as_ref().and_then(parse_usage),
    })
}

/// A small field's value, decoded from its slice of the body as serde_json
/// decoded it inside the whole answer (`null` is `None`).
fn decode<T: DeserializeOwned>(
    body: &[u8],
    at: &Option<Range<usize>>,
) -> Result<Option<T>, GatewayError> {
    let Some(raw) = at.as_ref().and_then(|r| body.get(r.clone())) else {
        return Ok(None);
    };
    serde_json::from_slice::<Option<T>>(raw)
        .map_err(|e| GatewayError::BadGateway(format!("upstream 200 is not JSON: {e}")))
}

/// Upstream's `usage`: `{"text":{"measure":1,"weight":1},…}`.
fn parse_usage(v: &serde_json::Value) -> Option<Usage> {
    let obj = v.as_object()?;
    let mut items = Counts::default();
    let mut units = Counts::default();
    for m in Modality::ALL {
        if let Some(entry) = obj.get(m.as_str()) {
            let measure = entry.get("measure")?.as_u64()?;
            let weight = entry.get("weight")?.as_u64()?;
            items.set(m, measure);
            units.set(m, measure * weight);
        }
    }
    (!items.is_empty()).then_some(Usage { items, units })
}

/// What the scan found: where things are in the body.
#[derive(Default)]
struct Found {
    embedding: Embedding,
    usage: Option<Range<usize>>,
    request_id: Option<Range<usize>>,
    code: Option<Range<usize>>,
    message: Option<Range<usize>>,
}

#[derive(Default)]
enum Embedding {
    /// No `output`, or no `output.embedding`, or either is `null`.
    #[default]
    Absent,
    /// `dimension` numbers, here.
    Valid(Range<usize>),
    /// Some other JSON value.
    Invalid,
}

/// Why a body is not JSON, and where.
#[derive(Debug, Clone, Copy, PartialEq)]
struct NotJson {
    what: &'static str,
    at: usize,
}

impl fmt::Display for NotJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.what, self.at)
    }
}

/// The top-level fields read; each may appear once.
#[derive(Clone, Copy)]
enum Field {
    Output = 1,
    Usage = 2,
    RequestId = 4,
    Code = 8,
    Message = 16,
}

fn scan(body: &[u8], dimension: usize) -> Result<Found, NotJson> {
    let mut s = Scanner { b: body, i: 0 };
    let mut found = Found::default();
    let mut seen = 0u8;
    s.ws();
    if s.peek() != Some(b'{') {
        return s.fail("expected an object");
    }
    s.i += 1;
    s.members(|s, key| {
        let field = match &*key {
            "output" => Field::Output,
            "usage" => Field::Usage,
            "request_id" => Field::RequestId,
            "code" => Field::Code,
            "message" => Field::Message,
            _ => return s.skip_value().map(drop),
        };
        if seen & field as u8 != 0 {
            return s.fail("repeated field");
        }
        seen |= field as u8;
        match field {
            Field::Output => found.embedding = s.output(dimension)?,
            Field::Usage => found.usage = Some(s.skip_value()?),
            Field::RequestId => found.request_id = Some(s.skip_value()?),
            Field::Code => found.code = Some(s.skip_value()?),
            Field::Message => found.message = Some(s.skip_value()?),
        }
        Ok(())
    })?;
    s.ws();
    if s.i != body.len() {
        return s.fail("trailing characters");
    }
    Ok(found)
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn fail<T>(&self, what: &'static str) -> Result<T, NotJson> {
        Err(NotJson { what, at: self.i })
    }

    fn ws(&mut self) {
        self.i = skip_ws(self.b, self.i);
    }

    /// `c`, after any whitespace.
    fn eat(&mut self, c: u8, what: &'static str) -> Result<(), NotJson> {
        self.ws();
        if self.peek() != Some(c) {
            return self.fail(what);
        }
        self.i += 1;
        Ok(())
    }

    /// An object's members, after its `{`: `each` is given the scanner
    /// before the member's value and reads it.
    fn members(
        &mut self,
        mut each: impl FnMut(&mut Self, Cow<'a, str>) -> Result<(), NotJson>,
    ) -> Result<(), NotJson> {
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.eat(b'"', "expected a key")?;
            let key = self.key()?;
            self.eat(b':', "expected ':'")?;
            each(self, key)?;
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return self.fail("expected ',' or '}'"),
            }
        }
    }

    /// A key, after its opening quote, as serde_json decodes it: valid
    /// UTF-8, escapes decoded.
    fn key(&mut self) -> Result<Cow<'a, str>, NotJson> {
        let start = self.i;
        let escaped = self.string()?;
        let b: &'a [u8] = self.b;
        let bad = NotJson {
            what: "invalid key",
            at: start,
        };
        if escaped {
            let quoted = b.get(start - 1..self.i).ok_or(bad)?;
            serde_json::from_slice::<String>(quoted)
                .map(Cow::Owned)
                .map_err(|_| bad)
        } else {
            let raw = b.get(start..self.i - 1).ok_or(bad)?;
            std::str::from_utf8(raw).map(Cow::Borrowed).map_err(|_| bad)
        }
    }

    /// `output`: an object whose `embedding` is validated in place, or null.
    fn output(&mut self, dimension: usize) -> Result<Embedding, NotJson> {
        self.ws();
        match self.peek() {
            Some(b'n') => {
                self.literal(b"null")?;
                Ok(Embedding::Absent)
            }
            Some(b'{') => {
                self.i += 1;
                let mut embedding = None;
                self.members(|s, key| {
                    if key != "embedding" {
                        return s.skip_value().map(drop);
                    }
                    if embedding.is_some() {
                        return s.fail("repeated field");
                    }
                    embedding = Some(s.embedding(dimension)?);
                    Ok(())
                })?;
                Ok(embedding.unwrap_or_default())
            }
            _ => self.fail("output is not an object"),
        }
    }

    /// `output.embedding`: read as numbers in the one pass when it is
    /// what a success has, else skipped as any JSON value.
    fn embedding(&mut self, dimension: usize) -> Result<Embedding, NotJson> {
        self.ws();
        let start = self.i;
        if self.peek() == Some(b'n') {
            self.literal(b"null")?;
            return Ok(Embedding::Absent);
        }
        if let Some(end) = numbers_end(self.b, start, dimension) {
            self.i = end;
            return Ok(Embedding::Valid(start..end));
        }
        self.skip_value()?;
        Ok(Embedding::Invalid)
    }

    /// Any JSON value, after optional whitespace: its range in the body.
    /// Iterative, with the open lists and objects as bits of `open`.
    fn skip_value(&mut self) -> Result<Range<usize>, NotJson> {
        self.ws();
        let start = self.i;
        // Bit d set: the container at depth d + 1 is an object.
        let mut open: u128 = 0;
        let mut depth = 0u32;
        loop {
            self.ws();
            match self.peek() {
                Some(c @ (b'{' | b'[')) => {
                    self.i += 1;
                    self.ws();
                    let object = c == b'{';
                    let close = if object { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        self.i += 1;
                    } else {
                        if depth == MAX_DEPTH {
                            return self.fail("nested too deep");
                        }
                        if object {
                            open |= 1 << depth;
                            depth += 1;
                            self.member_key()?;
                        } else {
                            open &= !(1 << depth);
                            depth += 1;
                        }
                        continue;
                    }
                }
                Some(b'"') => {
                    self.i += 1;
                    self.string()?;
                }
                Some(b'-' | b'0'..=b'9') => self.number()?,
                Some(b't') => self.literal(b"true")?,
                Some(b'f') => self.literal(b"false")?,
                Some(b'n') => self.literal(b"null")?,
                _ => return self.fail("expected a value"),
            }
            // After a value: close what ends here, or go on to the next one.
            loop {
                if depth == 0 {
                    return Ok(start..self.i);
                }
                self.ws();
                let in_object = open & (1 << (depth - 1)) != 0;
                match self.peek() {
                    Some(b',') => {
                        self.i += 1;
                        if in_object {
                            self.member_key()?;
                        }
                        break;
                    }
                    Some(b'}') if in_object => {
                        self.i += 1;
                        depth -= 1;
                    }
                    Some(b']') if !in_object => {
                        self.i += 1;
                        depth -= 1;
                    }
                    _ => return self.fail("expected ',' or the end of a list or object"),
                }
            }
        }
    }

    /// `"key":` inside a skipped object (its key is not decoded, as
    /// serde_json does not decode what it ignores).
    fn member_key(&mut self) -> Result<(), NotJson> {
        self.eat(b'"', "expected a key")?;
        self.string()?;
        self.eat(b':', "expected ':'")
    }

    /// A string's rest, after its opening quote, with serde_json's rules
    /// for one it ignores: no control characters, only JSON's escapes.
    /// True when it has escapes.
    fn string(&mut self) -> Result<bool, NotJson> {
        let mut escaped = false;
        loop {
            match self.peek() {
                None => return self.fail("unterminated string"),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(escaped);
                }
                Some(b'\\') => {
                    escaped = true;
                    match self.b.get(self.i + 1) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 2,
                        Some(b'u') => {
                            let hex = self.b.get(self.i + 2..self.i + 6);
                            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                                return self.fail("invalid escape");
                            }
                            self.i += 6;
                        }
                        _ => return self.fail("invalid escape"),
                    }
                }
                Some(0..=0x1f) => return self.fail("control character in a string"),
                Some(_) => self.i += 1,
            }
        }
    }

    /// A number, with JSON's grammar and no range check (serde_json's
    /// for a value it ignores).
    fn number(&mut self) -> Result<(), NotJson> {
        let b = self.b;
        let mut i = self.i;
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        match b.get(i) {
            Some(b'0') => {
                i += 1;
                if matches!(b.get(i), Some(b'0'..=b'9')) {
                    self.i = i;
                    return self.fail("invalid number");
                }
            }
            Some(b'1'..=b'9') => i = digits_end(b, i + 1),
            _ => {
                self.i = i;
                return self.fail("invalid number");
            }
        }
        if b.get(i) == Some(&b'.') {
            let end = digits_end(b, i + 1);
            if end == i + 1 {
                self.i = end;
                return self.fail("invalid number");
            }
            i = end;
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            if matches!(b.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            let end = digits_end(b, i);
            if end == i {
                self.i = end;
                return self.fail("invalid number");
            }
            i = end;
        }
        self.i = i;
        Ok(())
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), NotJson> {
        if self.b.get(self.i..self.i + word.len()) != Some(word) {
            return self.fail("expected a value");
        }
        self.i += word.len();
        Ok(())
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\r' | b'\t') = b.get(i) {
        i += 1;
    }
    i
}

/// The end of the list of exactly `dimension` numbers starting at `i`
/// (just after its `]`), if one does: the list
/// [`valid_embedding`](crate::cache::valid_embedding) accepts, found
/// without leaving the body.
fn numbers_end(b: &[u8], i: usize, dimension: usize) -> Option<usize> {
    if b.get(i) != Some(&b'[') {
        return None;
    }
    let mut i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b']') {
        return (dimension == 0).then_some(i + 1);
    }
    let mut count = 0usize;
    loop {
        i = number_end(b, i)?;
        count += 1;
        if matches!(b.get(i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            i = skip_ws(b, i);
        }
        match b.get(i) {
            Some(b',') if count < dimension => {
                i += 1;
                if matches!(b.get(i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
                    i = skip_ws(b, i);
                }
            }
            Some(b']') if count == dimension => return Some(i + 1),
            _ => return None,
        }
    }
}

/// The end of the number starting at `i`, with the embedding's rules: JSON's
/// grammar, an integer part of at most 16 digits and an exponent of at most
/// 290, so every value is a finite float.
#[inline(always)]
fn number_end(b: &[u8], mut i: usize) -> Option<usize> {
    // Half the values are negative: no branch on it.
    i += usize::from(b.get(i) == Some(&b'-'));
    match b.get(i)? {
        b'0' => i += 1,
        b'1'..=b'9' => {
            let end = digits_end(b, i + 1);
            if end - i > 16 {
                return None;
            }
            i = end;
        }
        _ => return None,
    }
    if b.get(i) == Some(&b'.') {
        let end = digits_end(b, i + 1);
        if end == i + 1 {
            return None;
        }
        i = end;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let end = digits_end(b, i);
        if end == i || end - i > 3 {
            return None;
        }
        let exp = b
            .get(i..end)?
            .iter()
            .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
        if exp > 290 {
            return None;
        }
        i = end;
    }
    Some(i)
}

/// The first index at or after `i` that is not an ASCII digit: eight bytes
/// at a time while eight remain (a float's fraction is ~17 digits).
#[inline(always)]
fn digits_end(b: &[u8], mut i: usize) -> usize {
    while let Some((word, _)) = b.get(i..).and_then(<[u8]>::split_first_chunk::<8>) {
        let not_digits = non_digit_bytes(u64::from_le_bytes(*word));
        if not_digits != 0 {
            return i + (not_digits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(b'0'..=b'9') = b.get(i) {
        i += 1;
    }
    i
}

/// The high bit of each byte of `w` that is not an ASCII digit, and no
/// other bit. With `x = byte ^ 0x30` a digit is `x < 10`, and `x + 0x76`
/// reaches the high bit exactly when `x >= 10`; no byte carries into the
/// next, as the high bit is taken off before the sum and or-ed back after.
#[inline(always)]
fn non_digit_bytes(w: u64) -> u64 {
    const ZEROS: u64 = 0x3030_3030_3030_3030;
    const LOW_SEVEN: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const UP_TO_TEN: u64 = 0x7676_7676_7676_7676;
    const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
    let x = w ^ ZEROS;
    (((x & LOW_SEVEN) + UP_TO_TEN) | x) & HIGH_BITS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str, dimension: usize) -> Success {
        parse_success(Bytes::copy_from_slice(body.as_bytes()), dimension)
            .unwrap_or_else(|e| panic!("{body}: {e:?}"))
    }

    fn refused(body: &[u8], dimension: usize) -> GatewayError {
        match parse_success(Bytes::copy_from_slice(body), dimension) {
            Ok(s) => panic!(
                "accepted {}: embedding {:?}",
                String::from_utf8_lossy(body),
                s.embedding
            ),
            Err(e) => e,
        }
    }

    fn bad_gateway(body: &[u8], dimension: usize) {
        let e = refused(body, dimension);
        assert!(
            matches!(e, GatewayError::BadGateway(_)),
            "{}: {e:?}",
            String::from_utf8_lossy(body)
        );
    }

    #[test]
    fn success_requires_a_real_embedding() {
        let s = ok(
            r#"{"output":{"embedding":[0.5,1,2]},"usage":{"text":{"measure":1,"weight":1},"audio":{"measure":2,"weight":2},"total_usage":5},"request_id":"r1"}"#,
            3,
        );
        assert_eq!(&s.embedding[..], b"[0.5,1,2]");
        assert_eq!(s.request_id, "r1");
        let usage = s.usage.unwrap();
        assert_eq!(usage.items.get(Modality::Audio), 2);
        assert_eq!(usage.units.get(Modality::Audio), 4);
        assert_eq!(usage.units.get(Modality::Text), 1);

        for missing in [
            &br#"{"output":{}}"#[..],
            br#"{"output":null}"#,
            br#"{"output":{"embedding":null}}"#,
            br#"{"request_id":"r"}"#,
            br#"{}"#,
        ] {
            assert!(
                matches!(refused(missing, 3), GatewayError::BadGateway(m) if m.contains("without")),
                "{}",
                String::from_utf8_lossy(missing)
            );
        }
    }

    #[test]
    fn the_vector_is_a_slice_of_the_body() {
        let body = Bytes::from_static(br#"{"output":{"embedding":[1,2,3]},"request_id":"r"}"#);
        let s = parse_success(body.clone(), 3).unwrap();
        assert_eq!(&s.embedding[..], b"[1,2,3]");
        let offset = s.embedding.as_ptr() as usize - body.as_ptr() as usize;
        assert_eq!(offset, br#"{"output":{"embedding":"#.len());
        // No id from upstream: the gateway makes one.
        let s = ok(r#"{"output":{"embedding":[1]}}"#, 1);
        assert!(!s.request_id.is_empty());
        assert!(s.usage.is_none());
    }

    #[test]
    fn odd_whitespace_key_order_exponents_and_extra_fields() {
        let s = ok(
            " \r\n{ \"usage\" :\t{\"image\": {\"weight\":3 ,\"measure\" :1}} ,\n\"x\":[{\"a\":[[],{}]},\"s\\\"\\u00e9\",true,false,null,-1.5e-7],\
             \"output\" : { \"other\" : {\"embedding\":\"no\"}, \"embedding\" :\n[ -0 , 1e-3,2E+10 ,\t-0.020782470703125,\r\n 0.0, 1E5, 5e290 ,-12345678901234.5 ] } ,\
             \"request_id\":\"r\\u0031\", \"message\":\"\", \"code\": \"\" }\n\t ",
            8,
        );
        assert_eq!(
            &s.embedding[..],
            &b"[ -0 , 1e-3,2E+10 ,\t-0.020782470703125,\r\n 0.0, 1E5, 5e290 ,-12345678901234.5 ]"[..]
        );
        assert_eq!(s.request_id, "r1");
        let usage = s.usage.unwrap();
        assert_eq!(usage.items.get(Modality::Image), 1);
        assert_eq!(usage.units.get(Modality::Image), 3);
        // Keys are compared decoded, as serde_json compared them.
        let s = ok(
            r#"{"out\u0070ut":{"embe\u0064ding":[7]},"request\u005fid":"q"}"#,
            1,
        );
        assert_eq!(&s.embedding[..], b"[7]");
        assert_eq!(s.request_id, "q");
        // Numbers of every length, across the 8-byte steps.
        for digits in 1..=40 {
            let fraction = "7".repeat(digits);
            let body = format!(r#"{{"output":{{"embedding":[0.{fraction},-1.{fraction}e-5]}}}}"#);
            assert_eq!(ok(&body, 2).embedding.len(), 2 * digits + 11);
        }
    }

    #[test]
    fn numbers_that_are_not_finite_floats_are_refused() {
        for bad in [
            "NaN",
            "nan",
            "Infinity",
            "-Infinity",
            "inf",
            "1e999",
            "1e291",
            "-1E+291",
            "1e-291",
            "1e0001",
            "12345678901234567",
            "+1",
            "01",
            "-01",
            "1.",
            ".5",
            "-",
            "1e",
            "1e+",
            "0x10",
            "1_0",
            "\"1\"",
            "null",
            "true",
            "[1]",
            "{}",
            "1 2",
            "- 1",
        ] {
            let body = format!(r#"{{"output":{{"embedding":[0.5,{bad},2]}}}}"#);
            bad_gateway(body.as_bytes(), 3);
        }
        // The limits themselves are fine.
        ok(
            r#"{"output":{"embedding":[1e290,-1234567890123456.5,1e-290]}}"#,
            3,
        );
    }

    #[test]
    fn wrong_shapes_and_counts_are_refused() {
        for bad in [
            &br#"{"output":{"embedding":[1,2]}}"#[..],
            br#"{"output":{"embedding":[1,2,3,4]}}"#,
            br#"{"output":{"embedding":[]}}"#,
            br#"{"output":{"embedding":[1,2,3,]}}"#,
            br#"{"output":{"embedding":[1,,2,3]}}"#,
            br#"{"output":{"embedding":[,1,2,3]}}"#,
            br#"{"output":{"embedding":["1","2","3"]}}"#,
            br#"{"output":{"embedding":[[1,2,3]]}}"#,
            br#"{"output":{"embedding":[1,2,null]}}"#,
            br#"{"output":{"embedding":{"0":1,"1":2,"2":3}}}"#,
            br#"{"output":{"embedding":"[1,2,3]"}}"#,
            br#"{"output":{"embedding":123}}"#,
            // Truncated: the vector, the document.
            br#"{"output":{"embedding":[1,2,3"#,
            br#"{"output":{"embedding":[1,2,"#,
            br#"{"output":{"embedding":[1,2,3]}"#,
            br#"{"output":{"embedding":[1,2,3]},"request_id":"r"#,
            br#"{"output":{"embedding":[1,2,3]},"#,
            b"",
            b"   ",
            // Not an object, or not one object.
            br#"[{"embedding":[1,2,3]}]"#,
            br#"{"output":[[1,2,3]]}"#,
            br#"{"output":{"embedding":[1,2,3]}}x"#,
            br#"{"output":{"embedding":[1,2,3]}}{}"#,
            br#"{"output":5}"#,
            br#"{"output":"x"}"#,
            // Repeated fields serde refused.
            br#"{"output":{"embedding":[1,2,3]},"output":{"embedding":[1,2,3]}}"#,
            br#"{"output":null,"output":{"embedding":[1,2,3]}}"#,
            br#"{"output":{"embedding":[1,2,3],"embedding":[1,2,3]}}"#,
            br#"{"output":{"embedding":null,"embedding":[1,2,3]}}"#,
            br#"{"output":{"embedding":[1,2,3]},"usage":null,"usage":null}"#,
            br#"{"output":{"embedding":[1,2,3]},"request_id":"a","request_id":"b"}"#,
            br#"{"output":{"embedding":[1,2,3]},"message":"a","message":"b"}"#,
            // The small fields have their types.
            br#"{"output":{"embedding":[1,2,3]},"request_id":7}"#,
            br#"{"output":{"embedding":[1,2,3]},"message":{}}"#,
            br#"{"output":{"embedding":[1,2,3]},"usage":{"text":1e999}}"#,
            // Invalid JSON elsewhere in the body.
            br#"{"output":{"embedding":[1,2,3]},"x":01}"#,
            br#"{"output":{"embedding":[1,2,3]},"x":1.}"#,
            br#"{"output":{"embedding":[1,2,3]},"x":-}"#,
            br#"{"output":{"embedding":[1,2,3]},"x":nul}"#,
            br#"{"output":{"embedding":[1,2,3]},"x":tru}"#,
            br#"{"output":{"embedding":[1,2,3]},"x":[1,]}"#,
            br#"{"output":{"embedding":[1,2,3]},"x":{"a":1,}}"#,
            br#"{"output":{"embedding":[1,2,3]},"x":{"a"}}"#,
            br#"{"output":{"embedding":[1,2,3]},"x":{1:2}}"#,
            br#"{"output":{"embedding":[1,2,3]},"x":[}"#,
            br#"{"output":{"embedding":[1,2,3]},"x":{]}"#,
            br#"{"output":{"embedding":[1,2,3]},"x":"\q"}"#,
            br#"{"output":{"embedding":[1,2,3]},"x":"\u12g4"}"#,
            br#"{"output":{"embedding":[1,2,3]},"x":"a	b"}"#,
            br#"{"output":{"embedding":[1,2,3]},"x":"\u12"}"#,
            br#"{"output":{"embedding":[1,2,3]},"x"}"#,
            br#"{"output":{"embedding":[1,2,3]},}"#,
            br#"{"output":{"embedding":[1,2,3]}"x":1}"#,
            br#"{"output":{"embedding":[1,2,3]},'x':1}"#,
            b"{\"output\":{\"embedding\":[1,2,3]},\"\xff\":1}",
            br#"{"output":{"embedding":[1,2,3]},"\ud800":1}"#,
        ] {
            bad_gateway(bad, 3);
        }
        // Nested beyond the limit, in a field nobody reads.
        let deep = format!(
            r#"{{"output":{{"embedding":[1]}},"x":{}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        bad_gateway(deep.as_bytes(), 1);
        let deep = format!(
            r#"{{"output":{{"embedding":[1]}},"x":{}{}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        ok(&deep, 1);
    }

    #[test]
    fn a_code_is_upstreams_error() {
        let coded = br#"{"code":"InvalidParameter","message":"bad","request_id":"r2","output":{"embedding":[1,2,3]}}"#;
        match refused(coded, 3) {
            GatewayError::Upstream {
                status,
                code,
                message,
                request_id,
            } => {
                assert_eq!(status, StatusCode::BAD_GATEWAY);
                assert_eq!(code, "InvalidParameter");
                assert_eq!(message, "bad");
                assert_eq!(request_id.as_deref(), Some("r2"));
            }
            other => panic!("{other:?}"),
        }
        // Also after the vector, and with no vector or a broken one.
        for body in [
            &br#"{"output":{"embedding":[1,2,3]},"code":"Throttling"}"#[..],
            br#"{"code":"Throttling"}"#,
            br#"{"output":{"embedding":["x"]},"code":"Throttling"}"#,
        ] {
            assert!(
                matches!(refused(body, 3), GatewayError::Upstream { code, .. } if code == "Throttling")
            );
        }
        // A code that is not a string is shown as JSON.
        assert!(matches!(
            refused(br#"{"output":{"embedding":[1,2,3]},"code":500}"#, 3),
            GatewayError::Upstream { code, .. } if code == "500"
        ));
        // An empty or null code is no code.
        ok(r#"{"output":{"embedding":[1,2,3]},"code":""}"#, 3);
        ok(r#"{"output":{"embedding":[1,2,3]},"code":null}"#, 3);
        // A code in a body that is not JSON is not believed.
        bad_gateway(br#"{"code":"Throttling","x":}"#, 3);
        bad_gateway(br#"{"code":"Throttling","code":"Throttling"}"#, 3);
    }

    #[test]
    fn a_usage_block_is_read_only_when_whole() {
        let usage = |u: &str| {
            ok(
                &format!(r#"{{"output":{{"embedding":[1]}},"usage":{u}}}"#),
                1,
            )
            .usage
        };
        assert!(usage("null").is_none());
        assert!(usage("{}").is_none());
        assert!(usage(r#"{"total_usage":3}"#).is_none());
        assert!(usage(r#"{"text":{"measure":1}}"#).is_none());
        assert!(usage(r#"{"text":{"measure":1.0,"weight":1}}"#).is_none());
        assert!(
            usage(r#"{"text":{"measure":1,"weight":1},"image":{"measure":-1,"weight":1}}"#)
                .is_none()
        );
        // serde_json's map: the last of a repeated key.
        let u =
            usage(r#"{"text":{"measure":9,"weight":1},"text":{"measure":2,"weight":5}}"#).unwrap();
        assert_eq!(u.items.get(Modality::Text), 2);
        assert_eq!(u.units.get(Modality::Text), 10);
    }

    /// What the parser accepted before this scanner: serde_json into a
    /// `RawValue`, then [`valid_embedding`](crate::cache::valid_embedding).
    fn serde_then_validate(
        body: &[u8],
        dimension: usize,
    ) -> Result<(Vec<u8>, Option<String>), String> {
        #[derive(serde::Deserialize)]
        struct Up<'a> {
            #[serde(borrow)]
            output: Option<UpOutput<'a>>,
            #[allow(dead_code)]
            usage: Option<serde_json::Value>,
            request_id: Option<String>,
            code: Option<serde_json::Value>,
            #[allow(dead_code)]
            message: Option<String>,
        }
        #[derive(serde::Deserialize)]
        struct UpOutput<'a> {
            #[serde(borrow)]
            embedding: Option<&'a serde_json::value::RawValue>,
        }
        let up: Up<'_> = serde_json::from_slice(body).map_err(|_| "json".to_string())?;
        match &up.code {
            Some(serde_json::Value::String(c)) if !c.is_empty() => return Err(format!("code {c}")),
            Some(serde_json::Value::Null | serde_json::Value::String(_)) | None => {}
            Some(other) => return Err(format!("code {other}")),
        }
        let raw = up
            .output
            .and_then(|o| o.embedding)
            .ok_or_else(|| "missing".to_string())?;
        if !crate::cache::valid_embedding(raw.get().as_bytes(), dimension) {
            return Err("invalid".into());
        }
        Ok((raw.get().as_bytes().to_vec(), up.request_id))
    }

    fn this_scanner(body: &[u8], dimension: usize) -> Result<(Vec<u8>, Option<String>), String> {
        match parse_success(Bytes::copy_from_slice(body), dimension) {
            Ok(s) => Ok((s.embedding.to_vec(), Some(s.request_id))),
            Err(GatewayError::Upstream { code, .. }) => Err(format!("code {code}")),
            Err(GatewayError::BadGateway(m)) if m.contains("without") => Err("missing".into()),
            Err(GatewayError::BadGateway(m)) if m.contains("numbers") => Err("invalid".into()),
            Err(_) => Err("json".into()),
        }
    }

    /// Single-byte edits of real-looking answers: the scanner accepts
    /// exactly what serde_json and `valid_embedding` accepted, with the
    /// same vector. (A broken vector may be "not JSON" to one and "not N
    /// numbers" to the other: both are a 502.)
    #[test]
    fn agrees_with_serde_json_on_every_single_byte_edit() {
        let seeds = [
            &br#"{"output":{"embedding":[-0.0207,1.5e-3,2]},"usage":{"text":{"measure":1,"weight":1}},"request_id":"rq"}"#[..],
            br#" { "request_id" : "a\"b" , "output" : { "x" : [ {"y" : null } ] , "embedding" : [ 0 , -1E+2 , 3.25 ] } , "code" : "" } "#,
            br#"{"code":null,"message":"m","output":{"embedding":[1,2,3]},"z":[true,false,"\u00e9\n"]}"#,
        ];
        let alphabet = b" \t\n{}[]:,\"\\-+.0159eEnulxt";
        let mut checked = 0;
        for seed in seeds {
            let mut variants: Vec<Vec<u8>> = vec![seed.to_vec()];
            for i in 0..=seed.len() {
                if i < seed.len() {
                    let mut v = seed.to_vec();
                    v.remove(i);
                    variants.push(v);
                }
                for &c in alphabet {
                    let mut v = seed.to_vec();
                    v.insert(i, c);
                    variants.push(v);
                    if i < seed.len() {
                        let mut v = seed.to_vec();
                        v[i] = c;
                        variants.push(v);
                    }
                }
            }
            for v in variants {
                let old = serde_then_validate(&v, 3);
                let new = this_scanner(&v, 3);
                let agree = match (&old, &new) {
                    // Without upstream's id the gateway makes one.
                    (Ok(a), Ok(b)) => a.0 == b.0 && (a.1.is_none() || a.1 == b.1),
                    (Err(a), Err(b)) => {
                        a == b
                            || (a != "missing"
                                && b != "missing"
                                && !a.starts_with("code")
                                && !b.starts_with("code"))
                    }
                    _ => false,
                };
                assert!(
                    agree,
                    "{}: before {old:?}, now {new:?}",
                    String::from_utf8_lossy(&v)
                );
                checked += 1;
            }
        }
        assert!(checked > 5000);
    }

    #[test]
    fn a_full_size_answer() {
        let v: Vec<f32> = (0..1536).map(|i| ((i as f32) - 700.3) / 3.7e3).collect();
        let body = format!(
            r#"{{"output":{{"embedding":{}}},"usage":{{"text":{{"measure":1,"weight":1}}}},"request_id":"r"}}"#,
            serde_json::to_string(&v).unwrap()
        );
        assert!(body.len() > 10_000);
        let s = ok(&body, 1536);
        assert!(crate::cache::valid_embedding(&s.embedding, 1536));
        bad_gateway(body.as_bytes(), 1535);
        bad_gateway(body.as_bytes(), 1537);
    }

    #[test]
    fn digit_runs() {
        for (text, end) in [
            (&b""[..], 0),
            (b"x", 0),
            (b"0123456789", 10),
            (b"01234567/", 8),
            (b"0123456:", 7),
            (b"1234567890123456789,", 19),
            (b"12\xb0", 2),
            (b"12\x30\x3a", 3),
        ] {
            assert_eq!(
                digits_end(text, 0),
                end,
                "{}",
                String::from_utf8_lossy(text)
            );
        }
        // Every byte value, at every position, next to digits and not.
        for at in 0..8 {
            for byte in 0..=255u8 {
                for filler in [b'0', b'9', b'/', b':', 0xff, 0x00] {
                    let mut bytes = [filler; 8];
                    bytes[at] = byte;
                    let want = bytes.iter().enumerate().fold(0u64, |m, (k, c)| {
                        m | if c.is_ascii_digit() {
                            0
                        } else {
                            0x80 << (8 * k)
                        }
                    });
                    assert_eq!(
                        non_digit_bytes(u64::from_le_bytes(bytes)),
                        want,
                        "{bytes:x?}"
                    );
                }
            }
        }
    }
}
