//! What the family's cache holds (upstream's answer objects, read by
//! [`answer`](super::answer)), and how an answer is written from entries.
//!
//! An [`Entry`] is one item's answer (per-item models) or a whole request's
//! (fused models): each answer object's fields as upstream wrote them
//! (vectors byte for byte), less its index, plus the units it cost. A
//! merged answer renumbers the objects in the client's order.

use std::ops::Range;

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use serde_json::value::RawValue;

use super::parse::Api;
use crate::metering::Usage;
use crate::request::Modality;

/// Bump when the encoding changes: old entries then read as misses.
const MAGIC: &[u8] = b"egi1 ";

/// One object of an answer, less its index field.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Out {
    /// The index field came first in upstream's object.
    pub(crate) index_first: bool,
    /// `"k":v` pairs, comma-separated, as upstream wrote them.
    pub(crate) fields: Bytes,
}

#[cfg(test)]
impl Out {
    pub(crate) fn as_ref(&self) -> OutRef<'_> {
        OutRef {
            index_first: self.index_first,
            fields: &self.fields,
        }
    }
}

/// A cached answer (one item's, or a fused request's whole).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    /// Units known exactly (a single-item call, or a whole answer) rather
    /// than apportioned from a batch total.
    pub(crate) exact: bool,
    /// Items and units per modality this answer cost.
    pub(crate) usage: Usage,
    /// Images among its items (the usage's `image_count`).
    pub(crate) images: u64,
    pub(crate) outs: Vec<Out>,
}

impl Entry {
    /// Encoded, and read in place as the cache will hand it back.
    pub(crate) fn store(&self) -> Stored {
        let size: usize = self.outs.iter().map(|o| o.fields.len() + 24).sum();
        let mut b = BytesMut::with_capacity(size + 96);
        b.put_slice(MAGIC);
        let mut head = format!("{} {}", u8::from(self.exact), self.images);
        for m in Modality::ALL {
            head.push_str(&format!(
                " {} {}",
                self.usage.items.get(m),
                self.usage.units.get(m)
            ));
        }
        head.push_str(&format!(" {}\n", self.outs.len()));
        b.put_slice(head.as_bytes());
        let mut first = (false, 0..0);
        let mut second = b.len();
        for (i, o) in self.outs.iter().enumerate() {
            b.put_slice(format!("{} {}\n", u8::from(o.index_first), o.fields.len()).as_bytes());
            if i == 0 {
                first = (o.index_first, b.len()..b.len() + o.fields.len());
                second = first.1.end;
            }
            b.put_slice(&o.fields);
        }
        Stored {
            raw: b.freeze(),
            usage: self.usage,
            images: self.images,
            outs: self.outs.len(),
            first,
            second,
        }
    }

    /// True for a whole entry of this version (what [`Stored::read`]
    /// accepts), without copying it.
    pub(crate) fn is_whole(raw: &[u8]) -> bool {
        walk(raw).is_some()
    }
}

/// An entry as the cache holds it, read in place: its header, and its
/// answer objects left where they are in `raw`.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    raw: Bytes,
    pub(crate) usage: Usage,
    pub(crate) images: u64,
    /// Answer objects in it (1 for a per-item entry).
    pub(crate) outs: usize,
    /// The first object: its index comes first, its fields.
    first: (bool, Range<usize>),
    /// Where the second object's line starts.
    second: usize,
}

/// One answer object of a [`Stored`] entry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutRef<'a> {
    pub(crate) index_first: bool,
    pub(crate) fields: &'a [u8],
}

impl Stored {
    /// `None` for anything that is not a whole entry of this version.
    pub(crate) fn read(raw: Bytes) -> Option<Stored> {
        let (head, first, second) = walk(&raw)?;
        Some(Stored {
            usage: head.usage,
            images: head.images,
            outs: head.outs,
            first,
            second,
            raw,
        })
    }

    /// The answer objects, in order.
    pub(crate) fn outs(&self) -> impl Iterator<Item = OutRef<'_>> + '_ {
        let mut at = self.second;
        (0..self.outs).map_while(move |i| {
            if i == 0 {
                return Some(self.first_out());
            }
            let (out, next) = out_at(&self.raw, at)?;
            at = next;
            Some(out)
        })
    }

