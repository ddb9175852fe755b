//! The digits form of an entry: an exact, compact copy of a vector's JSON
//! text that is quick to turn back into the text.
//!
//! DashScope prints a vector as a list of float32 values in their shortest
//! float64 form (`-0.0069580078125`, `0.041749317198991776`): almost every
//! number is an optional `-`, `0.`, a few zeros and up to 17 significant
//! digits. Such a number fits in one 64-bit word (the digits in three parts,
//! the zeros, the sign), 8 bytes instead of ~20: 12,288 bytes for 1536
//! floats, against ~13 KB for the DEFLATE form ([`Precompressed`]). Writing
//! the text again is a few arithmetic steps per number (~12 µs for 1536
//! floats, against ~46 µs to inflate DEFLATE), so identity hits of a
//! compacted entry stay cheap.
//!
//! Anything else is kept as it was: the text before the first number and
//! after the last one, the separator (the same between every two
//! numbers, or the text is not taken), and up to [`MAX_VERBATIM`] numbers
//! of another shape as their own bytes. [`Digits::of`] writes the text back
//! and compares it before it returns a form, so a form always gives back
//! its text byte for byte.
//!
//! [`Precompressed`]: crate::gzip::Precompressed

use std::ops::Deref;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::gzip::size_class;

/// Numbers of another shape kept as their own bytes, at most: a list with
/// more is not taken (it would not be much smaller).
pub(crate) const MAX_VERBATIM: usize = 64;
/// The longest number kept as its own bytes.
const MAX_VERBATIM_LEN: usize = 40;
/// The longest text taken, and the longest `head`/`sep`/`tail`.
const MAX_TEXT: usize = 16 << 20;
const MAX_FRAME: usize = 64;

/// A word with this bit is a number kept as its own bytes: its low 32 bits
/// index [`Digits::verbatim`].
const VERBATIM: u64 = 1 << 63;
/// The significant digits, as an integer below 10^17, are kept in three
/// parts, so that writing them needs no division: the last eight digits
/// (bits 0-26), the eight before (bits 27-53) and the first (bits 54-57).
const EIGHT_BITS: u32 = 27;
const EIGHT_MASK: u64 = (1 << EIGHT_BITS) - 1;
const TOP_SHIFT: u32 = 2 * EIGHT_BITS;
const ZEROS_SHIFT: u32 = 58;
const NEGATIVE: u64 = 1 << 61;
/// Zeros between `0.` and the first significant digit, at most.
const MAX_ZEROS: u32 = 7;
const MAX_SIGNIFICANT: usize = 17;
const E8: u64 = 100_000_000;

/// An entry's text in digits form (see the module). Clones share buffers.
#[derive(Clone)]
pub(crate) struct Digits {
    /// One little-endian word per number.
    words: Bytes,
    /// The rest, apart: a cache entry holds only these two pointers.
    meta: Arc<Meta>,
}

pub(crate) struct Meta {
    /// The text before the first number, between two numbers, after the
    /// last one, and the numbers kept as they were; one buffer.
    frame: Box<[u8]>,
    head_len: u16,
    sep_len: u16,
    tail_len: u16,
    /// `verbatim_ends[i]`: where number `i` of those kept ends in `frame`.
    verbatim_ends: Box<[u32]>,
    /// Length and CRC-32 of the text.
    len: u32,
    crc: u32,
}

impl Deref for Digits {
    type Target = Meta;
    fn deref(&self) -> &Meta {
        &self.meta
    }
}

