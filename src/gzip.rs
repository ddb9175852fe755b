//! gzip answers built around a part compressed once.
//!
//! A hit's answer is `prefix + vector + suffix`, where only the vector is
//! the same for every hit (the usage and the request id differ). The
//! vector is compressed once per cache entry into raw DEFLATE blocks that
//! end on a byte boundary (a sync flush, not final); each answer then is a
//! gzip header, the prefix as a stored block, the precompressed blocks, the
//! suffix as the final stored block, and the trailer, whose CRC-32 is
//! combined from the three parts' CRCs. One gzip member, so every client
//! decoder reads it; per hit it costs two small CRCs and a copy of the
//! compressed vector (about 45% of its text).

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, FlushCompress, Status};

/// A part compressed once: raw DEFLATE blocks, byte-aligned, not final.
pub(crate) struct Precompressed {
    deflate: Bytes,
    crc: crc32fast::Hasher,
    len: u64,
}

impl Precompressed {
    /// Compresses `data` at the best level (once per entry, so its cost does not matter).
    pub(crate) fn of(data: &[u8]) -> Option<Precompressed> {
        let mut c = Compress::new(Compression::best(), false);
        let mut out: Vec<u8> = Vec::with_capacity(data.len() / 2 + 64);
        loop {
            let consumed = usize::try_from(c.total_in()).ok()?;
            let status = c
                .compress_vec(&data[consumed..], &mut out, FlushCompress::Sync)
                .ok()?;
            let done = usize::try_from(c.total_in()).ok()? == data.len();
            // The flush is complete when it left room in the buffer.
            if done && out.len() < out.capacity() {
                break;
            }
            if status == Status::BufError && out.len() < out.capacity() {
                return None;
            }
            out.reserve(out.capacity().max(4096));
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(data);
        Some(Precompressed {
            deflate: Bytes::from(out),
            crc,
            len: data.len() as u64,
        })
    }

    /// Bytes of its compressed form.
    #[cfg(test)]
    pub(crate) fn size(&self) -> usize {
        self.deflate.len()
    }
}

/// Stored (uncompressed) DEFLATE blocks of `data`, the last one final if
/// `last`; byte-aligned in and out.
fn stored(out: &mut BytesMut, data: &[u8], last: bool) {
    let mut chunks = data.chunks(0xffff).peekable();
    if data.is_empty() {
        if last {
            out.put_slice(&[1, 0, 0, 0xff, 0xff]);
        }
        return;
    }
    while let Some(chunk) = chunks.next() {
        let fin = last && chunks.peek().is_none();
        out.put_u8(u8::from(fin));
        let n = chunk.len() as u16;
        out.put_u16_le(n);
        out.put_u16_le(!n);
        out.put_slice(chunk);
    }
}

/// The gzip stream of `prefix + middle + suffix`.
pub(crate) fn wrap(prefix: &[u8], middle: &Precompressed, suffix: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(middle.deflate.len() + prefix.len() + suffix.len() + 48);
    // ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL=0 OS=unknown
    out.put_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
    stored(&mut out, prefix, false);
    out.put_slice(&middle.deflate);
    stored(&mut out, suffix, true);
    let mut crc = crc32fast::Hasher::new();
    crc.update(prefix);
    crc.combine(&middle.crc);
    crc.update(suffix);
    out.put_u32_le(crc.finalize());
    let total = prefix.len() as u64 + middle.len + suffix.len() as u64;
    // ISIZE: the length modulo 2^32.
    out.put_u32_le((total & 0xffff_ffff) as u32);
    out.freeze()
}

/// True when the client accepts gzip (`Accept-Encoding`, q > 0).
pub(crate) fn accepted(h: &http::HeaderMap) -> bool {
    h.get_all(http::header::ACCEPT_ENCODING).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',').any(|coding| {
                let mut parts = coding.split(';');
                let name = parts.next().unwrap_or("").trim();
                let q = parts
                    .filter_map(|p| p.trim().strip_prefix("q="))
                    .filter_map(|q| q.trim().parse::<f32>().ok())
                    .next_back()
                    .unwrap_or(1.0);
                (name.eq_ignore_ascii_case("gzip") || name == "*") && q > 0.0
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gunzip(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(b)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn wrapped_streams_decode_to_the_whole() {
        let vector: String = (0..1536)
            .map(|i| format!("{:.17},", (i as f64).sin()))
            .collect();
        let p = Precompressed::of(vector.as_bytes()).unwrap();
        assert!(
            p.size() < vector.len() / 2 + 1024,
            "{} of {}",
            p.size(),
            vector.len()
        );
        for (prefix, suffix) in [
            (
                &b"{\"output\":{\"embedding\":"[..],
                &b"},\"request_id\":\"x\"}"[..],
            ),
            (&b""[..], &b"}"[..]),
            (&b"a"[..], &b""[..]),
        ] {
            let z = wrap(prefix, &p, suffix);
            let mut want = prefix.to_vec();
            want.extend_from_slice(vector.as_bytes());
            want.extend_from_slice(suffix);
            assert_eq!(gunzip(&z), want);
        }
        // An empty middle too.
        let e = Precompressed::of(b"").unwrap();
        assert_eq!(gunzip(&wrap(b"{}", &e, b"")), b"{}");
        // Suffixes over one stored block's 64 KiB.
        let big = vec![b'x'; 70_000];
        assert_eq!(gunzip(&wrap(b"", &e, &big)), big);
    }

    #[test]
    fn accept_encoding() {
        let h = |v: &str| {
            let mut m = http::HeaderMap::new();
            m.insert(http::header::ACCEPT_ENCODING, v.parse().unwrap());
            accepted(&m)
        };
        assert!(h("gzip, deflate"));
        assert!(h("br;q=1.0, gzip;q=0.8"));
        assert!(h("*"));
        assert!(!h("gzip;q=0"));
        assert!(!h("identity"));
        assert!(!h("deflate, br"));
        assert!(!accepted(&http::HeaderMap::new()));
    }
}