    /// The first answer object (a per-item entry's only one).
    pub(crate) fn first_out(&self) -> OutRef<'_> {
        OutRef {
            index_first: self.first.0,
            fields: &self.raw[self.first.1.clone()],
        }
    }

    /// The entry as stored (what coalesced followers are handed).
    pub(crate) fn raw(&self) -> &Bytes {
        &self.raw
    }
}

/// An entry's header line.
struct Header {
    images: u64,
    usage: Usage,
    outs: usize,
}

/// The header of a whole entry, its first object (index first, fields),
/// and where the second object's line starts.
fn walk(raw: &[u8]) -> Option<(Header, (bool, Range<usize>), usize)> {
    let (head, at) = header(raw)?;
    let (out, second) = out_at(raw, at)?;
    let first = (out.index_first, second - out.fields.len()..second);
    let mut at = second;
    for _ in 1..head.outs {
        at = out_at(raw, at)?.1;
    }
    (at == raw.len()).then_some((head, first, second))
}

/// The header, and where the first object's line starts.
fn header(raw: &[u8]) -> Option<(Header, usize)> {
    if !raw.starts_with(MAGIC) {
        return None;
    }
    let mut c = Cursor {
        raw,
        at: MAGIC.len(),
    };
    // Whether the units are exact: written for whoever reads the cache.
    c.num(b' ')?;
    let images = c.num(b' ')?;
    let mut usage = Usage::default();
    for m in Modality::ALL {
        usage.items.set(m, c.num(b' ')?);
        usage.units.set(m, c.num(b' ')?);
    }
    let outs = usize::try_from(c.num(b'\n')?).ok()?;
    if outs == 0 || outs > 4096 {
        return None;
    }
    let head = Header {
        images,
        usage,
        outs,
    };
    Some((head, c.at))
}

/// The object whose line starts at `at`, and where the next line starts.
fn out_at(raw: &[u8], at: usize) -> Option<(OutRef<'_>, usize)> {
    let mut c = Cursor { raw, at };
    let index_first = c.num(b' ')? == 1;
    let len = usize::try_from(c.num(b'\n')?).ok()?;
    let end = c.at.checked_add(len)?;
    let fields = raw.get(c.at..end)?;
    let out = OutRef {
        index_first,
        fields,
    };
    Some((out, end))
}

/// Reads the decimal numbers of an entry's header lines.
struct Cursor<'a> {
    raw: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    /// A number of 1 to 19 digits, then `end`.
    fn num(&mut self, end: u8) -> Option<u64> {
        let start = self.at;
        let mut n = 0u64;
        loop {
            let b = *self.raw.get(self.at)?;
            self.at += 1;
            let digits = self.at - start;
            match b {
                b'0'..=b'9' if digits <= 19 => n = n * 10 + u64::from(b - b'0'),
                _ if b == end && digits > 1 => return Some(n),
                _ => return None,
            }
        }
    }
}