impl Digits {
    /// The digits form of `text`, when it is a list of numbers of the
    /// usual shape (see the module) and the form is smaller; checked: it
    /// writes back exactly `text`.
    pub(crate) fn of(text: &[u8]) -> Option<Digits> {
        if text.len() > MAX_TEXT {
            return None;
        }
        let open = text.iter().position(|&c| c == b'[')?;
        let head_end = open + 1 + ws(&text[open + 1..]);
        // One word per number, ~20 bytes of text each.
        let mut words = BytesMut::with_capacity(text.len() / 16 * 8);
        let mut verbatim: Vec<&[u8]> = Vec::new();
        let mut sep: Option<&[u8]> = None;
        let mut i = head_end;
        let tail_start = loop {
            let len = text[i..].iter().position(|&c| !is_number_byte(c))?;
            if len == 0 {
                return None;
            }
            let number = &text[i..i + len];
            match word(number) {
                Some(w) => words.put_u64_le(w),
                None => {
                    if verbatim.len() >= MAX_VERBATIM || len > MAX_VERBATIM_LEN {
                        return None;
                    }
                    words.put_u64_le(VERBATIM | verbatim.len() as u64);
                    verbatim.push(number);
                }
            }
            i += len;
            // The separator: `,` with whitespace around it; or the end.
            let gap = ws(&text[i..]);
            match text.get(i + gap) {
                Some(b',') => {
                    let end = i + gap + 1 + ws(&text[i + gap + 1..]);
                    let this = &text[i..end];
                    match sep {
                        None => sep = Some(this),
                        Some(s) if s == this => {}
                        Some(_) => return None,
                    }
                    i = end;
                }
                _ => break i,
            }
        };
        let (head, tail, sep) = (&text[..head_end], &text[tail_start..], sep.unwrap_or(b","));
        if head.len() > MAX_FRAME || tail.len() > MAX_FRAME || sep.len() > MAX_FRAME {
            return None;
        }
        let mut frame = [head, sep, tail].concat();
        let mut verbatim_ends = Vec::with_capacity(verbatim.len());
        for v in &verbatim {
            frame.extend_from_slice(v);
            verbatim_ends.push(frame.len() as u32);
        }
        let d = Digits {
            // A buffer of exactly the words (the capacity was a guess).
            words: Bytes::copy_from_slice(&words),
            meta: Arc::new(Meta {
                frame: frame.into_boxed_slice(),
                head_len: head.len() as u16,
                sep_len: sep.len() as u16,
                tail_len: tail.len() as u16,
                verbatim_ends: verbatim_ends.into_boxed_slice(),
                len: u32::try_from(text.len()).ok()?,
                crc: crc32fast::hash(text),
            }),
        };
        if d.allocated() >= size_class(text.len()) {
            return None;
        }
        (d.write().as_deref() == Some(text)).then_some(d)
    }

    /// The text, written again from the words.
    pub(crate) fn text(&self) -> Option<Bytes> {
        self.write().map(Bytes::from)
    }

    fn write(&self) -> Option<Vec<u8>> {
        let (head, rest) = self.frame.split_at_checked(usize::from(self.head_len))?;
        let (sep, rest) = rest.split_at_checked(usize::from(self.sep_len))?;
        let (tail, verbatim) = rest.split_at_checked(usize::from(self.tail_len))?;
        let verbatim_base = self.frame.len() - verbatim.len();
        let len = self.len as usize;
        // Room to write 8 bytes at a time past the end of any number.
        let mut out = vec![0u8; len + SLACK];
        let mut at = put(&mut out, 0, head)?;
        for (n, w) in self.words.chunks_exact(8).enumerate() {
            let w = u64::from_le_bytes(w.try_into().ok()?);
            if n > 0 {
                at = match sep {
                    [c] => {
                        *out.get_mut(at)? = *c;
                        at + 1
                    }
                    _ => put(&mut out, at, sep)?,
                };
            }
            if w & VERBATIM != 0 {
                let k = (w & u64::from(u32::MAX)) as usize;
                let end = (*self.verbatim_ends.get(k)? as usize).checked_sub(verbatim_base)?;
                let start = match k {
                    0 => 0,
                    _ => (self.verbatim_ends[k - 1] as usize).checked_sub(verbatim_base)?,
                };
                at = put(&mut out, at, verbatim.get(start..end)?)?;
            } else {
                at = number(&mut out, at, w)?;
            }
        }
        at = put(&mut out, at, tail)?;
        if at != len {
            return None;
        }
        out.truncate(len);
        Some(out)
    }

    /// Bytes its buffers take from the allocator.
    pub(crate) fn allocated(&self) -> usize {
        // The `Arc`'s two counts and the `Bytes`' shared header.
        size_class(self.words.len())
            + size_class(std::mem::size_of::<Meta>() + 16)
            + size_class(self.frame.len())
            + size_class(self.verbatim_ends.len() * 4)
            + 32
    }

    /// Length of the text.
    pub(crate) fn len(&self) -> u64 {
        u64::from(self.len)
    }

    /// CRC-32 of the text.
    pub(crate) fn crc(&self) -> u32 {
        self.crc
    }

    /// The same form (the same buffers, not only the same contents).
    pub(crate) fn same(&self, other: &Digits) -> bool {
        self.words.as_ptr() == other.words.as_ptr() && self.words.len() == other.words.len()
    }

