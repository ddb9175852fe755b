//! Upstream's successful answer, read into answer objects ([`Out`]): each
//! object's fields as upstream wrote them (vectors byte for byte, checked
//! to be `dimension` numbers), less its index.
//!
//! Two readers of the JSON, one reading of the items. The quick one reads
//! the answer in one pass (the top level, the list and each object's
//! fields, values unparsed), so a vector is scanned once by the parser and
//! once by the check of its numbers; anything it does not expect (a
//! repeated field, a list where an object should be) it leaves to the full
//! one, which reads it part by part and so names what is wrong.

use base64::Engine as _;
use bytes::{BufMut, BytesMut};
use serde::de::{DeserializeSeed, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

use super::entry::{Out, RawFields};
use super::parse::Api;
use crate::cache::valid_embedding;
use crate::error::GatewayError;

/// Upstream's successful answer, read once.
pub(crate) struct Answer {
    /// One object per item sent (per-item), or the fused object(s), in
    /// index order.
    pub(crate) outs: Vec<Out>,
    /// Upstream's `usage` object, as sent.
    pub(crate) usage: Option<Value>,
    pub(crate) request_id: String,
}

fn unusable(why: impl Into<String>) -> GatewayError {
    GatewayError::BadGateway(format!(
        "upstream answered 200 without a usable embedding: {}",
        why.into()
    ))
}

/// An answer object's fields in order, values unparsed.
type Fields<'a> = Vec<(String, &'a RawValue)>;

/// What either reader found.
struct Wire<'a> {
    /// The list where the API puts it (`output.embeddings`, `data`);
    /// per entry its fields, or `None` for an entry that is not an object.
    list: Option<Vec<Option<Fields<'a>>>>,
    usage: Option<Value>,
    request_id: Option<String>,
    id: Option<String>,
    code: Option<Value>,
}

/// Reads a 200 from upstream: `expect` objects (items sent, or 1 when
/// fused), each with a dense vector of `dimension` numbers when `dense`.
pub(crate) fn parse_answer(
    body: &[u8],
    api: Api,
    expect: Option<usize>,
    dimension: usize,
    dense: bool,
) -> Result<Answer, GatewayError> {
    let wire = match quick(body, api) {
        Some(w) => w,
        None => full(body, api)?,
    };
    if wire
        .code
        .as_ref()
        .is_some_and(|c| !matches!(c, Value::Null) && c.as_str() != Some(""))
    {
        return Err(unusable("it carries an error code"));
    }
    let list = wire.list.ok_or_else(|| match api {
        Api::Compatible => unusable("no data list"),
        Api::Text | Api::Multimodal => unusable("no output.embeddings list"),
    })?;
    if list.is_empty() || expect.is_some_and(|n| n != list.len()) {
        return Err(unusable(format!(
            "{} embeddings for {} items",
            list.len(),
            expect.map_or("some".to_string(), |n| n.to_string())
        )));
    }
    let index_field = api.index_field();
    let mut slots: Vec<Option<Out>> = vec![None; list.len()];
    for fields in list {
        let fields = fields.ok_or_else(|| unusable("an embedding is not an object"))?;
        let mut index = None;
        let mut index_first = false;
        let size: usize = fields
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum();
        let mut out = BytesMut::with_capacity(size);
        let mut has_vector = false;
        for (pos, (k, v)) in fields.iter().enumerate() {
            if k == index_field {
                index = v.get().parse::<usize>().ok();
                index_first = pos == 0;
                continue;
            }
            if k == "embedding" {
                let ok = match api {
                    // A base64 string despite asking for floats: decoded.
                    Api::Compatible if v.get().starts_with('"') => false,
                    _ => valid_embedding(v.get().as_bytes(), dimension),
                };
                if !ok {
                    if let Some(floats) = (api == Api::Compatible)
                        .then(|| decode_base64_vector(v.get(), dimension))
                        .flatten()
                    {
                        push_field(&mut out, k, floats.as_bytes());
                        has_vector = true;
                        continue;
                    }
                    return Err(unusable(format!("a vector is not {dimension} numbers")));
                }
                has_vector = true;
            }
            push_field(&mut out, k, v.get().as_bytes());
        }
        if dense && !has_vector {
            return Err(unusable("an item has no embedding"));
        }
        let i = index
            .filter(|&i| i < slots.len())
            .ok_or_else(|| unusable(format!("an item has no valid {index_field}")))?;
        if slots[i].is_some() {
            return Err(unusable(format!("{index_field} {i} repeated")));
        }
        slots[i] = Some(Out {
            index_first,
            fields: out.freeze(),
        });
    }
    let outs = slots
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| unusable("indices are not 0..n"))?;
    Ok(Answer {
        outs,
        usage: wire.usage,
        request_id: wire.request_id.or(wire.id).unwrap_or_default(),
    })
}