/// A JSON list of numbers as a JSON string of base64 little-endian f32s
/// (what the `openai` SDK decodes).
fn encode_base64_vector(raw: &[u8]) -> Option<String> {
    let floats: Vec<f64> = serde_json::from_slice(raw).ok()?;
    let mut bytes = Vec::with_capacity(floats.len() * 4);
    for f in floats {
        bytes.extend_from_slice(&(f as f32).to_le_bytes());
    }
    Some(format!(
        "\"{}\"",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

/// Writes one answer object at position `index`.
fn write_out(b: &mut BytesMut, api: Api, o: OutRef<'_>, index: usize, base64: bool) {
    let write_index = |b: &mut BytesMut| {
        b.put_u8(b'"');
        b.put_slice(api.index_field().as_bytes());
        b.put_slice(b"\":");
        put_decimal(b, index);
    };
    b.put_u8(b'{');
    if o.index_first {
        write_index(b);
        b.put_u8(b',');
    }
    if base64 {
        // Rewrite `embedding` only; other fields as stored.
        let wrapped = format!("{{{}}}", String::from_utf8_lossy(o.fields));
        let mut first = true;
        if let Ok(RawFields(fields)) = serde_json::from_str::<RawFields<'_>>(&wrapped) {
            for (k, v) in fields {
                if !first {
                    b.put_u8(b',');
                }
                first = false;
                let encoded = (k == "embedding")
                    .then(|| encode_base64_vector(v.get().as_bytes()))
                    .flatten();
                if let Ok(key) = serde_json::to_string(&k) {
                    b.put_slice(key.as_bytes());
                }
                b.put_u8(b':');
                match encoded {
                    Some(e) => b.put_slice(e.as_bytes()),
                    None => b.put_slice(v.get().as_bytes()),
                }
            }
        }
    } else {
        b.put_slice(o.fields);
    }
    if !o.index_first {
        b.put_u8(b',');
        write_index(b);
    }
    b.put_u8(b'}');
}

/// `n` in decimal, without a `format!`.
fn put_decimal(b: &mut BytesMut, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    b.put_slice(&digits[at..]);
}

/// An object's fields in order, values unparsed.
pub(super) struct RawFields<'a>(pub(super) Vec<(String, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for RawFields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawFields<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<String, &'de RawValue>()? {
                    v.push((k, val));
                }
                Ok(RawFields(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// The `usage` object of an answer that cost `usage` (`images` images),
/// in the API's own shape.
pub(crate) fn usage_json(api: Api, usage: &Usage, images: u64) -> String {
    let total = usage.total();
    match api {
        Api::Text => format!("{{\"total_tokens\":{total}}}"),
        Api::Compatible => format!("{{\"prompt_tokens\":{total},\"total_tokens\":{total}}}"),
        Api::Multimodal => {
            let visual = usage.units.get(Modality::Image) + usage.units.get(Modality::Video);
            let mut s = format!("{{\"input_tokens\":{total}");
            if visual > 0 || images > 0 || usage.items.get(Modality::Video) > 0 {
                s.push_str(&format!(",\"image_tokens\":{visual}"));
            }
            if images > 0 {
                s.push_str(&format!(",\"image_count\":{images}"));
            }
            s.push('}');
            s
        }
    }
}

/// A whole answer: `outs` in the client's order (index = position).
pub(crate) fn render(
    api: Api,
    model: &str,
    outs: &[OutRef<'_>],
    usage: &str,
    request_id: &str,
    base64: bool,
) -> Bytes {
    let size: usize = outs.iter().map(|o| o.fields.len() + 32).sum();
    let mut b = BytesMut::with_capacity(size + usage.len() + 160);
    match api {
        Api::Compatible => b.put_slice(b"{\"data\":["),
        Api::Text | Api::Multimodal => b.put_slice(b"{\"output\":{\"embeddings\":["),
    }
    for (i, o) in outs.iter().enumerate() {
        if i > 0 {
            b.put_u8(b',');
        }
        write_out(&mut b, api, *o, i, base64);
    }
    match api {
        Api::Compatible => {
            b.put_slice(b"],\"model\":");
            b.put_slice(serde_json::to_string(model).unwrap_or_default().as_bytes());
            b.put_slice(b",\"object\":\"list\",\"usage\":");
            b.put_slice(usage.as_bytes());
            b.put_slice(b",\"id\":");
        }
        Api::Text | Api::Multimodal => {
            b.put_slice(b"]},\"usage\":");
            b.put_slice(usage.as_bytes());
            b.put_slice(b",\"request_id\":");
        }
    }
    b.put_slice(
        serde_json::to_string(request_id)
            .unwrap_or_default()
            .as_bytes(),
    );
    b.put_u8(b'}');
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::family::answer::parse_answer;
    use serde_json::Value;

    #[test]
    fn entries_round_trip() {
        let mut usage = Usage::default();
        usage.items.set(Modality::Text, 1);
        usage.units.set(Modality::Text, 7);
        let e = Entry {
            exact: true,
            usage,
            images: 0,
            outs: vec![Out {
                index_first: false,
                fields: Bytes::from_static(b"\"embedding\":[1,2]"),
            }],
        };
        let raw = e.store().raw().clone();
        assert_eq!(
            &raw[..],
            b"egi1 1 0 1 7 0 0 0 0 0 0 1\n0 17\n\"embedding\":[1,2]"
        );
        let s = Stored::read(raw.clone()).unwrap();
        assert_eq!((s.usage, s.images, s.outs), (usage, 0, 1));
        let out = s.first_out();
        assert_eq!(
            (out.index_first, out.fields),
            (false, &e.outs[0].fields[..])
        );
        assert!(Entry::is_whole(&raw));
        for cut in 0..raw.len() {
            assert!(Stored::read(raw.slice(..cut)).is_none(), "{cut}");
        }
        let mut long = raw.to_vec();
        long.push(b'x');
        assert!(Stored::read(Bytes::from(long)).is_none());
        assert!(Stored::read(Bytes::from_static(b"[1,2]")).is_none());
        assert!(Stored::read(Bytes::from_static(b"egi1 1 0 1 7 0 0 0 0 0 0 0\n")).is_none());
        // Fused: several objects, in order.
        let two = Entry {
            outs: vec![
                e.outs[0].clone(),
                Out {
                    index_first: true,
                    fields: Bytes::from_static(b"\"e\":[3]"),
                },
            ],
            ..e.clone()
        };
        let stored = two.store();
        let s = Stored::read(stored.raw().clone()).unwrap();
        let outs: Vec<(bool, &[u8])> = s.outs().map(|o| (o.index_first, o.fields)).collect();
        let written: Vec<(bool, &[u8])> =
            stored.outs().map(|o| (o.index_first, o.fields)).collect();
        assert_eq!(outs, written);
        assert_eq!(
            outs,
            [
                (false, &b"\"embedding\":[1,2]"[..]),
                (true, &b"\"e\":[3]"[..])
            ]
        );
    }

    #[test]
    fn text_answers_are_read_and_rewritten_in_client_order() {
        let body = br#"{"output":{"embeddings":[{"embedding":[0.5,1],"text_index":1},{"embedding":[2,3],"text_index":0}]},"usage":{"total_tokens":4},"request_id":"r"}"#;
        let a = parse_answer(body, Api::Text, Some(2), 2, true).unwrap();
        assert_eq!(&a.outs[0].fields[..], b"\"embedding\":[2,3]");
        let merged = render(
            Api::Text,
            "m",
            &[a.outs[1].as_ref(), a.outs[0].as_ref()],
            "{\"total_tokens\":4}",
            "x",
            false,
        );
        assert_eq!(
            &merged[..],
            br#"{"output":{"embeddings":[{"embedding":[0.5,1],"text_index":0},{"embedding":[2,3],"text_index":1}]},"usage":{"total_tokens":4},"request_id":"x"}"#
        );
        assert!(parse_answer(body, Api::Text, Some(3), 2, true).is_err());
        assert!(parse_answer(body, Api::Text, Some(2), 3, true).is_err());
        assert!(parse_answer(
            br#"{"code":"X","output":{"embeddings":[]}}"#,
            Api::Text,
            None,
            2,
            true
        )
        .is_err());
    }

    #[test]
    fn multimodal_keeps_index_first_and_type() {
        let body = br#"{"output":{"embeddings":[{"index":0,"embedding":[1,2],"type":"image"}]},"usage":{"input_tokens":256,"image_tokens":256}}"#;
        let a = parse_answer(body, Api::Multimodal, Some(1), 2, true).unwrap();
        let out = render(
            Api::Multimodal,
            "m",
            &[a.outs[0].as_ref()],
            "{}",
            "r",
            false,
        );
        assert!(out.starts_with(
            br#"{"output":{"embeddings":[{"index":0,"embedding":[1,2],"type":"image"}]}"#
        ));
    }

    #[test]
    fn compatible_base64_round_trip() {
        let body = br#"{"data":[{"embedding":[0.5,-1.25],"index":0,"object":"embedding"}],"model":"m","object":"list","usage":{"prompt_tokens":1,"total_tokens":1}}"#;
        let a = parse_answer(body, Api::Compatible, Some(1), 2, true).unwrap();
        let out = render(Api::Compatible, "m", &[a.outs[0].as_ref()], "{}", "r", true);
        let v: Value = serde_json::from_slice(&out).unwrap();
        let s = v["data"][0]["embedding"].as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
        assert_eq!(f32::from_le_bytes(bytes[4..8].try_into().unwrap()), -1.25);
        assert_eq!(v["data"][0]["index"], 0);
        // An upstream that answers base64 anyway is read back to floats.
        let b64 = base64::engine::general_purpose::STANDARD.encode(
            [0.5f32, 2.0]
                .iter()
                .flat_map(|f| f.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        let body = format!(
            r#"{{"data":[{{"embedding":"{b64}","index":0}}],"usage":{{"total_tokens":1}}}}"#
        );
        let a = parse_answer(body.as_bytes(), Api::Compatible, Some(1), 2, true).unwrap();
        assert_eq!(&a.outs[0].fields[..], b"\"embedding\":[0.5,2]");
    }
}
