//! The digits form of an entry: an exact, compact copy of a vector's JSON
//! text that is quick to turn back into the text.
//!
//! DashScope prints a vector as a list of float32 values in their shortest
//! float64 form (`-0.0069580078125`, `0.041749317198991776`). A form keeps
//! one word per number, in one of two kinds ([`Words`]):
//!
//! - **float32**, 4 bytes: the number's float32 value, when printing that
//!   value in its shortest float64 form (the fewest digits that read back
//!   as the same float64, the nearest such: Python's `repr`, ryu's) gives
//!   exactly the number's text back: 6,144 bytes for 1536 floats. Writing
//!   finds those digits with one 128-bit product per number (and 3 bits
//!   kept with the value saying how to round it, see [`Float32`]), then
//!   writes them as the digits kind does: ~20 µs for 1536 floats;
//! - **digits**, 8 bytes: almost every number is an optional `-`, `0.`, a
//!   few zeros and up to 17 significant digits, which fit in one 64-bit
//!   word (the digits in three parts, the zeros, the sign): 12,288 bytes
//!   for 1536 floats, written back in ~12 µs (a few arithmetic steps per
//!   number). For texts whose numbers are not float32 values so printed.
//!
//! Both are well under the ~13 KB of the DEFLATE form ([`Precompressed`]),
//! which takes ~46 µs to inflate.
//!
//! Anything else is kept as it was: the text before the first number and
//! after the last one, the separator (the same between every two
//! numbers, or the text is not taken), and up to [`MAX_VERBATIM`] numbers
//! of another shape (`0`, `1e-05`) as their own bytes. [`Digits::of`]
//! writes the text back and compares it before it returns a form, so a
//! form always gives back its text byte for byte.
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

/// A digits word with this bit is a number kept as its own bytes: its low
/// 32 bits index the numbers so kept.
const VERBATIM: u64 = 1 << 63;
/// A float32 word (see [`Float32`]) with this exponent code is a number
/// kept as its own bytes: its low 23 bits index the numbers so kept.
const VERBATIM32: u32 = 31;
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

/// How a form keeps its numbers (see the module).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Words {
    /// 4 bytes a number: its float32 value.
    Float32,
    /// 8 bytes a number: its decimal digits.
    Digits,
}

impl Words {
    fn size(self) -> usize {
        match self {
            Words::Float32 => 4,
            Words::Digits => 8,
        }
    }
}

/// An entry's text in digits form (see the module). Clones share buffers.
#[derive(Clone)]
pub(crate) struct Digits {
    /// One little-endian word per number, of `meta.kind`.
    words: Bytes,
    /// The rest, apart: a cache entry holds only these two pointers.
    meta: Arc<Meta>,
}

pub(crate) struct Meta {
    kind: Words,
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
    /// The smallest form of `text` of `kind` or larger: float32 words
    /// when its numbers are float32 values so printed, else digits.
    pub(crate) fn smallest(text: &[u8], kind: Words) -> Option<Digits> {
        match kind {
            Words::Float32 => Digits::of(text, Words::Float32),
            Words::Digits => None,
        }
        .or_else(|| Digits::of(text, Words::Digits))
    }

