//! Parses an embedding request body into a type that cannot be invalid.
//!
//! Every refusal names the offending field (`input.contents[2].factor must
//! be > 0`), and a limit's refusal the limit too (`input.contents has 100000
//! items, over the limit of 32`). Parsing works on JSON values, never raw
//! bytes, so the SDKs' different key orders, spacing and escapes give the
//! same request.
//!
//! Bounded: nothing is built from the body before it is known to be within
//! the limits. Nesting depth is checked in one pass over the bytes; then
//! each level is read as borrowed, unparsed slices of the body
//! (`RawValue`), and the members of a list or object past its limit are
//! counted, not kept. What a request keeps is at most its body's size again.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::config::{UpstreamConfig, Weights};
use crate::error::GatewayError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Modality {
    Text,
    Image,
    Audio,
    /// The multimodal family's video items (not ONE-PEACE).
    Video,
}

impl Modality {
    pub(crate) const ALL: [Modality; 4] = [
        Modality::Text,
        Modality::Image,
        Modality::Audio,
        Modality::Video,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Modality::Text => "text",
            Modality::Image => "image",
            Modality::Audio => "audio",
            Modality::Video => "video",
        }
    }

    pub(crate) fn from_name(s: &str) -> Option<Modality> {
        match s {
            "text" => Some(Modality::Text),
            "image" => Some(Modality::Image),
            "audio" => Some(Modality::Audio),
            "video" => Some(Modality::Video),
            _ => None,
        }
    }

    pub(crate) fn weight(self, w: &Weights) -> u64 {
        match self {
            Modality::Text => w.text,
            Modality::Image => w.image,
            Modality::Audio => w.audio,
            // ONE-PEACE has no video items; token-billed models do not
            // use weights.
            Modality::Video => 1,
        }
    }

    fn index(self) -> usize {
        match self {
            Modality::Text => 0,
            Modality::Image => 1,
            Modality::Audio => 2,
            Modality::Video => 3,
        }
    }
}

/// One content item: exactly one modality, its content, its weight factor.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Item {
    pub(crate) modality: Modality,
    pub(crate) content: String,
    /// Normalised: `1`, `1.0` and `"1"` are all `1.0`; finite and > 0.
    pub(crate) factor: f64,
}

/// Items per modality.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts([u64; 4]);

impl Counts {
    pub(crate) fn get(&self, m: Modality) -> u64 {
        self.0[m.index()]
    }

    pub(crate) fn set(&mut self, m: Modality, n: u64) {
        self.0[m.index()] = n;
    }

    pub(crate) fn add(&mut self, m: Modality, n: u64) {
        self.0[m.index()] += n;
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.iter().all(|&n| n == 0)
    }

    /// The sum over modalities (for a per-modality units vector: total units).
    pub(crate) fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// A parsed `multimodal-embedding` request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EmbeddingRequest {
    pub(crate) model: String,
    pub(crate) items: Vec<Item>,
    /// All of `parameters` as sent (the SDK copies extra keywords here),
    /// `auto_truncation` included.
    pub(crate) parameters: Map<String, Value>,
    pub(crate) auto_truncation: bool,
    /// Top-level fields other than model/input/parameters; forwarded, so
    /// they are part of the cache key.
    pub(crate) extra: Map<String, Value>,
    /// Fields of `input` other than `contents`; forwarded and keyed likewise.
    pub(crate) input_extra: Map<String, Value>,
}

/// A request ONE-PEACE accepts nests 4 deep (body, input, contents, item);
/// `parameters` and forwarded extras may nest a little more. serde_json's
/// own recursion limit is 128 and its error names no field.
const MAX_JSON_DEPTH: usize = 32;
/// Fields in one object (the body, `input`, an item): the protocol has 3,
/// 1 and 2; the rest is room for fields forwarded as they are, without
/// letting an object of a hundred thousand keys through.
const MAX_FIELDS: usize = 16;
/// DashScope's model names are under 50 bytes; the name is echoed in the
/// refusal of a model not served, which must stay small.
const MAX_MODEL_BYTES: usize = 128;
/// `parameters` and each forwarded extra field, as JSON text: a few scalars
/// (`auto_truncation`, `dimension`, SDK keywords) fit many times over.
const MAX_FIELD_JSON_BYTES: usize = 4096;
/// A client's string echoed in a refusal (an unknown key, a bad factor) is
/// cut to this many characters, so a refusal is never large.
const MAX_ECHO_CHARS: usize = 64;