    /// Its bytes, for a Redis value: read back with [`Digits::decode`].
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.crc.to_le_bytes());
        for n in [self.head_len, self.sep_len, self.tail_len] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&(self.verbatim_ends.len() as u16).to_le_bytes());
        out.extend_from_slice(&(self.frame.len() as u32).to_le_bytes());
        for e in &*self.verbatim_ends {
            out.extend_from_slice(&e.to_le_bytes());
        }
        out.extend_from_slice(&self.frame);
        out.extend_from_slice(&self.words);
    }

    /// A form read from [`Digits::encode`]'s bytes, with its text; `None`
    /// unless the text it writes has the recorded length and CRC-32.
    pub(crate) fn decode(value: &[u8]) -> Option<(Digits, Bytes)> {
        let mut r = value;
        let len = u32::from_le_bytes(take(&mut r, 4)?.try_into().ok()?);
        let crc = u32::from_le_bytes(take(&mut r, 4)?.try_into().ok()?);
        let mut u16s = [0u16; 4];
        for n in &mut u16s {
            *n = u16::from_le_bytes(take(&mut r, 2)?.try_into().ok()?);
        }
        let [head_len, sep_len, tail_len, kept] = u16s;
        let frame_len = u32::from_le_bytes(take(&mut r, 4)?.try_into().ok()?) as usize;
        if len as usize > MAX_TEXT || usize::from(kept) > MAX_VERBATIM {
            return None;
        }
        let mut ends = Vec::with_capacity(usize::from(kept));
        for _ in 0..kept {
            let e = u32::from_le_bytes(take(&mut r, 4)?.try_into().ok()?);
            if e as usize > frame_len || ends.last().is_some_and(|&last| e < last) {
                return None;
            }
            ends.push(e);
        }
        let frame: Box<[u8]> = take(&mut r, frame_len)?.into();
        if !r.len().is_multiple_of(8)
            || usize::from(head_len) + usize::from(sep_len) + usize::from(tail_len) > frame_len
            || r.len() / 8 > len as usize
        {
            return None;
        }
        let d = Digits {
            words: Bytes::copy_from_slice(r),
            meta: Arc::new(Meta {
                frame,
                head_len,
                sep_len,
                tail_len,
                verbatim_ends: ends.into_boxed_slice(),
                len,
                crc,
            }),
        };
        let text = d.write()?;
        (crc32fast::hash(&text) == crc).then(|| (d, Bytes::from(text)))
    }
}

fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (a, b) = r.split_at_checked(n)?;
    *r = b;
    Some(a)
}

fn ws(b: &[u8]) -> usize {
    b.iter()
        .position(|c| !matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
        .unwrap_or(b.len())
}

fn is_number_byte(c: u8) -> bool {
    matches!(c, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
}

/// The word of a number of the usual shape: `-?0\.0{0,7}[1-9][0-9]{0,16}`.
fn word(number: &[u8]) -> Option<u64> {
    let (negative, rest) = match number.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, number),
    };
    let fraction = rest.strip_prefix(b"0.")?;
    let zeros = fraction.iter().take_while(|&&c| c == b'0').count();
    let significant = &fraction[zeros..];
    if zeros > MAX_ZEROS as usize || significant.is_empty() || significant.len() > MAX_SIGNIFICANT {
        return None;
    }
    let mut m = 0u64;
    for &c in significant {
        if !c.is_ascii_digit() {
            return None;
        }
        m = m * 10 + u64::from(c - b'0');
    }
    // No leading zero among the significant digits (they are `zeros`).
    if significant[0] == b'0' {
        return None;
    }
    let (top, mid, lo) = (m / (E8 * E8), m / E8 % E8, m % E8);
    Some(
        lo | mid << EIGHT_BITS
            | top << TOP_SHIFT
            | (zeros as u64) << ZEROS_SHIFT
            | if negative { NEGATIVE } else { 0 },
    )
}

/// Bytes written past a number's end at most (they are overwritten by
/// what follows, or cut).
const SLACK: usize = 16;

/// Copies `bytes` to `out` at `at`; where it ends.
fn put(out: &mut [u8], at: usize, bytes: &[u8]) -> Option<usize> {
    let end = at.checked_add(bytes.len())?;
    out.get_mut(at..end)?.copy_from_slice(bytes);
    Some(end)
}