    /// The form of `text` with words of `kind`, when it is a list of
    /// numbers of that kind (see the module) and the form is smaller;
    /// checked: it writes back exactly `text`.
    pub(crate) fn of(text: &[u8], kind: Words) -> Option<Digits> {
        if text.len() > MAX_TEXT {
            return None;
        }
        let open = text.iter().position(|&c| c == b'[')?;
        let head_end = open + 1 + ws(&text[open + 1..]);
        // One word per number, ~20 bytes of text each.
        let mut words = BytesMut::with_capacity(text.len() / 16 * kind.size());
        let mut verbatim: Vec<&[u8]> = Vec::new();
        let mut sep: Option<&[u8]> = None;
        let mut i = head_end;
        let tail_start = loop {
            let len = text[i..].iter().position(|&c| !is_number_byte(c))?;
            if len == 0 {
                return None;
            }
            let number = &text[i..i + len];
            let taken = match kind {
                Words::Float32 => float32_word(number).map(|w| words.put_u32_le(w)),
                Words::Digits => word(number).map(|w| words.put_u64_le(w)),
            };
            if taken.is_none() {
                if verbatim.len() >= MAX_VERBATIM || len > MAX_VERBATIM_LEN {
                    return None;
                }
                match kind {
                    Words::Float32 => words.put_u32_le(VERBATIM32 << 23 | verbatim.len() as u32),
                    Words::Digits => words.put_u64_le(VERBATIM | verbatim.len() as u64),
                }
                verbatim.push(number);
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
                kind,
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
        // Number `k` of those kept as their own bytes.
        let kept = |k: usize| -> Option<&[u8]> {
            let end = (*self.verbatim_ends.get(k)? as usize).checked_sub(verbatim_base)?;
            let start = match k {
                0 => 0,
                _ => (self.verbatim_ends[k - 1] as usize).checked_sub(verbatim_base)?,
            };
            verbatim.get(start..end)
        };
        let len = self.len as usize;
        // Room to write 8 bytes at a time past the end of any number.
        let mut out = vec![0u8; len + SLACK];
        let mut at = put(&mut out, 0, head)?;
        for (n, w) in self.words.chunks_exact(self.kind.size()).enumerate() {
            if n > 0 {
                at = match sep {
                    [c] => {
                        *out.get_mut(at)? = *c;
                        at + 1
                    }
                    _ => put(&mut out, at, sep)?,
                };
            }
            at = match self.kind {
                Words::Float32 => {
                    let w = u32::from_le_bytes(w.try_into().ok()?);
                    if (w >> 23) & 31 == VERBATIM32 {
                        put(&mut out, at, kept((w & 0x7f_ffff) as usize)?)?
                    } else {
                        Float32(w).write(&mut out, at)?
                    }
                }
                Words::Digits => {
                    let w = u64::from_le_bytes(w.try_into().ok()?);
                    if w & VERBATIM != 0 {
                        put(&mut out, at, kept((w & u64::from(u32::MAX)) as usize)?)?
                    } else {
                        number(&mut out, at, w)?
                    }
                }
            };
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

    /// How it keeps its numbers.
    pub(crate) fn kind(&self) -> Words {
        self.kind
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

    /// Its bytes, for a Redis value: read back with [`Digits::decode`] (its
    /// kind is not among them: the value's prefix tells it).
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

    /// A form of `kind` read from [`Digits::encode`]'s bytes, with its
    /// text; `None` unless the text it writes has the recorded length and
    /// CRC-32.
    pub(crate) fn decode(value: &[u8], kind: Words) -> Option<(Digits, Bytes)> {
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
        if !r.len().is_multiple_of(kind.size())
            || usize::from(head_len) + usize::from(sep_len) + usize::from(tail_len) > frame_len
            || r.len() / kind.size() > len as usize
        {
            return None;
        }
        let d = Digits {
            words: Bytes::copy_from_slice(r),
            meta: Arc::new(Meta {
                kind,
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

/// The float32 word of a number of the usual shape whose value is a
/// float32 value printed in its shortest float64 form: the nearest float32
/// is printed with the same digits word.
fn float32_word(number: &[u8]) -> Option<u32> {
    let digits = word(number)?;
    let f: f32 = std::str::from_utf8(number).ok()?.parse().ok()?;
    let (w, printed) = Float32::of(f)?;
    (printed == digits).then_some(w.0)
}

const POW5: [u64; 24] = {
    let mut t = [1u64; 24];
    let mut i = 1;
    while i < 24 {
        t[i] = t[i - 1] * 5;
        i += 1;
    }
    t
};
const POW10: [u64; 18] = {
    let mut t = [1u64; 18];
    let mut i = 1;
    while i < 18 {
        t[i] = t[i - 1] * 10;
        i += 1;
    }
    t
};

/// A float32 of the usual shape (|f| in [1e-7, 1): `0.`, up to 6 zeros
/// and up to 17 digits when printed) as it is kept: its bits, with the
/// exponent (24 values) in 5 bits and, in the 3 bits so freed, how its
/// shortest float64 form is made from its 17-digit one ([`Near`]): 0 and
/// 1, 17 digits rounded down and up; 2 and 3, 16 digits; 4 and 5, 15
/// digits; 6, fewer digits, searched for.
///
/// Bits: sign (31), how (28-30), exponent - 100 (23-27; 31 is a number
/// kept as its own bytes), significand (0-22).
struct Float32(u32);

impl Float32 {
    const EXPONENT_BASE: u32 = 100;

    /// The word of `f` and the digits word of its shortest float64 form.
    fn of(f: f32) -> Option<(Float32, u64)> {
        let near = Near::of(f)?;
        let (digits, length) = near.shortest();
        let how = match length {
            17 => digits - near.d17,
            16 => 2 + digits - near.d17 / 10,
            15 => 4 + digits - near.d17 / 100,
            _ => 6,
        };
        let bits = f.to_bits();
        let code = ((bits >> 23) & 0xff).checked_sub(Self::EXPONENT_BASE)?;
        let w = bits & 0x8000_0000 | (how as u32) << 28 | code << 23 | bits & 0x7f_ffff;
        Some((Float32(w), near.word(digits)))
    }

    /// Writes its number at `at`; where it ends. `None` for a word of no
    /// number.
    ///
    /// Where it ends is known from the sign, the zeros and `how` alone,
    /// before the digits are: the next number's writing need not wait for
    /// this one's arithmetic (~40 cycles of dependent steps).
    #[inline(always)]
    fn write(&self, out: &mut [u8], mut at: usize) -> Option<usize> {
        let w = self.0;
        let code = (w >> 23) & 31;
        let bits = w & 0x8000_0000 | (code + Self::EXPONENT_BASE) << 23 | w & 0x7f_ffff;
        let near = Near::of(f32::from_bits(bits))?;
        let how = (w >> 28) & 7;
        let (digits, length) = match how {
            // No branch on which: most numbers are one of these, about
            // half with 17 digits and half with 16.
            0..=5 => {
                let (tenth, hundredth) = (near.d17 / 10, near.d17 / 100);
                let dropped = how >> 1;
                let digits = match dropped {
                    0 => near.d17,
                    1 => tenth,
                    _ => hundredth,
                } + u64::from(how & 1);
                (digits, 17 - dropped as usize)
            }
            6 => near.shortest(),
            _ => return None,
        };
        *out.get_mut(at)? = b'-';
        at += usize::from(near.negative);
        if length < 16 {
            let (top, mid, lo) = (digits / (E8 * E8), digits / E8 % E8, digits % E8);
            return decimal(out, at, false, near.zeros, top, mid, lo);
        }
        // `0.` and up to 6 zeros, of which `zeros` are kept.
        put8(out, at, u64::from_le_bytes(*b"0.000000"))?;
        at += 2 + near.zeros;
        // A first digit, kept only with 17.
        *out.get_mut(at)? = b'0' + (digits / (E8 * E8)) as u8;
        let after = at + length - 16;
        put8(out, after, ascii8((digits / E8 % E8) as u32))?;
        put8(out, after + 8, ascii8((digits % E8) as u32))?;
        Some(at + length)
    }
}

/// A float32's float64 scaled to 17 digits before the point: `d17`, then
/// `s` bits of fraction. The float64 is `m·2^e` (`m` the float32's 24-bit
/// significand; its float64 significand `m·2^29` is even, so both ends of
/// the interval that reads back as it are in it). Scaled by `10^q`, it is
/// `t = m·5^q / 2^s` exactly: one 128-bit product, the point `s` bits from
/// its end.
struct Near {
    d17: u64,
    t: u128,
    s: u32,
    q: usize,
    power_of_two: bool,
    zeros: usize,
    negative: bool,
}

/// For each float32 exponent (biased, 0-255): the zeros after `0.` of the
/// numbers at the top of its binade, and the power of ten inside the
/// binade below which there is one more (0 when none is). A binade spans a
/// factor of 2, so it holds at most one power of ten. (No float32 lies
/// between a power of ten and its nearest float64, so comparing with the
/// float64 is exact.)
const ZEROS_BY_EXPONENT: [(u8, f64); 256] = {
    let powers = [0.1, 0.01, 1e-3, 1e-4, 1e-5, 1e-6];
    let mut t = [(0u8, 0.0f64); 256];
    let mut b = 1;
    while b < 255 {
        // The binade [2^(b-127), 2^(b-126)).
        let low = f64::from_bits(((b + 1023 - 127) as u64) << 52);
        let high = 2.0 * low;
        let mut k = 0;
        while k < powers.len() {
            if powers[k] >= high {
                t[b].0 += 1;
            } else if powers[k] > low {
                t[b].1 = powers[k];
            }
            k += 1;
        }
        b += 1;
    }
    t
};

impl Near {
    /// `f` scaled, for |f| in [1e-7, 1).
    #[inline(always)]
    fn of(f: f32) -> Option<Near> {
        let bits = f.to_bits();
        let a = f64::from(f.abs());
        if !(1e-7..1.0).contains(&a) {
            return None;
        }
        let exponent = ((bits >> 23) & 0xff) as usize;
        // `a` in [10^(-zeros-1), 10^-zeros).
        let (zeros, power) = ZEROS_BY_EXPONENT[exponent];
        let zeros = usize::from(zeros) + usize::from(a < power);
        let m = u64::from(bits & 0x7f_ffff | 0x80_0000);
        let q = 17 + zeros;
        // 7 to 24 for |f| in [1e-7, 1).
        let s = u32::try_from(150 - exponent as i32 - q as i32)
            .ok()
            .filter(|s| (1..=40).contains(s))?;
        let t = u128::from(m) * u128::from(*POW5.get(q)?);
        let d17 = (t >> s) as u64;
        if !(POW10[16]..POW10[17]).contains(&d17) {
            return None;
        }
        Some(Near {
            d17,
            t,
            s,
            q,
            power_of_two: m == 1 << 23,
            zeros,
            negative: bits >> 31 != 0,
        })
    }

    /// The digits of the shortest float64 form (the fewest that read back
    /// as it, the nearest of those, the even one of two as near), and how
    /// many. Each digit dropped from the end while the nearer of the two
    /// rounded values is still in the interval makes it one digit shorter.
    fn shortest(&self) -> (u64, usize) {
        // A value with an exact form of 15 digits or fewer (a short
        // dyadic fraction, e.g. `0.12109375`) prints as that: every shorter
        // candidate is at least 100 units of the 17th digit away, and the
        // interval is at most ~11 of them either side.
        let frac = self.t & ((1u128 << self.s) - 1);
        if frac == 0 {
            let (mut digits, mut length) = (self.d17, 17);
            while digits.is_multiple_of(10) {
                digits /= 10;
                length -= 1;
            }
            if length <= 15 {
                return (digits, length);
            }
        }
        let interval = Interval {
            d17: self.d17,
            frac,
            s: self.s,
            half: u128::from(POW5[self.q]),
            power_of_two: self.power_of_two,
        };
        // 17 digits always read back: the nearer of the two.
        let half_unit = 1u128 << (self.s - 1);
        let up = frac > half_unit || (frac == half_unit && self.d17 % 2 == 1);
        let mut best = (self.d17 + u64::from(up), 17);
        // Most numbers print with 16 or 17 digits: the first two lengths
        // with constant divisors, the rest (values with short exact forms)
        // after.
        if let Some(b) = interval.rounded(10) {
            best = (b, 16);
            if let Some(b) = interval.rounded(100) {
                best = (b, 15);
                for (j, &p) in POW10.iter().enumerate().take(17).skip(3) {
                    let Some(b) = interval.rounded(p) else { break };
                    best = (b, 17 - j);
                }
            }
        }
        best
    }

    /// The digits word of these digits (of the shortest form).
    fn word(&self, digits: u64) -> u64 {
        let (top, mid, lo) = (digits / (E8 * E8), digits / E8 % E8, digits % E8);
        lo | mid << EIGHT_BITS
            | top << TOP_SHIFT
            | (self.zeros as u64) << ZEROS_SHIFT
            | if self.negative { NEGATIVE } else { 0 }
    }
}

/// The interval that reads back as a [`Near`]'s float64: `half` = `5^q`
/// either side of it in units of `2^-(s+30)` (half of that below when the
/// significand is a power of two: the float64 below it is nearer).
struct Interval {
    d17: u64,
    frac: u128,
    s: u32,
    half: u128,
    power_of_two: bool,
}

impl Interval {
    /// The nearer of the two multiples of `p` around the value (the even
    /// one of two as near), divided by `p`, if it is in the interval.
    #[inline(always)]
    fn rounded(&self, p: u64) -> Option<u64> {
        let q = self.d17 / p;
        let r = self.d17 - q * p;
        // Distances to q·p and (q+1)·p.
        let below = ((u128::from(r) << self.s) | self.frac) << 30;
        let above = (u128::from(p) << (self.s + 30)) - below;
        let below_in = if self.power_of_two {
            2 * below <= self.half
        } else {
            below <= self.half
        };
        let above_in = above <= self.half;
        match (below_in, above_in) {
            (true, true) if below < above || (below == above && q.is_multiple_of(2)) => Some(q),
            (true, false) => Some(q),
            (_, true) => Some(q + 1),
            (false, false) => None,
        }
    }
}

/// The digits word of float32 `f` printed in its shortest float64 form,
/// for `f` of the usual shape (see [`Float32`]).
#[cfg(test)]
fn float32_digits(f: f32) -> Option<u64> {
    Float32::of(f).map(|(_, digits)| digits)
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
/// ends.
fn number(out: &mut [u8], at: usize, w: u64) -> Option<usize> {
    let lo = w & EIGHT_MASK;
    let mid = (w >> EIGHT_BITS) & EIGHT_MASK;
    let top = (w >> TOP_SHIFT) & 0xf;
    let zeros = ((w >> ZEROS_SHIFT) & u64::from(MAX_ZEROS)) as usize;
    decimal(out, at, w & NEGATIVE != 0, zeros, top, mid, lo)
}

/// Writes `-`, `0.`, `zeros` zeros and the digits `top`, `mid` (eight),
/// `lo` (eight) without their leading zeros at `at`; where it ends. Every
/// write is of a fixed size: 8 bytes at a time, the ones past the
/// number's end overwritten by what follows.
#[inline(always)]
fn decimal(
    out: &mut [u8],
    mut at: usize,
    negative: bool,
    zeros: usize,
    top: u64,
    mid: u64,
    lo: u64,
) -> Option<usize> {
    if lo >= E8 || mid >= E8 || top > 9 {
        return None;
    }
    // Half the numbers are negative and half have 17 digits: no branches
    // on either, a `-` or a first digit is written and kept or not.
    *out.get_mut(at)? = b'-';
    at += usize::from(negative);
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

    /// `d` as a Redis value holds it (after the prefix).
    fn encoded(d: &Digits) -> Vec<u8> {
        let mut value = Vec::new();
        d.encode(&mut value);
        value
    }

    /// Encodes `d` and decodes it again; the text it then gives.
    fn through_redis(d: &Digits) -> Bytes {
        let value = encoded(d);
        let (back, text) = Digits::decode(&value, d.kind()).expect("decodes");
        assert_eq!(back.text(), Some(text.clone()));
        text
    }

    #[test]
    fn dashscope_vectors_round_trip_in_6_or_12_kib() {
        for (kind, bytes) in [(Words::Float32, 6_144), (Words::Digits, 12_288)] {
            for seed in 0..20 {
                for small in [false, true] {
                    let text = vector(seed, small);
                    let d = Digits::of(&text, kind).expect("taken");
                    assert_eq!(d.kind(), kind);
                    assert_eq!(d.text().as_deref(), Some(&text[..]));
                    assert_eq!(d.words.len(), bytes);
                    assert!(d.allocated() <= bytes + 160, "{}", d.allocated());
                    assert_eq!(d.len(), text.len() as u64);
                    assert_eq!(d.crc(), crc32fast::hash(&text));
                    assert_eq!(&through_redis(&d)[..], &text[..]);
                }
            }
        }
        // The smallest form of a DashScope vector is float32.
        let d = Digits::smallest(&vector(1, true), Words::Float32).unwrap();
        assert_eq!(d.kind(), Words::Float32);
        let d = Digits::smallest(&vector(1, true), Words::Digits).unwrap();
        assert_eq!(d.kind(), Words::Digits);
    }

    /// A list of `n` numbers: `other(i)` where it gives one, else the
    /// DashScope-like `usual(i)`; separated by `sep`.
    fn list(
        n: usize,
        sep: &str,
        usual: impl Fn(usize) -> String,
        other: impl Fn(usize) -> Option<&'static str>,
    ) -> String {
        let mut s = String::from("[ ");
        for i in 0..n {
            match other(i) {
                Some(o) => s.push_str(o),
                None => s.push_str(&usual(i)),
            }
            s.push_str(if i + 1 < n { sep } else { " ]\n" });
        }
        s
    }

    #[test]
    fn other_shapes_are_kept_or_refused() {
        let digits_like = |_| "-0.12345678901234567".to_string();
        // Spaces, other numbers kept as they were, a shape of each kind;
        // 80 numbers of other shapes: too many to keep.
        let many = list(200, " , ", digits_like, |i| match i % 10 {
            0 => Some("1.5e-05"),
            1 => Some("-0.0000000012"),
            2 => Some("0"),
            3 => Some("-0.0"),
            _ => None,
        });
        assert!(Digits::of(many.as_bytes(), Words::Digits).is_none());
        let few = list(200, " , ", digits_like, |i| match i {
            3 => Some("1.5e-05"),
            7 => Some("-0.0000000012"),
            9 => Some("0"),
            11 => Some("-0.0"),
            12 => Some("0.10"),
            13 => Some("0.123456789012345678"),
            _ => None,
        });
        let d = Digits::of(few.as_bytes(), Words::Digits).expect("taken");
        assert_eq!(d.text().as_deref(), Some(few.as_bytes()));
        assert_eq!(&through_redis(&d)[..], few.as_bytes());
        // Not float32 values: no float32 form; the smallest is digits.
        assert!(Digits::of(few.as_bytes(), Words::Float32).is_none());
        let d = Digits::smallest(few.as_bytes(), Words::Float32).expect("taken");
        assert_eq!(d.kind(), Words::Digits);
        for kind in [Words::Float32, Words::Digits] {
            for refused in [
                &b"[0.1,0.2, 0.3]"[..],
                b"[0.1,0.2,\"x\"]",
                b"{\"a\":1}",
                b"[]",
                b"[0.1,,0.2]",
            ] {
                assert!(
                    Digits::of(refused, kind).is_none(),
                    "{}",
                    String::from_utf8_lossy(refused)
                );
            }
        }
    }

    #[test]
    fn float32_words_keep_what_prints_otherwise() {
        // Float32 values in shortest float64 form (serde_json's), and
        // numbers that are not (Python's form of 2^-23, a value that is
        // not a float32, zeros, a trailing zero): those are kept as they
        // were.
        let value = |i: usize| {
            let f = ((i as f32) * 0.618_034).fract() - 0.5;
            serde_json::to_string(&f64::from(f)).unwrap()
        };
        let text = list(1536, ", ", value, |i| match i {
            0 => Some("1.1920928955078125e-07"),
            5 => Some("1e-05"),
            6 => Some("-0.0"),
            7 => Some("0.0"),
            9 => Some("0"),
            10 => Some("0.10"),
            11 => Some("0.1"),
            12 => Some("-0.12345678901234567"),
            1535 => Some("0.5"),
            _ => None,
        });
        let d = Digits::of(text.as_bytes(), Words::Float32).expect("taken");
        assert_eq!(d.text().as_deref(), Some(text.as_bytes()));
        assert_eq!(&through_redis(&d)[..], text.as_bytes());
        // `0.5` is a float32 word; eight numbers are kept.
        assert_eq!(d.verbatim_ends.len(), 8);
        assert_eq!(d.words.len(), 1536 * 4);
    }

    /// Every float32 of the usual shape, sampled (a fixed stride through
    /// the bit patterns, and the powers of two), prints as serde_json's
    /// shortest float64 form (ryu) prints it.
    #[test]
    fn float32_digits_are_the_shortest_float64_form() {
        let mut text = Vec::with_capacity(32);
        let mut checked = 0;
        let mut check = |f: f32| {
            let Some(w) = float32_digits(f) else {
                let a = f.abs();
                assert!(!(1e-7..1.0).contains(&a), "{f:e} refused");
                return;
            };
            text.clear();
            text.resize(40, 0);
            let end = number(&mut text, 0, w).unwrap();
            // The kept word writes the same.
            let (kept, _) = Float32::of(f).unwrap();
            let mut again = [0u8; 40];
            let end_again = kept.write(&mut again, 0).unwrap();
            assert_eq!(&again[..end_again], &text[..end], "{:#x}", f.to_bits());
            let ours = std::str::from_utf8(&text[..end]).unwrap();
            let theirs = serde_json::to_string(&f64::from(f)).unwrap();
            // ryu writes below 1e-5 with an exponent: compare the values.
            if f.abs() >= 1e-5 {
                assert_eq!(ours, theirs, "{:#x}", f.to_bits());
            } else {
                assert_eq!(ours.parse::<f64>().unwrap(), f64::from(f), "{ours}");
                assert!(ours.len() <= theirs.len() + 6, "{ours} {theirs}");
            }
            checked += 1;
        };
        for bits in (0..0x8000_0000u32).step_by(331) {
            check(f32::from_bits(bits));
            check(-f32::from_bits(bits));
        }
        // Short dyadic fractions (exact forms of 15 digits or fewer), as
        // the fake's short floats are.
        for k in 0..65_536 {
            check(k as f32 / 65_536.0 - 0.5);
        }
        for p in 1..=24 {
            check(0.5f32.powi(p));
            check(f32::from_bits(0.5f32.powi(p).to_bits() - 1));
            check(f32::from_bits(0.5f32.powi(p).to_bits() + 1));
        }
        assert!(checked > 1_000_000, "{checked}");
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
        for kind in [Words::Float32, Words::Digits] {
            let d = Digits::of(&text, kind).unwrap();
            let value = encoded(&d);
            for cut in [0, 5, 20, value.len() - 1] {
                assert!(
                    Digits::decode(&value[..cut], kind).is_none(),
                    "cut at {cut}"
                );
            }
            let mut flipped = value.clone();
            let last = flipped.len() - 3;
            flipped[last] ^= 1;
            assert!(Digits::decode(&flipped, kind).is_none());
            // A float32 word of no number: an exponent code out of range,
            // an unknown way to round, a kept number's index out of range.
            for bad in [0x0000_0000u32, 0x7000_0000 | 20 << 23, 31 << 23 | 1000] {
                let mut broken = value.clone();
                let at = broken.len() - 4;
                broken[at..].copy_from_slice(&bad.to_le_bytes());
                assert!(Digits::decode(&broken, Words::Float32).is_none());
            }
        }
        // Words of any bits (a damaged value whose header still reads)
        // are refused, never a panic.
        let d = Digits::of(&text, Words::Float32).unwrap();
        let value = encoded(&d);
        let words_at = value.len() - 1536 * 4;
        let mut x = 0x9e37_79b9u32;
        for round in 0..200 {
            let mut broken = value.clone();
            for w in broken[words_at..].chunks_exact_mut(4) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                // Half the rounds keep most words whole.
                if round % 2 == 0 || x.is_multiple_of(7) {
                    w.copy_from_slice(&x.to_le_bytes());
                }
            }
            assert!(Digits::decode(&broken, Words::Float32).is_none());
            assert!(Digits::decode(&broken[..words_at + 1536 * 4], Words::Digits).is_none());
        }
        // A value of one kind does not read as the other.
        let d = Digits::of(&text, Words::Float32).unwrap();
        let value = encoded(&d);
        assert!(Digits::decode(&value, Words::Digits).is_none());
    }

    /// Cost of writing the text again, against inflating DEFLATE (run with
    /// `--ignored --nocapture` in release).
    #[test]
    #[ignore]
    fn write_cost() {
        let text = vector(3, false);
        let n = 2000;
        for kind in [Words::Float32, Words::Digits] {
            let d = Digits::of(&text, kind).unwrap();
            let t = std::time::Instant::now();
            for _ in 0..n {
                std::hint::black_box(d.text());
            }
            let write = t.elapsed() / n;
            let t = std::time::Instant::now();
            for _ in 0..200 {
                std::hint::black_box(Digits::of(&text, kind));
            }
            let make = t.elapsed() / 200;
            println!(
                "{kind:?}: {} B, write {write:?}, make {make:?}",
                d.allocated()
            );
        }
        let c = crate::gzip::Precompressed::of(&text).unwrap();
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(c.inflate());
        }
        let inflate = t.elapsed() / n;
        println!("deflate: {} B, inflate {inflate:?}", c.size());
    }
}