/// What the parser needs from config: the models served and the limits.
#[derive(Debug, Clone)]
pub(crate) struct ParseRules<'a> {
    pub(crate) models: &'a [String],
    pub(crate) max_items: usize,
    pub(crate) max_text_chars: usize,
    pub(crate) max_text_bytes: usize,
    pub(crate) max_url_bytes: usize,
}

impl<'a> ParseRules<'a> {
    pub(crate) fn of(upstream: &'a UpstreamConfig) -> ParseRules<'a> {
        ParseRules {
            models: &upstream.models,
            max_items: upstream.max_items,
            max_text_chars: upstream.max_text_chars,
            max_text_bytes: upstream.max_text_bytes,
            max_url_bytes: upstream.max_url_bytes,
        }
    }

    /// `models` with the default limits, for other modules' tests.
    #[cfg(test)]
    pub(crate) fn for_tests(models: &'a [String]) -> ParseRules<'a> {
        ParseRules {
            models,
            max_items: 32,
            max_text_chars: 70,
            max_text_bytes: 16 * 1024,
            max_url_bytes: 8 * 1024,
        }
    }
}

fn bad(msg: impl Into<String>) -> GatewayError {
    GatewayError::InvalidParameter(msg.into())
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The JSON type of a value not parsed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Null,
    Boolean,
    Number,
    String,
    List,
    Object,
}

impl Kind {
    /// From the first byte: a `RawValue` that parsed starts at its value.
    fn of(v: &RawValue) -> Kind {
        match v.get().as_bytes().first() {
            Some(b'{') => Kind::Object,
            Some(b'[') => Kind::List,
            Some(b'"') => Kind::String,
            Some(b't' | b'f') => Kind::Boolean,
            Some(b'n') => Kind::Null,
            _ => Kind::Number,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Boolean => "a boolean",
            Kind::Number => "a number",
            Kind::String => "a string",
            Kind::List => "a list",
            Kind::Object => "an object",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A client's string as a refusal echoes it: at most [`MAX_ECHO_CHARS`].
fn shown(s: &str) -> Cow<'_, str> {
    match s.char_indices().nth(MAX_ECHO_CHARS) {
        None => Cow::Borrowed(s),
        Some((cut, _)) => Cow::Owned(format!("{}…", &s[..cut])),
    }
}

/// Refuses a body nested deeper than [`MAX_JSON_DEPTH`], in one pass over
/// its bytes before any parsing. Only brackets outside strings count; what
/// is not JSON at all is left to the parser to name.
pub(crate) fn check_depth(body: &[u8]) -> Result<(), GatewayError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (at, &b) in body.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(bad(format!(
                        "request body nests deeper than the limit of {MAX_JSON_DEPTH} levels (at byte {at})"
                    )));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// An object's fields in order, borrowed from the body, each value still
/// unparsed: the first `cap` distinct keys are kept (a repeated key's last
/// value wins, as in a parsed object), the rest only counted.
struct Fields<'a> {
    kept: Vec<(Cow<'a, str>, &'a RawValue)>,
    count: usize,
}

/// A list's elements, borrowed and unparsed: the first `cap` kept, all counted.
struct Elements<'a> {
    kept: Vec<&'a RawValue>,
    count: usize,
}

/// An object key, borrowed from the body unless it has escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key<'de>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

struct FieldsVisitor(usize);

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
        let mut kept: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::new();
        let mut count = 0;
        while let Some(Key(key)) = map.next_key()? {
            count += 1;
            if let Some(slot) = kept.iter_mut().find(|(k, _)| *k == key) {
                slot.1 = map.next_value()?;
            } else if kept.len() < self.0 {
                kept.push((key, map.next_value()?));
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Fields { kept, count })
    }
}

struct ElementsVisitor(usize);

impl<'de> Visitor<'de> for ElementsVisitor {
    type Value = Elements<'de>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Elements<'de>, A::Error> {
        let mut kept = Vec::new();
        while kept.len() < self.0 {
            match seq.next_element()? {
                Some(v) => kept.push(v),
                None => {
                    let count = kept.len();
                    return Ok(Elements { kept, count });
                }
            }
        }
        let mut count = kept.len();
        while seq.next_element::<IgnoredAny>()?.is_some() {
            count += 1;
        }
        Ok(Elements { kept, count })
    }
}

/// Cannot fail on a value that parsed as JSON already, but is not trusted to.
fn not_json(e: serde_json::Error) -> GatewayError {
    bad(format!("request body is not valid JSON: {e}"))
}

/// The fields of `v`, an object that `at` names.
fn fields<'a>(
    v: &'a RawValue,
    at: &dyn fmt::Display,
) -> Result<Vec<(Cow<'a, str>, &'a RawValue)>, GatewayError> {
    let mut de = serde_json::Deserializer::from_str(v.get());
    let f = de
        .deserialize_map(FieldsVisitor(MAX_FIELDS))
        .map_err(not_json)?;
    if f.count > MAX_FIELDS {
        return Err(bad(format!(
            "{at} has {} fields, over the limit of {MAX_FIELDS}",
            f.count
        )));
    }
    Ok(f.kept)
}

