//! The quick reader: a well-formed family request read in one pass,
//! without a JSON tree. The top level and `input` are read member by
//! member down to the items; a text without escapes is kept as the
//! request's own bytes (its canonical JSON already); only the small parts
//! (`parameters`, unknown members, a content object) are parsed into
//! [`Value`]s.
//!
//! It answers only what it is sure of: `None` for anything else (an error,
//! a key with escapes, a bare string for `texts`, deep nesting), and the
//! full reader then reads the request and names what is wrong. What it
//! accepts, the full reader reads the same (see the tests).

use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::{
    compatible_request, content_item, list_key, native_api_ok, native_request, text_ok, Api,
    FamilyItem, FamilyRequest,
};
use crate::config::{ModelSpec, ModelTable};
use crate::request::Modality;

/// How deep a part parsed into a tree may nest, counted from the part: with
/// the at most four levels above it (body, input, list, item), far inside
/// what the full reader allows. Deeper is left to the full reader.
const MAX_PART_DEPTH: usize = 8;

pub(super) fn native(body: &Bytes, api: Api, table: &ModelTable) -> Option<FamilyRequest> {
    let top: Top<'_> = Top::read(body, api)?;
    let mut extra = Map::new();
    for (k, v) in top.other {
        extra.insert(k.to_owned(), tree(v)?);
    }
    let spec = model_of(top.model?, table)?;
    native_api_ok(&spec, api).ok()?;
    let input = top.input?;
    let parameters = match top.parameters.map(tree) {
        None => Map::new(),
        Some(Some(Value::Object(o))) => o,
        Some(Some(Value::Null)) => Map::new(),
        Some(_) => return None,
    };
    let mut input_extra = Map::new();
    for (k, v) in input.other {
        input_extra.insert(k.to_owned(), tree(v)?);
    }
    let items = match input.list? {
        List::Texts(texts) if api == Api::Text => items_of(body, texts, &spec)?,
        List::Contents(list) if api != Api::Text => {
            count_ok(list.len(), &spec)?;
            list.into_iter()
                .map(|v| content_item(tree(v)?, "", &spec).ok())
                .collect::<Option<Vec<_>>>()?
        }
        List::Texts(_) | List::Contents(_) => return None,
    };
    native_request(api, spec, items, parameters, extra, input_extra).ok()
}

pub(super) fn compatible(body: &Bytes, table: &ModelTable) -> Option<FamilyRequest> {
    let top: Top<'_> = Top::read(body, Api::Compatible)?;
    let mut m = Map::new();
    for (k, v) in top.other {
        m.insert(k.to_owned(), tree(v)?);
    }
    let spec = model_of(top.model?, table)?;
    if !spec.compatible_mode {
        return None;
    }
    let items = match top.input?.list? {
        List::Texts(texts) => items_of(body, texts, &spec)?,
        List::Contents(_) => return None,
    };
    let base64 = match top.encoding_format {
        None => false,
        Some(f) => match serde_json::from_str::<Option<&str>>(f.get()).ok()? {
            None | Some("float") => false,
            Some("base64") => true,
            Some(_) => return None,
        },
    };
    compatible_request(spec, items, m, base64).ok()
}

/// A request's top level, read in one pass: the members the API knows,
/// `input` read down to its items, the rest unparsed. A repeated member:
/// the last one counts, as in a parsed tree.
#[derive(Default)]
struct Top<'a> {
    model: Option<&'a RawValue>,
    input: Option<Input<'a>>,
    /// Native only.
    parameters: Option<&'a RawValue>,
    /// Compatible mode only.
    encoding_format: Option<&'a RawValue>,
    other: Vec<(&'a str, &'a RawValue)>,
}

/// `input`: native, an object with the list of items; compatible, the
/// list of texts itself (or one text).
#[derive(Default)]
struct Input<'a> {
    list: Option<List<'a>>,
    /// Native only: `input`'s other members.
    other: Vec<(&'a str, &'a RawValue)>,
}

enum List<'a> {
    Texts(Vec<Text<'a>>),
    Contents(Vec<&'a RawValue>),
}

impl<'a> Top<'a> {
    fn read(body: &'a [u8], api: Api) -> Option<Top<'a>> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let top = serde::de::DeserializeSeed::deserialize(Seed(api), &mut de).ok()?;
        de.end().ok()?;
        Some(top)
    }
}

/// Reads [`Top`] for `api`.
struct Seed(Api);

impl<'de> serde::de::DeserializeSeed<'de> for Seed {
    type Value = Top<'de>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Top<'de>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Seed {
    type Value = Top<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a request object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Top<'de>, A::Error> {
        let api = self.0;
        let mut top = Top::default();
        while let Some(k) = m.next_key::<&'de str>()? {
            match (k, api) {
                ("model", _) => top.model = Some(m.next_value()?),
                ("input", Api::Compatible) => {
                    top.input = Some(Input {
                        list: Some(m.next_value_seed(ListSeed(api))?),
                        other: Vec::new(),
                    });
                }
                ("input", Api::Text | Api::Multimodal) => {
                    top.input = Some(m.next_value_seed(InputSeed(api))?);
                }
                ("parameters", Api::Text | Api::Multimodal) => {
                    top.parameters = Some(m.next_value()?);
                }
                ("encoding_format", Api::Compatible) => {
                    top.encoding_format = Some(m.next_value()?);
                }
                _ => top.other.push((k, m.next_value()?)),
            }
        }
        Ok(top)
    }
}

