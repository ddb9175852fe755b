//! gzip answers built around a part compressed once, and that part as the
//! cache's compact form of an entry.
//!
//! A hit's answer is `prefix + vector + suffix`, where only the vector is
//! the same for every hit (the usage and the request id differ). The
//! vector is compressed once per cache entry into raw DEFLATE blocks that
//! end on a byte boundary (a sync flush, not final); each answer then is a
//! gzip header, the prefix as a stored block, the precompressed blocks, the
//! suffix as the final stored block, and the trailer, whose CRC-32 is
//! combined from the three parts' CRCs. One gzip member, so every client
//! decoder reads it; per hit it costs two small CRCs and a copy of the
//! compressed vector (about 42% of its text).
//!
//! The same blocks are what the cache keeps of an entry once it is
//! compacted (see `cache`): inflated, they give the text back byte for byte.

use bytes::{BufMut, Bytes, BytesMut};
use zlib_rs::{DeflateConfig, DeflateFlush, InflateFlush, Method, Strategy};

/// zlib's level 7 with the `Filtered` strategy (matches of 5 bytes or
/// more): float text is mostly random digits, where short matches cost
/// more bits than the literals they replace. Measured on 1536 floats as
/// DashScope prints them (31 KB): 13.0 KB (42%) in ~0.65 ms; the default
/// strategy gives 14.2 KB (46%), level 9 saves 3 more bytes for twice the
/// time, and miniz_oxide (flate2's default) needs 1.2 ms for 13.06 KB.
const LEVEL: i32 = 7;
const STRATEGY: Strategy = Strategy::Filtered;
/// Raw DEFLATE (no zlib header) with zlib's 32 KiB window.
const WINDOW_BITS: i32 = 15;
/// zlib's default hash size (memLevel 8).
const MEM_LEVEL: i32 = 8;

/// A part compressed once: raw DEFLATE blocks, byte-aligned, not final,
/// with the CRC-32 and length of the bytes they inflate to.
///
/// The blocks are kept in two buffers, a head of a size allocators do not
/// round up and the small rest: mimalloc and jemalloc serve a 13,016-byte
/// block from their 14,336-byte size class, which would cost 10% more than
/// the bytes held (see [`head_len`]).
#[derive(Clone)]
pub(crate) struct Precompressed {
    head: Bytes,
    tail: Bytes,
    crc: u32,
    len: u64,
}

impl Precompressed {
    /// Compresses `data` (~0.65 ms for 31 KB: never on a request's path).
    pub(crate) fn of(data: &[u8]) -> Option<Precompressed> {
        let mut z = zlib_rs::Deflate::new_with_config(DeflateConfig {
            level: LEVEL,
            method: Method::Deflated,
            window_bits: -WINDOW_BITS,
            mem_level: MEM_LEVEL,
            strategy: STRATEGY,
        });
        // Room for the worst case, and the sync flush's empty stored block.
        let mut out = vec![0u8; zlib_rs::compress_bound(data.len()) + 64];
        z.compress(data, &mut out, DeflateFlush::SyncFlush).ok()?;
        let written = usize::try_from(z.total_out()).ok()?;
        if usize::try_from(z.total_in()).ok()? != data.len() || written >= out.len() {
            return None;
        }
        Some(Precompressed::from_blocks(
            &out[..written],
            crc32fast::hash(data),
            data.len() as u64,
        ))
    }

    /// Blocks read from elsewhere (a Redis value), copied into buffers of
    /// their own; [`inflate`] checks that they agree with `crc` and `len`.
    ///
    /// [`inflate`]: Precompressed::inflate
    pub(crate) fn from_blocks(blocks: &[u8], crc: u32, len: u64) -> Precompressed {
        let (head, tail) = blocks.split_at(head_len(blocks.len()));
        Precompressed {
            head: Bytes::copy_from_slice(head),
            tail: Bytes::copy_from_slice(tail),
            crc,
            len,
        }
    }

