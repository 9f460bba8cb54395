//! Just enough Hessian 2.0 for the proxy: read the strings, ints and
//! string maps that carry a Dubbo request's header fields and attachments,
//! skip any other value (arguments stay untouched), and write strings,
//! ints, null and string maps for error replies.
//!
//! Every read is bounded by the input slice; a count or length larger than
//! what remains is an error, never an allocation. Nesting is limited to
//! [`MAX_DEPTH`].

use bytes::{BufMut, BytesMut};

/// The deepest nesting of lists, maps and objects accepted.
pub const MAX_DEPTH: usize = 64;

/// Why a value could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HessianError(pub String);

impl std::fmt::Display for HessianError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "hessian2: {}", self.0)
    }
}

impl std::error::Error for HessianError {}

type HResult<T> = Result<T, HessianError>;

fn err<T>(m: impl Into<String>) -> HResult<T> {
    Err(HessianError(m.into()))
}

/// A reader over one serialized body. Class definitions seen so far are
/// remembered (by field count) so objects that use them can be skipped.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    classes: Vec<usize>,
    types: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader {
            buf,
            pos: 0,
            classes: Vec::new(),
            types: 0,
        }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// True when every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn take(&mut self, n: usize) -> HResult<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return err(format!(
                "value needs {n} bytes, {} left",
                self.buf.len() - self.pos
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> HResult<u8> {
        Ok(self.take(1)?[0])
    }

    /// Consumes `n` raw bytes.
    pub fn read_raw(&mut self, n: usize) -> HResult<&'a [u8]> {
        self.take(n)
    }

    /// Consumes one byte (a tag the caller has already looked at).
    pub fn next_byte(&mut self) -> HResult<u8> {
        self.u8()
    }

    /// The next tag without consuming it.
    pub fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    /// Reads an int (any int encoding).
    pub fn read_int(&mut self) -> HResult<i32> {
        let b = self.u8()?;
        Ok(match b {
            0x80..=0xbf => i32::from(b) - 0x90,
            0xc0..=0xcf => ((i32::from(b) - 0xc8) << 8) | i32::from(self.u8()?),
            0xd0..=0xd7 => {
                let s = self.take(2)?;
                ((i32::from(b) - 0xd4) << 16) | (i32::from(s[0]) << 8) | i32::from(s[1])
            }
            b'I' => {
                let s = self.take(4)?;
                i32::from_be_bytes([s[0], s[1], s[2], s[3]])
            }
            _ => return err(format!("expected an int, found tag {b:#04x}")),
        })
    }

    /// Skips `chars` UTF-8 characters (Hessian counts string lengths in
    /// UTF-16 units; a 4-byte sequence counts as two).
    fn skip_chars(&mut self, chars: usize) -> HResult<&'a [u8]> {
        let start = self.pos;
        let mut left = chars;
        while left > 0 {
            let b = self.u8()?;
            let (extra, units) = match b {
                0x00..=0x7f => (0, 1),
                0xc0..=0xdf => (1, 1),
                0xe0..=0xef => (2, 1),
                0xf0..=0xf7 => (3, 2),
                _ => return err("invalid UTF-8 in a string"),
            };
            self.take(extra)?;
            left = left.saturating_sub(units);
        }
        Ok(&self.buf[start..self.pos])
    }

    /// The length in UTF-16 units of the string chunk tagged `b`, and
    /// whether it is the last chunk.
    fn string_chunk(&mut self, b: u8) -> HResult<(usize, bool)> {
        Ok(match b {
            0x00..=0x1f => (usize::from(b), true),
            0x30..=0x33 => ((usize::from(b - 0x30) << 8) | usize::from(self.u8()?), true),
            b'S' | b'R' | b's' => {
                let s = self.take(2)?;
                (usize::from(u16::from_be_bytes([s[0], s[1]])), b == b'S')
            }
            _ => return err(format!("expected a string, found tag {b:#04x}")),
        })
    }

    /// Skips a string without copying it.
    fn skip_string(&mut self) -> HResult<()> {
        loop {
            let b = self.u8()?;
            let (len, last) = self.string_chunk(b)?;
            // ASCII fast path: `len` units are `len` bytes when all ASCII.
            let rest = &self.buf[self.pos..];
            if rest.len() >= len && rest[..len].is_ascii() {
                self.pos += len;
            } else {
                self.skip_chars(len)?;
            }
            if last {
                return Ok(());
            }
        }
    }

    /// Reads a string; `None` for null.
    pub fn read_string(&mut self) -> HResult<Option<String>> {
        let mut out = String::new();
        loop {
            let b = self.u8()?;
            let (len, last) = match b {
                b'N' if out.is_empty() => return Ok(None),
                b => self.string_chunk(b)?,
            };
            if len > self.buf.len() - self.pos {
                return err(format!(
                    "string of {len} characters is longer than its body"
                ));
            }
            let rest = &self.buf[self.pos..];
            let s = if rest.len() >= len && rest[..len].is_ascii() {
                self.pos += len;
                &rest[..len]
            } else {
                self.skip_chars(len)?
            };
            out.push_str(&String::from_utf8_lossy(s));
            if last {
                return Ok(Some(out));
            }
        }
    }

    /// Reads a map whose string keys map to string values (Dubbo
    /// attachments). Entries with other values are skipped.
    pub fn read_string_map(&mut self) -> HResult<Vec<(String, String)>> {
        let b = self.u8()?;
        match b {
            b'N' => return Ok(Vec::new()),
            b'H' => {}
            b'M' => self.skip_type()?,
            _ => return err(format!("expected a map, found tag {b:#04x}")),
        }
        let mut out = Vec::new();
        while self.peek() != Some(b'Z') {
            let key = match self.peek() {
                Some(0x00..=0x1f | 0x30..=0x33 | b'S' | b'R') => self.read_string()?,
                _ => {
                    self.skip_value(1)?;
                    None
                }
            };
            let value = match self.peek() {
                Some(0x00..=0x1f | 0x30..=0x33 | b'S' | b'R') => self.read_string()?,
                _ => {
                    self.skip_value(1)?;
                    None
                }
            };
            if let (Some(k), Some(v)) = (key, value) {
                out.push((k, v));
            }
        }
        self.u8()?;
        Ok(out)
    }

    fn skip_type(&mut self) -> HResult<()> {
        match self.peek() {
            Some(0x00..=0x1f | 0x30..=0x33 | b'S' | b'R') => {
                self.read_string()?;
                self.types += 1;
                Ok(())
            }
            Some(_) => {
                let r = self.read_int()?;
                if r < 0 || r as usize >= self.types {
                    return err(format!("type reference {r} to an undefined type"));
                }
                Ok(())
            }
            None => err("missing type"),
        }
    }

    fn count(&mut self, n: i32) -> HResult<usize> {
        if n < 0 || n as usize > self.buf.len() - self.pos {
            return err(format!("count {n} is larger than the body"));
        }
        Ok(n as usize)
    }

    /// Skips one value of any type.
    pub fn skip_value(&mut self, depth: usize) -> HResult<()> {
        if depth > MAX_DEPTH {
            return err("values nested too deeply");
        }
        let b = self.u8()?;
        match b {
            b'N' | b'T' | b'F' => {}
            0x80..=0xbf => {}
            0xc0..=0xcf => {
                self.take(1)?;
            }
            0xd0..=0xd7 => {
                self.take(2)?;
            }
            b'I' => {
                self.take(4)?;
            }
            0xd8..=0xef => {}
            0xf0..=0xff => {
                self.take(1)?;
            }
            0x38..=0x3f => {
                self.take(2)?;
            }
            0x59 => {
                self.take(4)?;
            }
            b'L' | b'D' | 0x4a => {
                self.take(8)?;
            }
            0x5b | 0x5c => {}
            0x5d => {
                self.take(1)?;
            }
            0x5e => {
                self.take(2)?;
            }
            0x5f | 0x4b => {
                self.take(4)?;
            }
            0x00..=0x1f | 0x30..=0x33 | b'S' | b'R' => {
                self.pos -= 1;
                self.skip_string()?;
            }
            0x20..=0x2f => {
                self.take(usize::from(b - 0x20))?;
            }
            0x34..=0x37 => {
                let n = (usize::from(b - 0x34) << 8) | usize::from(self.u8()?);
                self.take(n)?;
            }
            b'A' | b'B' => {
                let mut last = b == b'B';
                loop {
                    let s = self.take(2)?;
                    self.take(usize::from(u16::from_be_bytes([s[0], s[1]])))?;
                    if last {
                        break;
                    }
                    let next = self.u8()?;
                    match next {
                        b'A' => {}
                        b'B' => last = true,
                        0x20..=0x2f => {
                            self.take(usize::from(next - 0x20))?;
                            break;
                        }
                        _ => return err("bad binary chunk"),
                    }
                }
            }
            b'U' | b'W' => {
                if b == b'U' {
                    self.skip_type()?;
                }
                while self.peek() != Some(b'Z') {
                    self.skip_value(depth + 1)?;
                }
                self.take(1)?;
            }
            b'V' | b'X' => {
                if b == b'V' {
                    self.skip_type()?;
                }
                let n = self.read_int()?;
                let n = self.count(n)?;
                for _ in 0..n {
                    self.skip_value(depth + 1)?;
                }
            }
            0x70..=0x77 => {
                self.skip_type()?;
                for _ in 0..(b - 0x70) {
                    self.skip_value(depth + 1)?;
                }
            }
            0x78..=0x7f => {
                for _ in 0..(b - 0x78) {
                    self.skip_value(depth + 1)?;
                }
            }
            b'H' | b'M' => {
                if b == b'M' {
                    self.skip_type()?;
                }
                while self.peek() != Some(b'Z') {
                    self.skip_value(depth + 1)?;
                    self.skip_value(depth + 1)?;
                }
                self.take(1)?;
            }
            b'C' => {
                self.read_string()?
                    .ok_or_else(|| HessianError("class definition without a name".into()))?;
                let n = self.read_int()?;
                let n = self.count(n)?;
                for _ in 0..n {
                    self.read_string()?;
                }
                self.classes.push(n);
                // A class definition is followed by the object that uses it.
                self.skip_value(depth + 1)?;
            }
            b'O' | 0x60..=0x6f => {
                let idx = if b == b'O' {
                    let i = self.read_int()?;
                    if i < 0 {
                        return err("negative class reference");
                    }
                    i as usize
                } else {
                    usize::from(b - 0x60)
                };
                let Some(&fields) = self.classes.get(idx) else {
                    return err(format!("object of undefined class {idx}"));
                };
                for _ in 0..fields {
                    self.skip_value(depth + 1)?;
                }
            }
            b'Q' => {
                self.read_int()?;
            }
            _ => return err(format!("unknown tag {b:#04x}")),
        }
        Ok(())
    }
}