/// Writes 8 bytes at `at` (the caller keeps only some of them).
fn put8(out: &mut [u8], at: usize, word: u64) -> Option<()> {
    out.get_mut(at..at + 8)?
        .copy_from_slice(&word.to_le_bytes());
    Some(())
}

/// Writes the number of word `w` (not a verbatim one) at `at`; where it
/// ends. Every write is of a fixed size: 8 bytes at a time, the ones past
/// the number's end overwritten by what follows.
fn number(out: &mut [u8], mut at: usize, w: u64) -> Option<usize> {
    let lo = w & EIGHT_MASK;
    let mid = (w >> EIGHT_BITS) & EIGHT_MASK;
    let top = (w >> TOP_SHIFT) & 0xf;
    if lo >= E8 || mid >= E8 || top > 9 {
        return None;
    }
    let zeros = ((w >> ZEROS_SHIFT) & u64::from(MAX_ZEROS)) as usize;
    // Half the numbers are negative and half have 17 digits: no branches
    // on either, a `-` or a first digit is written and kept or not.
    *out.get_mut(at)? = b'-';
    at += usize::from(w & NEGATIVE != 0);
    // `0.` and up to 6 zeros, of which `zeros` are kept.
    put8(out, at, u64::from_le_bytes(*b"0.000000"))?;
    at += 2;
    if zeros > 6 {
        put8(out, at, u64::from_le_bytes(*b"00000000"))?;
    }
    at += zeros;
    // The digit count first (multiplications only): where the next number
    // starts does not wait for this one's conversion.
    let digits = decimal_digits((top * E8 + mid) * E8 + lo);
    let lo = ascii8(lo as u32);
    if digits <= 8 {
        put8(out, at, lo >> (8 * (8 - digits)))?;
        return Some(at + digits);
    }
    let mid = ascii8(mid as u32);
    // A first digit only with 17; of the middle eight, those after the
    // leading zeros of a shorter number.
    *out.get_mut(at)? = b'0' + top as u8;
    at += usize::from(digits == MAX_SIGNIFICANT);
    let skip = 16 - digits.min(16);
    put8(out, at, mid >> (8 * skip))?;
    at += 8 - skip;
    put8(out, at, lo)?;
    Some(at + 8)
}

/// Decimal digits of `m` (1 for 0), without branches: log10 from the bit
/// length, corrected by one comparison.
fn decimal_digits(m: u64) -> usize {
    const POW10: [u64; 20] = {
        let mut t = [1u64; 20];
        let mut i = 1;
        while i < 20 {
            t[i] = t[i - 1] * 10;
            i += 1;
        }
        t
    };
    let bits = 64 - (m | 1).leading_zeros();
    let guess = ((bits * 1233) >> 12) as usize;
    (guess + usize::from(m >= POW10[guess.min(19)])).max(1)
}

/// `x` (below 10^8) as 8 ASCII digits, the first one in the lowest byte
/// (as they lie in memory once written little-endian). Splits the number
/// in halves, quarters and eighths with all lanes at once.
fn ascii8(x: u32) -> u64 {
    // Lanes of 32 bits: the first four digits, then the last four.
    let v = u64::from(x / 10_000) | u64::from(x % 10_000) << 32;
    // Lanes of 16 bits: x / 100 and x % 100 of each (x * 5243 >> 19 is
    // x / 100 for x < 10,000).
    let hundreds = ((v * 5243) >> 19) & 0x0000_007f_0000_007f;
    let v = hundreds | (v - hundreds * 100) << 16;
    // Lanes of 8 bits: x / 10 and x % 10 (x * 103 >> 10 for x < 100).
    let tens = ((v * 103) >> 10) & 0x000f_000f_000f_000f;
    let v = tens | (v - tens * 10) << 8;
    v | 0x3030_3030_3030_3030
}

