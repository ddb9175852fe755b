//! The quick reader: a well-formed family request read without a JSON
//! tree. The top level and `input` are read as members with unparsed
//! values; a text without escapes is kept as the request's own bytes (its
//! canonical JSON already); only the small parts (`parameters`, unknown
//! members, a content object) are parsed into [`Value`]s.
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
    let top: Members<'_> = serde_json::from_slice(body).ok()?;
    let (mut model, mut input, mut parameters) = (None, None, None);
    let mut extra = Map::new();
    // A repeated member: the last one counts, as in a parsed tree.
    for (k, v) in top.0 {
        match k {
            "model" => model = Some(v),
            "input" => input = Some(v),
            "parameters" => parameters = Some(v),
            _ => {
                extra.insert(k.to_owned(), tree(v)?);
            }
        }
    }
    let spec = model_of(model?, table)?;
    native_api_ok(&spec, api).ok()?;
    let input: Members<'_> = serde_json::from_str(input?.get()).ok()?;
    let parameters = match parameters.map(tree) {
        None => Map::new(),
        Some(Some(Value::Object(o))) => o,
        Some(Some(Value::Null)) => Map::new(),
        Some(_) => return None,
    };
    let list_key = list_key(api);
    let mut list = None;
    let mut input_extra = Map::new();
    for (k, v) in input.0 {
        if k == list_key {
            list = Some(v);
        } else {
            input_extra.insert(k.to_owned(), tree(v)?);
        }
    }
    let list: Vec<&RawValue> = serde_json::from_str(list?.get()).ok()?;
    count_ok(list.len(), &spec)?;
    let items = list
        .into_iter()
        .map(|v| match api {
            Api::Text => text(body, v, &spec),
            Api::Multimodal | Api::Compatible => content_item(tree(v)?, "", &spec).ok(),
        })
        .collect::<Option<Vec<_>>>()?;
    native_request(api, spec, items, parameters, extra, input_extra).ok()
}

pub(super) fn compatible(body: &Bytes, table: &ModelTable) -> Option<FamilyRequest> {
    let top: Members<'_> = serde_json::from_slice(body).ok()?;
    let (mut model, mut input, mut format) = (None, None, None);
    let mut m = Map::new();
    for (k, v) in top.0 {
        match k {
            "model" => model = Some(v),
            "input" => input = Some(v),
            "encoding_format" => format = Some(v),
            _ => {
                m.insert(k.to_owned(), tree(v)?);
            }
        }
    }
    let spec = model_of(model?, table)?;
    if !spec.compatible_mode {
        return None;
    }
    let input = input?;
    let list: Vec<&RawValue> = if input.get().starts_with('"') {
        vec![input]
    } else {
        serde_json::from_str(input.get()).ok()?
    };
    count_ok(list.len(), &spec)?;
    let items = list
        .into_iter()
        .map(|v| text(body, v, &spec))
        .collect::<Option<Vec<_>>>()?;
    let base64 = match format {
        None => false,
        Some(f) => match serde_json::from_str::<Option<&str>>(f.get()).ok()? {
            None | Some("float") => false,
            Some("base64") => true,
            Some(_) => return None,
        },
    };
    compatible_request(spec, items, m, base64).ok()
}

/// An object's members in order, values unparsed; keys with escapes are
/// not read (the full reader takes those).
struct Members<'a>(Vec<(&'a str, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Self::Value, A::Error> {
                let mut v = Vec::with_capacity(4);
                while let Some(entry) = m.next_entry::<&'de str, &'de RawValue>()? {
                    v.push(entry);
                }
                Ok(Members(v))
            }
        }
        d.deserialize_map(V)
    }
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

/// A text item. Without escapes (or control characters, which are not
/// JSON) a string's bytes as sent are its canonical JSON: kept as a slice
/// of the body, not copied.
fn text(body: &Bytes, raw: &RawValue, spec: &ModelSpec) -> Option<FamilyItem> {
    let json = raw.get().as_bytes();
    let inner = json.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    let (json, len) = if inner.iter().all(|&b| b != b'\\' && b >= 0x20) {
        (slice_of(body, json)?, inner.len())
    } else {
        let s: String = serde_json::from_str(raw.get()).ok()?;
        let json = Bytes::from(serde_json::to_string(&s).ok()?);
        (json, s.len())
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

/// `part` (borrowed from `body`) as a slice of it, without copying.
fn slice_of(body: &Bytes, part: &[u8]) -> Option<Bytes> {
    let start = (part.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= body.len()).then(|| body.slice(start..end))
}