/// The full reader: the top level, then the list, then each object.
fn full(body: &[u8], api: Api) -> Result<Wire<'_>, GatewayError> {
    #[derive(serde::Deserialize)]
    struct Top<'a> {
        #[serde(borrow)]
        output: Option<&'a RawValue>,
        #[serde(borrow)]
        data: Option<&'a RawValue>,
        usage: Option<Value>,
        request_id: Option<String>,
        id: Option<String>,
        code: Option<Value>,
    }
    #[derive(serde::Deserialize)]
    struct Output<'a> {
        #[serde(borrow)]
        embeddings: Option<Vec<&'a RawValue>>,
    }
    let top: Top<'_> =
        serde_json::from_slice(body).map_err(|e| unusable(format!("not JSON ({e})")))?;
    let list: Option<Vec<&RawValue>> = match api {
        Api::Compatible => top
            .data
            .and_then(|d| serde_json::from_str::<Vec<&RawValue>>(d.get()).ok()),
        Api::Text | Api::Multimodal => top
            .output
            .and_then(|o| serde_json::from_str::<Output<'_>>(o.get()).ok())
            .and_then(|o| o.embeddings),
    };
    let list = list.map(|l| {
        l.into_iter()
            .map(|obj| {
                serde_json::from_str::<RawFields<'_>>(obj.get())
                    .ok()
                    .map(|f| f.0)
            })
            .collect()
    });
    Ok(Wire {
        list,
        usage: top.usage,
        request_id: top.request_id,
        id: top.id,
        code: top.code,
    })
}

/// The quick reader: one pass, or `None` for the full reader to read.
fn quick(body: &[u8], api: Api) -> Option<Wire<'_>> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let wire = TopSeed(api).deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(wire)
}

/// The answer's top level; its list read where `api` puts it.
struct TopSeed(Api);

impl<'de> DeserializeSeed<'de> for TopSeed {
    type Value = Wire<'de>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Wire<'de>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopSeed {
    type Value = Wire<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an answer object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Wire<'de>, A::Error> {
        let mut w = Wire {
            list: None,
            usage: None,
            request_id: None,
            id: None,
            code: None,
        };
        // Each known field once, as the full reader requires.
        let mut seen = [false; 6];
        let mut once = |i: usize, name: &'static str| {
            if std::mem::replace(&mut seen[i], true) {
                Err(A::Error::duplicate_field(name))
            } else {
                Ok(())
            }
        };
        while let Some(k) = m.next_key::<&'de str>()? {
            match k {
                "output" => {
                    once(0, "output")?;
                    if self.0 == Api::Compatible {
                        m.next_value::<IgnoredAny>()?;
                    } else {
                        w.list = m.next_value_seed(OutputSeed)?;
                    }
                }
                "data" => {
                    once(1, "data")?;
                    if self.0 == Api::Compatible {
                        w.list = Some(m.next_value_seed(ListSeed)?);
                    } else {
                        m.next_value::<IgnoredAny>()?;
                    }
                }
                "usage" => {
                    once(2, "usage")?;
                    w.usage = m.next_value()?;
                }
                "request_id" => {
                    once(3, "request_id")?;
                    w.request_id = m.next_value()?;
                }
                "id" => {
                    once(4, "id")?;
                    w.id = m.next_value()?;
                }
                "code" => {
                    once(5, "code")?;
                    w.code = m.next_value()?;
                }
                _ => {
                    m.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(w)
    }
}

/// `output`: an object whose `embeddings` is the list.
struct OutputSeed;

impl<'de> DeserializeSeed<'de> for OutputSeed {
    type Value = Option<Vec<Option<Fields<'de>>>>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for OutputSeed {
    type Value = Option<Vec<Option<Fields<'de>>>>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an output object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        let mut list = None;
        while let Some(k) = m.next_key::<&'de str>()? {
            if k == "embeddings" {
                if list.is_some() {
                    return Err(A::Error::duplicate_field("embeddings"));
                }
                list = Some(m.next_value_seed(ListSeed)?);
            } else {
                m.next_value::<IgnoredAny>()?;
            }
        }
        Ok(list)
    }
}

/// The list of answer objects, each object's fields unparsed.
struct ListSeed;

impl<'de> DeserializeSeed<'de> for ListSeed {
    type Value = Vec<Option<Fields<'de>>>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ListSeed {
    type Value = Vec<Option<Fields<'de>>>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list of answer objects")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
        let mut list = Vec::with_capacity(s.size_hint().unwrap_or(10).min(64));
        while let Some(RawFields(fields)) = s.next_element::<RawFields<'de>>()? {
            list.push(Some(fields));
        }
        Ok(list)
    }
}

fn push_field(out: &mut BytesMut, key: &str, raw: &[u8]) {
    if !out.is_empty() {
        out.put_u8(b',');
    }
    if let Ok(k) = serde_json::to_string(key) {
        out.put_slice(k.as_bytes());
    }
    out.put_u8(b':');
    out.put_slice(raw);
}