/// `v` unless absent or null; refused unless of the kind `want`.
fn optional<'a>(
    v: Option<&'a RawValue>,
    at: &str,
    want: Kind,
) -> Result<Option<&'a RawValue>, GatewayError> {
    let Some(v) = v else { return Ok(None) };
    match Kind::of(v) {
        Kind::Null => Ok(None),
        k if k == want => Ok(Some(v)),
        k => Err(bad(format!("{at} must be {want}, got {k}"))),
    }
}

/// `v`, which must be present, not null, and of the kind `want`.
fn required<'a>(
    v: Option<&'a RawValue>,
    at: &str,
    want: Kind,
) -> Result<&'a RawValue, GatewayError> {
    optional(v, at, want)?.ok_or_else(|| bad(format!("{at} is required")))
}

/// A string value, decoded.
fn string(v: &RawValue) -> Result<String, GatewayError> {
    serde_json::from_str(v.get()).map_err(not_json)
}

/// A field forwarded as sent (`parameters`, extras), bounded as JSON text.
fn forwarded(v: &RawValue, at: &str) -> Result<Value, GatewayError> {
    let n = v.get().len();
    if n > MAX_FIELD_JSON_BYTES {
        return Err(bad(format!(
            "{at} is {n} bytes of JSON, over the limit of {MAX_FIELD_JSON_BYTES}"
        )));
    }
    serde_json::from_str(v.get()).map_err(not_json)
}

impl EmbeddingRequest {
    /// Parses `body` within `rules`' limits. Nothing is built from the body
    /// before its size is known to be within them: the depth is checked
    /// over the bytes, then each level is read as borrowed slices of the
    /// body, whose members past a limit are counted, never kept.
    pub(crate) fn parse(
        body: &[u8],
        rules: &ParseRules<'_>,
    ) -> Result<EmbeddingRequest, GatewayError> {
        check_depth(body)?;
        let root: &RawValue = serde_json::from_slice(body).map_err(not_json)?;
        if Kind::of(root) != Kind::Object {
            return Err(bad(format!(
                "request body must be a JSON object, got {}",
                Kind::of(root)
            )));
        }
        let (mut model, mut input, mut parameters) = (None, None, None);
        let mut extra_raw = Vec::new();
        for (key, v) in fields(root, &"request body")? {
            match &*key {
                "model" => model = Some(v),
                "input" => input = Some(v),
                "parameters" => parameters = Some(v),
                _ => extra_raw.push((key, v)),
            }
        }

        let model = string(required(model, "model", Kind::String)?)?;
        if model.is_empty() {
            return Err(bad("model must not be empty"));
        }
        if model.len() > MAX_MODEL_BYTES {
            return Err(bad(format!(
                "model is {} bytes, over the limit of {MAX_MODEL_BYTES}",
                model.len()
            )));
        }
        if !rules.models.contains(&model) {
            return Err(GatewayError::ModelNotFound(model));
        }

        let input = required(input, "input", Kind::Object)?;
        let mut contents = None;
        let mut input_extra_raw = Vec::new();
        for (key, v) in fields(input, &"input")? {
            if key == "contents" {
                contents = Some(v);
            } else {
                input_extra_raw.push((key, v));
            }
        }
        let contents = required(contents, "input.contents", Kind::List)?;
        let mut de = serde_json::Deserializer::from_str(contents.get());
        let contents = de
            .deserialize_seq(ElementsVisitor(rules.max_items))
            .map_err(not_json)?;
        if contents.count == 0 {
            return Err(bad("input.contents must not be empty"));
        }
        if contents.count > rules.max_items {
            return Err(bad(format!(
                "input.contents has {} items, over the limit of {}",
                contents.count, rules.max_items
            )));
        }

        let parameters = match optional(parameters, "parameters", Kind::Object)? {
            None => Map::new(),
            Some(v) => match forwarded(v, "parameters")? {
                Value::Object(p) => p,
                other => {
                    return Err(bad(format!(
                        "parameters must be an object, got {}",
                        type_name(&other)
                    )))
                }
            },
        };
        let auto_truncation = match parameters.get("auto_truncation") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(bad(format!(
                    "parameters.auto_truncation must be a boolean, got {}",
                    type_name(other)
                )))
            }
        };

        let mut extra = Map::new();
        for (key, v) in extra_raw {
            let value = forwarded(v, &shown(&key))?;
            extra.insert(key.into_owned(), value);
        }
        let mut input_extra = Map::new();
        for (key, v) in input_extra_raw {
            let value = forwarded(v, &format!("input.{}", shown(&key)))?;
            input_extra.insert(key.into_owned(), value);
        }

        let mut items = Vec::with_capacity(contents.kept.len());
        for (i, raw) in contents.kept.into_iter().enumerate() {
            items.push(parse_item(i, raw, auto_truncation, rules)?);
        }

        Ok(EmbeddingRequest {
            model,
            items,
            parameters,
            auto_truncation,
            extra,
            input_extra,
        })
    }

    pub(crate) fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for item in &self.items {
            c.add(item.modality, 1);
        }
        c
    }

    /// The vector length a valid answer has: `parameters.dimension` when the
    /// caller asked for one, else the configured default.
    pub(crate) fn expected_dimension(&self, default: usize) -> usize {
        self.parameters
            .get("dimension")
            .and_then(Value::as_u64)
            .filter(|&d| d > 0 && d <= 65_536)
            .map(|d| d as usize)
            .unwrap_or(default)
    }

    /// The body sent upstream: the parsed request written back, with each
    /// factor as the number it was normalised to, so upstream sees exactly
    /// what the cache key describes. Written straight from the request, with
    /// no copy of its contents in between.
    pub(crate) fn upstream_body(&self) -> Result<Bytes, GatewayError> {
        serde_json::to_vec(&Wire(self))
            .map(Bytes::from)
            .map_err(|e| GatewayError::Internal(format!("cannot write the upstream body: {e}")))
    }
}