/// Reads a native `input` object.
struct InputSeed(Api);

impl<'de> serde::de::DeserializeSeed<'de> for InputSeed {
    type Value = Input<'de>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Input<'de>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for InputSeed {
    type Value = Input<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an input object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Input<'de>, A::Error> {
        let list_key = list_key(self.0);
        let mut input = Input::default();
        while let Some(k) = m.next_key::<&'de str>()? {
            if k == list_key {
                input.list = Some(m.next_value_seed(ListSeed(self.0))?);
            } else {
                input.other.push((k, m.next_value()?));
            }
        }
        Ok(input)
    }
}

/// Reads the list of items: texts (a list, or in compatible mode one
/// text), or content objects unparsed.
struct ListSeed(Api);

impl<'de> serde::de::DeserializeSeed<'de> for ListSeed {
    type Value = List<'de>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<List<'de>, D::Error> {
        match self.0 {
            Api::Text => d.deserialize_seq(self),
            Api::Compatible => d.deserialize_any(self),
            Api::Multimodal => Ok(List::Contents(serde::Deserialize::deserialize(d)?)),
        }
    }
}

impl<'de> serde::de::Visitor<'de> for ListSeed {
    type Value = List<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list of texts")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<List<'de>, A::Error> {
        let mut texts = Vec::with_capacity(s.size_hint().unwrap_or(8).min(64));
        while let Some(t) = s.next_element::<Text<'de>>()? {
            texts.push(t);
        }
        Ok(List::Texts(texts))
    }
    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<List<'de>, E> {
        Ok(List::Texts(vec![Text::Plain(v)]))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<List<'de>, E> {
        Ok(List::Texts(vec![Text::Escaped(v.to_owned())]))
    }
}

/// A text as the request wrote it: with no escapes (its bytes in the
/// body are its canonical JSON), or unescaped.
enum Text<'a> {
    Plain(&'a str),
    Escaped(String),
}

impl<'de> serde::Deserialize<'de> for Text<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a text")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text::Plain(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text::Escaped(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text::Escaped(v))
            }
        }
        d.deserialize_str(V)
    }
}

/// The text items, each checked.
fn items_of(body: &Bytes, texts: Vec<Text<'_>>, spec: &ModelSpec) -> Option<Vec<FamilyItem>> {
    count_ok(texts.len(), spec)?;
    texts.into_iter().map(|t| text(body, t, spec)).collect()
}

/// `model`: a string naming a model in the table.
fn model_of(raw: &RawValue, table: &ModelTable) -> Option<Arc<ModelSpec>> {
    let name: &str = serde_json::from_str(raw.get()).ok()?;
    table.get(name).cloned()
}

fn count_ok(n: usize, spec: &ModelSpec) -> Option<()> {
    (n > 0 && n <= spec.max_items).then_some(())
}

/// A small part as a tree, if it nests no deeper than [`MAX_PART_DEPTH`].
fn tree(raw: &RawValue) -> Option<Value> {
    if depth(raw.get().as_bytes()) > MAX_PART_DEPTH {
        return None;
    }
    serde_json::from_str(raw.get()).ok()
}

/// The deepest nesting of brackets outside strings.
fn depth(json: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
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
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// A text item: an unescaped text's canonical JSON is its own bytes in
/// the body, quotes included (a slice, not a copy).
fn text(body: &Bytes, t: Text<'_>, spec: &ModelSpec) -> Option<FamilyItem> {
    let (json, len) = match t {
        Text::Plain(s) => {
            // serde_json hands out an unescaped string from the body itself.
            let start = (s.as_ptr() as usize)
                .checked_sub(body.as_ptr() as usize)?
                .checked_sub(1)?;
            let end = start.checked_add(s.len() + 2)?;
            let quoted = body.get(start..end)?;
            if !(quoted.starts_with(b"\"") && quoted.ends_with(b"\"") && quoted.len() >= 2) {
                return None;
            }
            (body.slice(start..end), s.len())
        }
        Text::Escaped(s) => (Bytes::from(serde_json::to_string(&s).ok()?), s.len()),
    };
    text_ok(len, "", spec).ok()?;
    Some(FamilyItem {
        modality: Modality::Text,
        json,
        text_bytes: len as u64,
        images: 0,
        videos: 0,
    })
}