/// A JSON string of base64 little-endian f32s as a JSON list of numbers.
fn decode_base64_vector(raw: &str, dimension: usize) -> Option<String> {
    let s: String = serde_json::from_str(raw).ok()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
    if bytes.len() != dimension * 4 {
        return None;
    }
    let mut out = String::with_capacity(dimension * 12);
    out.push('[');
    for (i, c) in bytes.chunks_exact(4).enumerate() {
        if i > 0 {
            out.push(',');
        }
        let f = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        if !f.is_finite() {
            return None;
        }
        out.push_str(&f.to_string());
    }
    out.push(']');
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a reader found, comparable.
    fn shape(w: &Wire<'_>) -> String {
        let list = w.list.as_ref().map(|l| {
            l.iter()
                .map(|f| {
                    f.as_ref().map(|f| {
                        f.iter()
                            .map(|(k, v)| (k.clone(), v.get()))
                            .collect::<Vec<_>>()
                    })
                })
                .collect::<Vec<_>>()
        });
        format!(
            "{list:?} {:?} {:?} {:?} {:?}",
            w.usage, w.request_id, w.id, w.code
        )
    }

    /// Both readers of each body: what the quick one reads, the full one
    /// reads the same; and whether the quick one reads it at all.
    #[test]
    fn both_readers_agree() {
        let native: &[(&str, bool)] = &[
            (
                r#"{"output":{"embeddings":[{"embedding":[0.5,1],"text_index":0}]},"usage":{"total_tokens":4},"request_id":"r"}"#,
                true,
            ),
            (
                r#"{"request_id":"r","output":{"x":[1,{"a":2}],"embeddings":[{"text_index":1,"embedding":[2,3]},{"embedding":[0,1],"text_index":0,"e\u0078tra":"\n"}]},"data":[1],"usage":null,"code":""}"#,
                true,
            ),
            (
                r#"{"output":{"embeddings":[{"embedding":[0.5,1],"text_index":0}]},"output":{"embeddings":[]}}"#,
                false,
            ),
            (
                r#"{"output":{"embeddings":[{"embedding":[0.5,1],"text_index":0}],"embeddings":[]}}"#,
                false,
            ),
            (r#"{"output":{"embeddings":[[1,2]]}}"#, false),
            (r#"{"output":{"embeddings":null}}"#, false),
            (r#"{"output":null}"#, false),
            (
                r#"{"output":{"embeddings":[{"embedding":[1],"text_index":0}]},"request_id":7}"#,
                false,
            ),
            (
                r#"{"code":"Throttling","message":"x","request_id":"r"}"#,
                true,
            ),
            (
                r#"{"output":{"embeddings":[{"embedding":[1],"text_index":0}]}} x"#,
                false,
            ),
            (r#"{"outp\u0075t":{"embeddings":[]}}"#, false),
            ("[]", false),
        ];
        for (body, quick_reads) in native {
            let full = full(body.as_bytes(), Api::Text);
            let q = quick(body.as_bytes(), Api::Text);
            assert_eq!(q.is_some(), *quick_reads, "{body}");
            if let Some(q) = q {
                assert_eq!(shape(&q), shape(full.as_ref().unwrap()), "{body}");
            }
        }
        let compatible: &[(&str, bool)] = &[
            (
                r#"{"data":[{"embedding":[0.5,-1.25],"index":0,"object":"embedding"}],"model":"m","object":"list","usage":{"prompt_tokens":1,"total_tokens":1},"id":"x"}"#,
                true,
            ),
            (
                r#"{"output":{"embeddings":7},"data":[{"index":0,"embedding":"AAAA"}]}"#,
                true,
            ),
            (r#"{"data":{"index":0}}"#, false),
        ];
        for (body, quick_reads) in compatible {
            let full = full(body.as_bytes(), Api::Compatible);
            let q = quick(body.as_bytes(), Api::Compatible);
            assert_eq!(q.is_some(), *quick_reads, "{body}");
            if let Some(q) = q {
                assert_eq!(shape(&q), shape(full.as_ref().unwrap()), "{body}");
            }
        }
    }

    /// What the full reader makes of what the quick one leaves.
    #[test]
    fn the_full_reader_names_what_is_wrong() {
        let why = |body: &str| match parse_answer(body.as_bytes(), Api::Text, Some(1), 1, true) {
            Ok(_) => "ok".to_string(),
            Err(GatewayError::BadGateway(why)) => why,
            Err(e) => panic!("{e:?}"),
        };
        assert!(
            why(r#"{"output":{"embeddings":[[1]]}}"#).ends_with("an embedding is not an object")
        );
        assert!(why(r#"{"output":{"embeddings":null}}"#).ends_with("no output.embeddings list"));
        assert!(
            why(r#"{"output":{"embeddings":[{"embedding":[1],"text_index":0}]},"output":1}"#)
                .contains("not JSON (duplicate field `output`")
        );
        assert!(why(r#"{"code":"Throttling"}"#).ends_with("it carries an error code"));
        assert_eq!(
            why(r#"{"output":{"embeddings":[{"embedding":[1],"text_index":0}]}}"#),
            "ok"
        );
    }
}