/// [`EmbeddingRequest::upstream_body`]'s JSON: `model`, `input` (its
/// `contents`, then its other fields), `parameters`, then the other fields.
struct Wire<'a>(&'a EmbeddingRequest);
struct WireInput<'a>(&'a EmbeddingRequest);
struct WireContents<'a>(&'a [Item]);
struct WireItem<'a>(&'a Item);

impl Serialize for Wire<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.0;
        let mut m = s.serialize_map(Some(3 + r.extra.len()))?;
        m.serialize_entry("model", &r.model)?;
        m.serialize_entry("input", &WireInput(r))?;
        m.serialize_entry("parameters", &r.parameters)?;
        for (k, v) in &r.extra {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl Serialize for WireInput<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.0;
        let mut m = s.serialize_map(Some(1 + r.input_extra.len()))?;
        m.serialize_entry("contents", &WireContents(&r.items))?;
        for (k, v) in &r.input_extra {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl Serialize for WireContents<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(WireItem))
    }
}

impl Serialize for WireItem<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let it = self.0;
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry(it.modality.as_str(), &it.content)?;
        m.serialize_entry("factor", &factor_value(it.factor))?;
        m.end()
    }
}

/// Integral factors go out as integers (`2`, not `2.0`), as the SDK sends them.
fn factor_value(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        Value::from(f as i64)
    } else {
        serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::from(1))
    }
}

/// `input.contents[i]`, or its `.text`/`.image`/`.audio`, as a refusal
/// names it.
struct ItemAt(usize, Option<Modality>);

impl fmt::Display for ItemAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "input.contents[{}]", self.0)?;
        match self.1 {
            Some(m) => write!(f, ".{}", m.as_str()),
            None => Ok(()),
        }
    }
}

