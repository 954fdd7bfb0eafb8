//! Short texts compared in place: the evaluator compares attribute names, variant names,
//! environments and rule literals of a few bytes on every decision, where a call to the C
//! library's `memcmp` costs more than the comparison itself.

/// The first 8 bytes of `b` (at least 8 long), little-endian.
#[inline(always)]
fn word(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_le_bytes(w)
}

/// The first 4 bytes of `b` (at least 4 long).
#[inline(always)]
fn half(b: &[u8]) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[..4]);
    u32::from_le_bytes(w)
}

/// Whether `a` and `b` hold the same bytes. Up to 16 bytes, two overlapping loads from each
/// end; longer texts by the library.
#[inline]
pub fn same(a: &str, b: &str) -> bool {
    same_bytes(a.as_bytes(), b.as_bytes())
}

#[inline]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        0 => true,
        1..=3 => a.iter().zip(b).all(|(x, y)| x == y),
        4..=7 => half(a) == half(b) && half(&a[n - 4..]) == half(&b[n - 4..]),
        8..=16 => word(a) == word(b) && word(&a[n - 8..]) == word(&b[n - 8..]),
        _ => a == b,
    }
}

/// `s.ends_with(suffix)`, compared in place (as bytes: the end of `s` need not fall on a
/// character boundary).
#[inline]
pub fn ends_with(s: &str, suffix: &str) -> bool {
    let (s, suffix) = (s.as_bytes(), suffix.as_bytes());
    s.len() >= suffix.len() && same_bytes(&s[s.len() - suffix.len()..], suffix)
}

/// `s.starts_with(prefix)`, compared in place (as bytes).
#[inline]
pub fn starts_with(s: &str, prefix: &str) -> bool {
    let (s, prefix) = (s.as_bytes(), prefix.as_bytes());
    s.len() >= prefix.len() && same_bytes(&s[..prefix.len()], prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length up to 40, equal and differing in each single byte position.
    #[test]
    fn same_is_equality() {
        for n in 0..40 {
            let a: String = (0..n).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
            assert!(same(&a, &a.clone()), "{n}");
            assert!(!same(&a, &format!("{a}x")), "{n}");
            for i in 0..n {
                let mut b = a.clone().into_bytes();
                b[i] = b'Z';
                let b = String::from_utf8(b).unwrap();
                assert!(!same(&a, &b), "{n} at {i}");
                assert_eq!(ends_with(&a, &b[i..]), a.ends_with(&b[i..]));
                assert_eq!(starts_with(&a, &b[..=i]), a.starts_with(&b[..=i]));
            }
        }
        // Where the other text's length falls inside a character of this one.
        for (s, affix) in [("é", "x"), ("aé", "©"), ("€uro", "ab"), ("x€", "€")] {
            assert_eq!(ends_with(s, affix), s.ends_with(affix), "{s} {affix}");
            assert_eq!(starts_with(s, affix), s.starts_with(affix), "{s} {affix}");
        }
    }
}