    /// The bytes it was made of, checked: exactly `len` bytes with the
    /// recorded CRC-32 from exactly these blocks, or `None`.
    pub(crate) fn inflate(&self) -> Option<Bytes> {
        let len = usize::try_from(self.len).ok()?;
        let mut z = zlib_rs::Inflate::new(false, WINDOW_BITS as u8);
        // One byte more than expected: a stream that inflates to more
        // fills it and is refused.
        let mut out = vec![0u8; len + 1];
        for part in self.blocks() {
            if part.is_empty() {
                continue;
            }
            let at = usize::try_from(z.total_out()).ok()?;
            let room = out.get_mut(at..)?;
            z.decompress(part, room, InflateFlush::SyncFlush).ok()?;
        }
        if z.total_out() != self.len || z.total_in() != self.size() as u64 {
            return None;
        }
        out.truncate(len);
        (crc32fast::hash(&out) == self.crc).then(|| Bytes::from(out))
    }

    /// Bytes of the compressed blocks.
    pub(crate) fn size(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// Bytes its buffers take from the allocator ([`size_class`]).
    pub(crate) fn allocated(&self) -> usize {
        size_class(self.head.len()) + size_class(self.tail.len())
    }

    /// The compressed blocks, in order.
    pub(crate) fn blocks(&self) -> [&[u8]; 2] {
        [&self.head, &self.tail]
    }

    /// CRC-32 of the bytes it inflates to.
    pub(crate) fn crc(&self) -> u32 {
        self.crc
    }

    /// Length of the bytes it inflates to.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }
}

/// `n` rounded up to its allocation size class (as in [`head_len`]): what
/// a buffer of `n` bytes costs.
pub(crate) fn size_class(n: usize) -> usize {
    if n <= 64 {
        return n.next_multiple_of(8);
    }
    let power = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
    n.next_multiple_of(power / 4)
}

/// The largest allocation size class that fits in `n`: above 4 KiB,
/// mimalloc and jemalloc have four per power of two (8, 10, 12, 14 KiB,
/// 16, 20, … KiB), so a buffer of exactly one wastes nothing, and the rest
/// (less than a quarter of the power of two) is rounded up by at most an
/// eighth of itself. glibc's malloc has no classes: there the split costs
/// one more chunk header (16 bytes).
fn head_len(n: usize) -> usize {
    if n < 4096 {
        return n;
    }
    let power = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let quarter = power / 4;
    power + (n - power) / quarter * quarter
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
    let mut out = BytesMut::with_capacity(middle.size() + prefix.len() + suffix.len() + 48);
    // ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL=0 OS=unknown
    out.put_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
    stored(&mut out, prefix, false);
    for part in middle.blocks() {
        out.put_slice(part);
    }
    stored(&mut out, suffix, true);
    let mut crc = crc32fast::Hasher::new();
    crc.update(prefix);
    crc.combine(&crc32fast::Hasher::new_with_initial_len(
        middle.crc, middle.len,
    ));
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
    fn heads_are_allocation_size_classes() {
        for (n, class) in [
            (0, 0),
            (1, 8),
            (64, 64),
            (65, 80),
            (728, 768),
            (12_288, 12_288),
            (13_016, 14_336),
            (30_978, 32_768),
        ] {
            assert_eq!(size_class(n), class, "{n}");
        }
        assert_eq!(head_len(13_016), 12_288);
        assert_eq!(head_len(12_288), 12_288);
        assert_eq!(head_len(16_383), 14_336);
        assert_eq!(head_len(16_384), 16_384);
        assert_eq!(head_len(30_000), 28_672);
        assert_eq!(head_len(4_095), 4_095);
        assert_eq!(head_len(0), 0);
        let vector: String = (0..1536)
            .map(|i| format!("{:.17},", (f64::from(i) * 0.37).sin()))
            .collect();
        let p = Precompressed::of(vector.as_bytes()).unwrap();
        assert_eq!(p.head.len(), head_len(p.size()));
        assert_eq!(p.inflate().as_deref(), Some(vector.as_bytes()));
        // Blocks that do not inflate to the recorded length or CRC.
        let blocks = [p.blocks()[0], p.blocks()[1]].concat();
        for (crc, len) in [(p.crc ^ 1, p.len), (p.crc, p.len - 1), (p.crc, p.len + 1)] {
            assert!(Precompressed::from_blocks(&blocks, crc, len)
                .inflate()
                .is_none());
        }
        let cut = &blocks[..blocks.len() - 100];
        assert!(Precompressed::from_blocks(cut, p.crc, p.len)
            .inflate()
            .is_none());
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