/// Hessian's length of a string: UTF-16 units.
fn utf16_len(s: &str) -> usize {
    s.chars().map(char::len_utf16).sum()
}

/// Writes a string.
pub fn write_string(dst: &mut BytesMut, s: &str) {
    let n = utf16_len(s);
    if n <= 31 {
        dst.put_u8(n as u8);
        dst.put_slice(s.as_bytes());
        return;
    }
    if n <= 1023 {
        dst.put_u8(0x30 + (n >> 8) as u8);
        dst.put_u8(n as u8);
        dst.put_slice(s.as_bytes());
        return;
    }
    // Chunks of at most 32768 units, the last one with 'S'.
    write_chunks(dst, s, b'R');
}

/// Writes a string in the Hessian 3.x draft form (no `0x30`-`0x33`
/// two-byte lengths; `s` marks a non-final chunk).
pub fn write_string_v1(dst: &mut BytesMut, s: &str) {
    if utf16_len(s) <= 31 {
        write_string(dst, s);
        return;
    }
    write_chunks(dst, s, b's');
}

/// Writes `s` in chunks of at most 32768 UTF-16 units: each but the last
/// tagged `more`, the last one tagged `S`.
fn write_chunks(dst: &mut BytesMut, s: &str, more: u8) {
    let mut rest = s;
    loop {
        let mut units = 0;
        let mut end = 0;
        for (i, c) in rest.char_indices() {
            if units + c.len_utf16() > 32768 {
                break;
            }
            units += c.len_utf16();
            end = i + c.len_utf8();
        }
        let last = end == rest.len();
        dst.put_u8(if last { b'S' } else { more });
        dst.put_u16(units as u16);
        dst.put_slice(&rest.as_bytes()[..end]);
        rest = &rest[end..];
        if last {
            return;
        }
    }
}