fn parse_item(
    i: usize,
    raw: &RawValue,
    auto_truncation: bool,
    rules: &ParseRules<'_>,
) -> Result<Item, GatewayError> {
    // Named in refusals only: not formatted unless one is made.
    let at = ItemAt(i, None);
    if Kind::of(raw) != Kind::Object {
        return Err(bad(format!(
            "{at} must be an object with one of text, image, audio; got {}",
            Kind::of(raw)
        )));
    }
    let mut found: Option<(Modality, String)> = None;
    let mut factor = 1.0;
    for (key, value) in fields(raw, &at)? {
        if key == "factor" {
            factor = parse_factor(&at, value)?;
            continue;
        }
        // ONE-PEACE has no video items.
        let Some(modality) = Modality::from_name(&key).filter(|m| *m != Modality::Video) else {
            return Err(bad(format!(
                "{at}.{} is not supported; an item has one of text, image, audio and an optional factor",
                shown(&key)
            )));
        };
        if let Some((first, _)) = &found {
            return Err(bad(format!(
                "{at} must have exactly one of text, image, audio; found {} and {key}",
                first.as_str()
            )));
        }
        if Kind::of(value) != Kind::String {
            return Err(bad(format!(
                "{at}.{key} must be a string, got {}",
                Kind::of(value)
            )));
        }
        let content = string(value)?;
        if content.is_empty() {
            return Err(bad(format!("{at}.{key} must not be empty")));
        }
        found = Some((modality, content));
    }
    let Some((modality, content)) = found else {
        return Err(bad(format!("{at} must have one of text, image, audio")));
    };
    let at = ItemAt(i, Some(modality));
    match modality {
        Modality::Text => {
            if !auto_truncation {
                let n = content.chars().count();
                if n > rules.max_text_chars {
                    return Err(bad(format!(
                        "{at} is {n} characters, over the limit of {}; shorten it or set parameters.auto_truncation to true",
                        rules.max_text_chars
                    )));
                }
            }
            if content.len() > rules.max_text_bytes {
                return Err(bad(format!(
                    "{at} is {} bytes, over the limit of {} (also with parameters.auto_truncation)",
                    content.len(),
                    rules.max_text_bytes
                )));
            }
        }
        Modality::Image | Modality::Audio | Modality::Video => {
            if content.len() > rules.max_url_bytes {
                return Err(bad(format!(
                    "{at} is {} bytes, over the limit of {} for a URL",
                    content.len(),
                    rules.max_url_bytes
                )));
            }
        }
    }
    Ok(Item {
        modality,
        content,
        factor,
    })
}