/// 1536 float32 values in shortest float64 form, as DashScope prints them
/// (~19 characters each): uniform in [-0.5, 0.5), divided by `shrink`
/// (e.g. 12: around zero, as in normalised vectors).
#[cfg(test)]
pub(crate) fn test_vector(seed: u32, shrink: f32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    let v: Vec<f64> = (0..1536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            f64::from(((x >> 8) as f32 / 16_777_216.0 - 0.5) / shrink)
        })
        .collect();
    serde_json::to_vec(&v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(seed: u32, small: bool) -> Vec<u8> {
        test_vector(seed, if small { 12.0 } else { 1.0 })
    }

    #[test]
    fn dashscope_vectors_round_trip_in_twelve_kib() {
        for seed in 0..20 {
            for small in [false, true] {
                let text = vector(seed, small);
                let d = Digits::of(&text).expect("taken");
                assert_eq!(d.text().as_deref(), Some(&text[..]));
                assert_eq!(d.words.len(), 1536 * 8);
                assert!(d.allocated() <= 12_288 + 160, "{}", d.allocated());
                assert_eq!(d.len(), text.len() as u64);
                assert_eq!(d.crc(), crc32fast::hash(&text));
                let mut value = Vec::new();
                d.encode(&mut value);
                let (back, t) = Digits::decode(&value).expect("decodes");
                assert_eq!(&t[..], &text[..]);
                assert_eq!(back.text().as_deref(), Some(&text[..]));
            }
        }
    }

    #[test]
    fn other_shapes_are_kept_or_refused() {
        // Spaces, other numbers kept as they were, a shape of each kind.
        let mut many = String::from("[ ");
        for i in 0..200 {
            many.push_str(match i % 10 {
                0 => "1.5e-05",
                1 => "-0.0000000012",
                2 => "0",
                3 => "-0.0",
                _ => "-0.12345678901234567",
            });
            many.push_str(if i < 199 { " , " } else { " ]\n" });
        }
        // 80 numbers of other shapes: too many to keep.
        assert!(Digits::of(many.as_bytes()).is_none());
        let mut few = String::from("[ ");
        for i in 0..200 {
            few.push_str(match i {
                3 => "1.5e-05",
                7 => "-0.0000000012",
                9 => "0",
                11 => "-0.0",
                12 => "0.10",
                13 => "0.123456789012345678",
                _ => "-0.12345678901234567",
            });
            few.push_str(if i < 199 { " , " } else { " ]\n" });
        }
        let d = Digits::of(few.as_bytes()).expect("taken");
        assert_eq!(d.text().as_deref(), Some(few.as_bytes()));
        let mut value = Vec::new();
        d.encode(&mut value);
        assert_eq!(&Digits::decode(&value).unwrap().1[..], few.as_bytes());
        for refused in [
            &b"[0.1,0.2, 0.3]"[..],
            b"[0.1,0.2,\"x\"]",
            b"{\"a\":1}",
            b"[]",
            b"[0.1,,0.2]",
        ] {
            assert!(
                Digits::of(refused).is_none(),
                "{}",
                String::from_utf8_lossy(refused)
            );
        }
    }

    #[test]
    fn digit_counts() {
        for m in [0u64, 1, 9, 10, 99, 100, 12_345, 99_999_999, 100_000_000] {
            assert_eq!(decimal_digits(m), m.to_string().len(), "{m}");
        }
        for k in 1..=18u32 {
            let p = 10u64.pow(k);
            assert_eq!(decimal_digits(p - 1), k as usize);
            assert_eq!(decimal_digits(p), k as usize + 1);
        }
        assert_eq!(decimal_digits(u64::MAX), 20);
    }

    #[test]
    fn damaged_values_are_refused() {
        let text = vector(7, false);
        let d = Digits::of(&text).unwrap();
        let mut value = Vec::new();
        d.encode(&mut value);
        for cut in [0, 5, 20, value.len() - 1] {
            assert!(Digits::decode(&value[..cut]).is_none(), "cut at {cut}");
        }
        let mut flipped = value.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 1;
        assert!(Digits::decode(&flipped).is_none());
    }

    /// Cost of writing the text again, against inflating DEFLATE (run with
    /// `--ignored --nocapture` in release).
    #[test]
    #[ignore]
    fn write_cost() {
        let text = vector(3, false);
        let d = Digits::of(&text).unwrap();
        let c = crate::gzip::Precompressed::of(&text).unwrap();
        let n = 2000;
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(d.text());
        }
        let digits = t.elapsed() / n;
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(c.inflate());
        }
        let inflate = t.elapsed() / n;
        let t = std::time::Instant::now();
        for _ in 0..200 {
            std::hint::black_box(Digits::of(&text));
        }
        let make = t.elapsed() / 200;
        println!(
            "digits: {} B, write {digits:?}, make {make:?}; deflate: {} B, inflate {inflate:?}",
            d.allocated(),
            c.size()
        );
    }
}