/// Writes an int in its shortest form.
pub fn write_int(dst: &mut BytesMut, v: i32) {
    match v {
        -16..=47 => dst.put_u8((v + 0x90) as u8),
        -2048..=2047 => {
            dst.put_u8((0xc8 + (v >> 8)) as u8);
            dst.put_u8(v as u8);
        }
        -262144..=262143 => {
            dst.put_u8((0xd4 + (v >> 16)) as u8);
            dst.put_u16(v as u16);
        }
        _ => {
            dst.put_u8(b'I');
            dst.put_i32(v);
        }
    }
}

/// Writes null.
pub fn write_null(dst: &mut BytesMut) {
    dst.put_u8(b'N');
}

/// Writes an untyped map of strings.
pub fn write_string_map(dst: &mut BytesMut, entries: &[(String, String)]) {
    dst.put_u8(b'H');
    for (k, v) in entries {
        write_string(dst, k);
        write_string(dst, v);
    }
    dst.put_u8(b'Z');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip_at_every_length_class() {
        for n in [0, 5, 31, 32, 1023, 1024, 40000, 70000] {
            let s: String = "é".repeat(n);
            let mut b = BytesMut::new();
            write_string(&mut b, &s);
            let mut r = Reader::new(&b);
            assert_eq!(r.read_string().unwrap().as_deref(), Some(s.as_str()), "{n}");
            assert!(r.is_empty());
        }
    }

    #[test]
    fn ints_round_trip() {
        for v in [
            0,
            -16,
            47,
            48,
            -2048,
            2047,
            2048,
            -262144,
            262143,
            262144,
            i32::MIN,
            i32::MAX,
        ] {
            let mut b = BytesMut::new();
            write_int(&mut b, v);
            assert_eq!(Reader::new(&b).read_int().unwrap(), v);
        }
    }

    #[test]
    fn objects_lists_and_maps_are_skipped() {
        // C "Pt" 2 fields "x" "y", O 0 ints 1 2; then untyped fixed list [1, "a"]
        let mut b = BytesMut::new();
        b.put_u8(b'C');
        write_string(&mut b, "Pt");
        write_int(&mut b, 2);
        write_string(&mut b, "x");
        write_string(&mut b, "y");
        b.put_u8(0x60);
        write_int(&mut b, 1);
        write_int(&mut b, 2);
        b.put_u8(0x7a);
        write_int(&mut b, 1);
        write_string(&mut b, "a");
        write_string_map(&mut b, &[("k".into(), "v".into())]);
        let mut r = Reader::new(&b);
        r.skip_value(0).unwrap();
        r.skip_value(0).unwrap();
        assert_eq!(
            r.read_string_map().unwrap(),
            vec![("k".to_string(), "v".to_string())]
        );
        assert!(r.is_empty());
    }

    #[test]
    fn lying_counts_are_errors() {
        let b = [b'X', b'I', 0x7f, 0xff, 0xff, 0xff];
        assert!(Reader::new(&b).skip_value(0).is_err());
        let deep = vec![0x79u8; 1000];
        assert!(Reader::new(&deep).skip_value(0).is_err());
    }
}