fn parse_factor(at: &ItemAt, v: &RawValue) -> Result<f64, GatewayError> {
    let f = match Kind::of(v) {
        Kind::Null => return Ok(1.0),
        // Out of f64's range is the one way a JSON number fails to parse.
        Kind::Number => serde_json::from_str::<f64>(v.get())
            .map_err(|_| bad(format!("{at}.factor must be a finite number")))?,
        Kind::String => {
            let s = string(v)?;
            s.trim().parse::<f64>().map_err(|_| {
                bad(format!(
                    "{at}.factor must be a number or numeric string, got \"{}\"",
                    shown(&s)
                ))
            })?
        }
        other @ (Kind::Boolean | Kind::List | Kind::Object) => {
            return Err(bad(format!(
                "{at}.factor must be a number or numeric string, got {other}"
            )))
        }
    };
    if !f.is_finite() {
        return Err(bad(format!("{at}.factor must be a finite number")));
    }
    if f <= 0.0 {
        return Err(bad(format!("{at}.factor must be > 0")));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models() -> Vec<String> {
        vec!["multimodal-embedding-one-peace-v1".to_string()]
    }

    fn parse(body: &str) -> Result<EmbeddingRequest, GatewayError> {
        EmbeddingRequest::parse(body.as_bytes(), &ParseRules::for_tests(&models()))
    }

    fn message(body: &str) -> String {
        match parse(body) {
            Err(GatewayError::InvalidParameter(m)) => m,
            other => panic!("expected InvalidParameter, got {other:?}"),
        }
    }

    const M: &str = "\"model\":\"multimodal-embedding-one-peace-v1\"";

    #[test]
    fn parses_the_spec_example() {
        let r = parse(&format!(
            "{{{M},\"input\":{{\"contents\":[{{\"text\":\"你好\",\"factor\":1}},{{\"audio\":\"https://x/cow.flac\",\"factor\":2}},{{\"image\":\"https://x/1.png\",\"factor\":\"3\"}}]}},\"parameters\":{{\"auto_truncation\":true}}}}"
        ))
        .unwrap();
        assert_eq!(r.items.len(), 3);
        assert_eq!(r.items[2].factor, 3.0);
        assert!(r.auto_truncation);
        let w = Weights {
            text: 1,
            image: 1,
            audio: 2,
        };
        let usage = crate::metering::Usage::of(r.counts(), &w);
        assert_eq!(usage.total(), 4);
        let usage: Value = serde_json::from_str(&usage.json()).unwrap();
        assert_eq!(usage["audio"]["weight"], 2);
        assert_eq!(usage["total_usage"], 4);
    }

    #[test]
    fn every_refusal_names_its_field() {
        let cases = [
            ("[]", "request body must be a JSON object"),
            ("{", "request body is not valid JSON"),
            ("{\"input\":{\"contents\":[{\"text\":\"a\"}]}}", "model is required"),
            (&format!("{{{M}}}"), "input is required"),
            (&format!("{{{M},\"input\":[]}}"), "input must be an object"),
            (&format!("{{{M},\"input\":{{}}}}"), "input.contents is required"),
            (&format!("{{{M},\"input\":{{\"contents\":[]}}}}"), "input.contents must not be empty"),
            (&format!("{{{M},\"input\":{{\"contents\":{{}}}}}}"), "input.contents must be a list"),
            (&format!("{{{M},\"input\":{{\"contents\":[1]}}}}"), "input.contents[0] must be an object"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"factor\":1}}]}}}}"), "input.contents[0] must have one of text, image, audio"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"text\":\"a\",\"image\":\"b\"}}]}}}}"), "input.contents[0] must have exactly one of text, image, audio"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"video\":\"a\"}}]}}}}"), "input.contents[0].video is not supported"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"text\":5}}]}}}}"), "input.contents[0].text must be a string"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"text\":\"\"}}]}}}}"), "input.contents[0].text must not be empty"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"text\":\"a\"}},{{\"text\":\"b\"}},{{\"image\":\"c\",\"factor\":0}}]}}}}"), "input.contents[2].factor must be > 0"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"image\":\"c\",\"factor\":-1}}]}}}}"), "input.contents[0].factor must be > 0"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"image\":\"c\",\"factor\":\"abc\"}}]}}}}"), "input.contents[0].factor must be a number or numeric string"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"image\":\"c\",\"factor\":\"NaN\"}}]}}}}"), "input.contents[0].factor must be a finite number"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"image\":\"c\",\"factor\":\"inf\"}}]}}}}"), "input.contents[0].factor must be a finite number"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"image\":\"c\",\"factor\":true}}]}}}}"), "input.contents[0].factor must be a number or numeric string"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"image\":\"c\"}}]}},\"parameters\":[]}}"), "parameters must be an object"),
            (&format!("{{{M},\"input\":{{\"contents\":[{{\"image\":\"c\"}}]}},\"parameters\":{{\"auto_truncation\":\"yes\"}}}}"), "parameters.auto_truncation must be a boolean"),
            ("{\"model\":5,\"input\":{}}", "model must be a string"),
        ];
        for (body, want) in cases {
            let got = message(body);
            assert!(got.starts_with(want), "{body}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn unknown_model_is_refused() {
        let r = parse("{\"model\":\"gpt-4\",\"input\":{\"contents\":[{\"text\":\"a\"}]}}");
        assert!(matches!(r, Err(GatewayError::ModelNotFound(m)) if m == "gpt-4"));
    }

    #[test]
    fn text_limit_applies_only_without_truncation() {
        let long = "字".repeat(71);
        let ok = "字".repeat(70);
        let body = |t: &str, trunc: bool| {
            format!("{{{M},\"input\":{{\"contents\":[{{\"text\":\"{t}\"}}]}},\"parameters\":{{\"auto_truncation\":{trunc}}}}}")
        };
        assert!(parse(&body(&ok, false)).is_ok());
        assert!(message(&body(&long, false)).contains("input.contents[0].text is 71 characters"));
        assert!(parse(&body(&long, true)).is_ok());
    }

    #[test]
    fn factors_normalise() {
        for f in ["1", "1.0", "\"1\"", "\" 1.0 \"", "null"] {
            let r = parse(&format!(
                "{{{M},\"input\":{{\"contents\":[{{\"text\":\"a\",\"factor\":{f}}}]}}}}"
            ))
            .unwrap();
            assert_eq!(r.items[0].factor, 1.0, "{f}");
        }
    }

    #[test]
    fn upstream_body_carries_everything_parsed() {
        let r = parse(&format!(
            "{{{M},\"input\":{{\"contents\":[{{\"factor\":\"2\",\"image\":\"u\"}},{{\"text\":\"t\",\"factor\":0.5}}],\"extra_in\":1}},\"parameters\":{{\"dimension\":512,\"auto_truncation\":true}},\"resources\":[\"r\"]}}"
        ))
        .unwrap();
        let v: Value = serde_json::from_slice(&r.upstream_body().unwrap()).unwrap();
        assert_eq!(v["input"]["contents"][0]["factor"], 2);
        assert_eq!(v["input"]["contents"][0]["image"], "u");
        assert_eq!(v["input"]["contents"][1]["factor"], 0.5);
        assert_eq!(v["input"]["extra_in"], 1);
        assert_eq!(v["parameters"]["auto_truncation"], true);
        assert_eq!(v["parameters"]["dimension"], 512);
        assert_eq!(v["resources"][0], "r");
        assert_eq!(r.expected_dimension(1536), 512);
    }

    /// A body with `items` (JSON text of each item) and `rest` after `input`.
    fn with_items(items: &[String], rest: &str) -> String {
        format!(
            "{{{M},\"input\":{{\"contents\":[{}]}}{rest}}}",
            items.join(",")
        )
    }

    #[test]
    fn item_count_is_limited_and_counted_exactly() {
        let item = "{\"text\":\"a\"}".to_string();
        assert_eq!(
            parse(&with_items(&vec![item.clone(); 32], ""))
                .unwrap()
                .items
                .len(),
            32
        );
        assert_eq!(
            message(&with_items(&vec![item.clone(); 33], "")),
            "input.contents has 33 items, over the limit of 32"
        );
        // Counted to the end, however many; items past the limit are not
        // looked at, so a bad one there does not change the message.
        let mut many = vec![item; 100_000];
        many[50_000] = "{\"video\":1}".to_string();
        assert_eq!(
            message(&with_items(&many, "")),
            "input.contents has 100000 items, over the limit of 32"
        );
    }

    #[test]
    fn nesting_depth_is_checked_before_parsing() {
        let nested = |depth: usize| {
            // body (1), parameters (2), then `depth - 2` lists.
            let lists = depth - 2;
            format!(
                "{{{M},\"input\":{{\"contents\":[{{\"text\":\"a\"}}]}},\"parameters\":{{\"x\":{}1{}}}}}",
                "[".repeat(lists),
                "]".repeat(lists)
            )
        };
        assert!(parse(&nested(32)).is_ok());
        let m = message(&nested(33));
        assert!(
            m.starts_with("request body nests deeper than the limit of 32 levels (at byte "),
            "{m}"
        );
        // Deeper than serde_json's own limit (128): still this message.
        let m = message(&format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)));
        assert!(
            m.starts_with("request body nests deeper than the limit of 32"),
            "{m}"
        );
        // Brackets inside strings, escaped quotes included, are text.
        let text = format!("{}\\\"{}", "[".repeat(40), "{".repeat(20));
        let r = parse(&with_items(
            &[format!("{{\"text\":\"{text}\"}}")],
            ",\"parameters\":{\"auto_truncation\":true}",
        ))
        .unwrap();
        assert_eq!(
            r.items[0].content,
            format!("{}\"{}", "[".repeat(40), "{".repeat(20))
        );
    }

    #[test]
    fn strings_are_bounded_per_modality() {
        let text = |n: usize, trunc: bool| {
            with_items(
                &[format!("{{\"text\":\"{}\"}}", "x".repeat(n))],
                &format!(",\"parameters\":{{\"auto_truncation\":{trunc}}}"),
            )
        };
        assert!(parse(&text(16 * 1024, true)).is_ok());
        assert_eq!(
            message(&text(16 * 1024 + 1, true)),
            "input.contents[0].text is 16385 bytes, over the limit of 16384 (also with parameters.auto_truncation)"
        );
        // Without truncation the character limit speaks first.
        assert!(message(&text(16 * 1024 + 1, false))
            .starts_with("input.contents[0].text is 16385 characters, over the limit of 70"));
        for modality in ["image", "audio"] {
            let url = |n: usize| {
                with_items(
                    &[
                        "{\"text\":\"a\"}".to_string(),
                        format!("{{\"{modality}\":\"https://x/{}\"}}", "u".repeat(n - 10)),
                    ],
                    "",
                )
            };
            assert!(parse(&url(8192)).is_ok());
            assert_eq!(
                message(&url(8193)),
                format!(
                    "input.contents[1].{modality} is 8193 bytes, over the limit of 8192 for a URL"
                )
            );
        }
    }

    #[test]
    fn model_parameters_and_extra_fields_are_bounded() {
        let item = ["{\"text\":\"a\"}".to_string()];
        let long_model = "m".repeat(129);
        assert_eq!(
            message(&format!(
                "{{\"model\":\"{long_model}\",\"input\":{{\"contents\":[{}]}}}}",
                item[0]
            )),
            "model is 129 bytes, over the limit of 128"
        );
        let big = format!("\"{}\"", "p".repeat(4096));
        assert_eq!(
            message(&with_items(
                &item,
                &format!(",\"parameters\":{{\"p\":{big}}}")
            )),
            "parameters is 4104 bytes of JSON, over the limit of 4096"
        );
        assert_eq!(
            message(&with_items(&item, &format!(",\"resources\":{big}"))),
            "resources is 4098 bytes of JSON, over the limit of 4096"
        );
        let m = message(&format!(
            "{{{M},\"input\":{{\"contents\":[{}],\"hint\":{big}}}}}",
            item[0]
        ));
        assert_eq!(
            m,
            "input.hint is 4098 bytes of JSON, over the limit of 4096"
        );
        let small = format!("\"{}\"", "p".repeat(4094));
        assert!(parse(&with_items(&item, &format!(",\"resources\":{small}"))).is_ok());
    }

    #[test]
    fn objects_have_a_bounded_number_of_fields() {
        let item = "{\"text\":\"a\"}".to_string();
        let extras: String = (0..14).map(|i| format!(",\"x{i}\":0")).collect();
        // model, input and 14 extras: 16 fields.
        assert!(parse(&with_items(std::slice::from_ref(&item), &extras)).is_ok());
        assert_eq!(
            message(&with_items(
                std::slice::from_ref(&item),
                &format!("{extras},\"y\":0")
            )),
            "request body has 17 fields, over the limit of 16"
        );
        let wide: String = (0..100_000).map(|i| format!(",\"f{i}\":1")).collect();
        assert_eq!(
            message(&with_items(&[format!("{{\"text\":\"a\"{wide}}}")], "")),
            "input.contents[0] has 100001 fields, over the limit of 16"
        );
        assert_eq!(
            message(&format!(
                "{{{M},\"input\":{{\"contents\":[{item}]{wide}}}}}"
            )),
            "input has 100001 fields, over the limit of 16"
        );
    }

    #[test]
    fn repeated_keys_keep_the_last_value_and_escaped_keys_are_decoded() {
        let r = parse(&format!(
            "{{\"model\":\"other\",{M},\"input\":{{\"contents\":[{{\"text\":\"a\",\"text\":\"b\"}}]}}}}"
        ))
        .unwrap();
        assert_eq!(r.items[0].content, "b");
        let r = parse(&with_items(&["{\"te\\u0078t\":\"a\"}".to_string()], "")).unwrap();
        assert_eq!(r.items[0].modality, Modality::Text);
    }

    #[test]
    fn echoed_client_strings_are_cut_short() {
        let key = "k".repeat(100_000);
        let m = message(&with_items(&[format!("{{\"{key}\":\"a\"}}")], ""));
        assert!(m.starts_with("input.contents[0].kkkk"), "{m}");
        assert!(m.len() < 300, "{} bytes", m.len());
        let m = message(&with_items(
            &[format!("{{\"image\":\"u\",\"factor\":\"{key}\"}}")],
            "",
        ));
        assert!(m.len() < 300, "{} bytes", m.len());
        let m = message(&with_items(
            &["{\"image\":\"u\",\"factor\":1e400}".to_string()],
            "",
        ));
        assert_eq!(m, "input.contents[0].factor must be a finite number");
    }

    /// Found by the `request` fuzz target: serde_json's default float
    /// parsing is not correctly rounded, so `1e56` was read as
    /// `9.999999999999999e55`, forwarded so, and keyed apart from the same
    /// number written out in full.
    #[test]
    fn numbers_are_forwarded_as_sent() {
        let body = |x: &str| {
            format!(
                "{{{M},\"input\":{{\"contents\":[{{\"text\":\"a\",\"factor\":{x}}}],\"x\":{x}}},\"parameters\":{{\"x\":{x}}}}}"
            )
        };
        for x in [
            "1e56",
            "0.3",
            "2.2250738585072014e-308",
            "5e-324",
            "1.7976931348623157e308",
        ] {
            let r = parse(&body(x)).unwrap();
            let want: f64 = x.parse().unwrap();
            assert_eq!(r.items[0].factor, want, "{x}");
            assert_eq!(r.parameters["x"].as_f64(), Some(want), "{x}");
            assert_eq!(r.input_extra["x"].as_f64(), Some(want), "{x}");
            let again = parse(std::str::from_utf8(&r.upstream_body().unwrap()).unwrap()).unwrap();
            assert_eq!(again, r, "{x}");
        }
        let full = format!("1{}", "0".repeat(56));
        assert_eq!(parse(&body(&full)).unwrap(), parse(&body("1e56")).unwrap());
    }
}
