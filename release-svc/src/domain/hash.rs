//! Stable hashing for percentage rollouts (and, in `rules`, flagd's `fractional`).
//!
//! MurmurHash3 (x86, 32-bit, seed 0) is what flagd uses. A percentage rollout is decided
//! as flagd's `fractional` decides (see [`in_rollout`]), so it can be expressed in flagd's
//! rule language for in-process providers; a key inside at 10% is inside at every larger
//! percentage (monotone), with 0.01% granularity.

use super::rules::Bucketing;

/// MurmurHash3 x86 32-bit.
pub fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    let mut h = Murmur3::new(seed);
    h.write(data);
    h.finish()
}

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

/// MurmurHash3 x86 32-bit over input given in pieces: the hash of their concatenation,
/// without building it (a rollout hashes `feature`, `/` and the key on every decision).
/// A state can be kept and copied: input that always starts the same is hashed once.
#[derive(Debug, Clone, PartialEq)]
pub struct Murmur3 {
    h: u32,
    /// The bytes of an unfinished 4-byte block, little-endian, and how many.
    carry: u32,
    carried: u32,
    len: usize,
}

impl Murmur3 {
    /// A hash with `seed`.
    pub fn new(seed: u32) -> Self {
        Self {
            h: seed,
            carry: 0,
            carried: 0,
            len: 0,
        }
    }

    #[inline]
    fn block(&mut self, b: u32) {
        let k = b.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        self.h ^= k;
        self.h = self
            .h
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64);
    }

    /// Adds one byte to the unfinished block (a block once it holds four).
    #[inline]
    fn byte(&mut self, b: u8) {
        self.carry |= u32::from(b) << (8 * self.carried);
        self.carried += 1;
        if self.carried == 4 {
            self.block(self.carry);
            self.carry = 0;
            self.carried = 0;
        }
    }

    /// Adds `data` to the input.
    pub fn write(&mut self, mut data: &[u8]) {
        self.len = self.len.wrapping_add(data.len());
        while self.carried > 0 {
            let Some((first, rest)) = data.split_first() else {
                return;
            };
            self.byte(*first);
            data = rest;
        }
        let chunks = data.chunks_exact(4);
        let tail = chunks.remainder();
        for c in chunks {
            self.block(u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        }
        for b in tail {
            self.byte(*b);
        }
    }

    /// The hash of everything written.
    pub fn finish(&self) -> u32 {
        let mut h = self.h;
        if self.carried > 0 {
            h ^= self.carry.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        }
        // The length is mixed in modulo 2^32, as in the reference implementation.
        h ^= u32::try_from(self.len & 0xffff_ffff).unwrap_or(0);
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^= h >> 16;
        h
    }
}

/// The total weight a rollout is split into: basis points, so percentages have 0.01%
/// granularity.
pub const ROLLOUT_TOTAL: u32 = 10_000;

/// A percentage (clamped to 0-100) in basis points of [`ROLLOUT_TOTAL`].
pub fn basis_points(percent: f64) -> u32 {
    // The cast is exact for 0..=10_000.
    (percent.clamp(0.0, 100.0) * 100.0).round() as u32
}

/// The text a rollout hashes for a feature and a targeting key: `"{feature}/{key}"`.
pub fn rollout_input(feature: &str, targeting_key: &str) -> String {
    format!("{feature}/{targeting_key}")
}

/// Whether `targeting_key` is inside a rollout of `percent` of `feature`.
///
/// The decision is exactly that of flagd's `fractional` under `bucketing`, bucketing by
/// the text [`rollout_input`] into `[["in", t], ["out", 10_000 - t]]` with `t` the
/// percentage in basis points, so the rollout can be written in flagd's rule language and
/// an in-process provider of that generation reaches the same answer bit for bit (see
/// `flagd_doc::render_decisions`). A key's position does not depend on the percentage,
/// so a key inside at 10% is inside at every larger percentage.
pub fn in_rollout(bucketing: Bucketing, feature: &str, targeting_key: &str, percent: f64) -> bool {
    in_rollout_points(bucketing, feature, targeting_key, basis_points(percent))
}

/// [`in_rollout`] of a percentage already in basis points ([`basis_points`]).
pub fn in_rollout_points(
    bucketing: Bucketing,
    feature: &str,
    targeting_key: &str,
    threshold: u32,
) -> bool {
    let mut hasher = Murmur3::new(0);
    if bucketing == Bucketing::V3 {
        let (head, used) = cbor_text_head(feature.len() + 1 + targeting_key.len());
        hasher.write(&head[..used]);
    }
    hasher.write(feature.as_bytes());
    hasher.write(b"/");
    hasher.write(targeting_key.as_bytes());
    let hash = hasher.finish();
    match bucketing {
        // flagd up to 0.14: `abs(h as i32) / i32::MAX * 100` against the cumulative
        // percentage `t * 100 / total`.
        Bucketing::V1 => {
            let signed = i32::from_ne_bytes(hash.to_ne_bytes());
            let position = (f64::from(signed).abs() / f64::from(i32::MAX)) * 100.0;
            position < f64::from(threshold) * 100.0 / f64::from(ROLLOUT_TOTAL)
        }
        // `(h * total) >> 32` against the cumulative weight `t`.
        Bucketing::V2 | Bucketing::V3 => {
            (u64::from(hash) * u64::from(ROLLOUT_TOTAL)) >> 32 < u64::from(threshold)
        }
    }
}

/// The CBOR head of a text string of `len` bytes (RFC 8949: major type 3, shortest form).
fn cbor_text_head(len: usize) -> ([u8; 9], usize) {
    let mut out = [0u8; 9];
    let n = len as u64;
    let used = match n {
        0..=23 => {
            out[0] = 0x60 | n as u8;
            1
        }
        24..=0xff => {
            out[..2].copy_from_slice(&[0x78, n as u8]);
            2
        }
        0x100..=0xffff => {
            out[0] = 0x79;
            out[1..3].copy_from_slice(&(n as u16).to_be_bytes());
            3
        }
        0x1_0000..=0xffff_ffff => {
            out[0] = 0x7a;
            out[1..5].copy_from_slice(&(n as u32).to_be_bytes());
            5
        }
        _ => {
            out[0] = 0x7b;
            out[1..9].copy_from_slice(&n.to_be_bytes());
            9
        }
    };
    (out, used)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written in pieces, at every split (blocks straddling pieces, empty pieces), the hash
    /// is that of the whole.
    #[test]
    fn murmur3_in_pieces_is_murmur3_of_the_whole() {
        let text: Vec<u8> = (0u8..23)
            .map(|i| i.wrapping_mul(37).wrapping_add(5))
            .collect();
        for len in 0..text.len() {
            let whole = &text[..len];
            for a in 0..=len {
                for b in a..=len {
                    let mut h = Murmur3::new(7);
                    h.write(&whole[..a]);
                    h.write(&[]);
                    h.write(&whole[a..b]);
                    h.write(&whole[b..]);
                    assert_eq!(h.finish(), murmur3_32(whole, 7), "{len} split at {a}, {b}");
                }
            }
        }
    }

    #[test]
    fn murmur3_reference_vectors() {
        assert_eq!(murmur3_32(b"", 0), 0);
        assert_eq!(murmur3_32(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_32(b"hello", 0), 0x248b_fa47);
        assert_eq!(
            murmur3_32(b"The quick brown fox jumps over the lazy dog", 0),
            0x2e4f_f723
        );
    }

    /// The smallest percentage, in basis points, at which the key is inside.
    fn entry_point(bucketing: Bucketing, feature: &str, key: &str) -> u32 {
        (0..=ROLLOUT_TOTAL)
            .find(|t| in_rollout(bucketing, feature, key, f64::from(*t) / 100.0))
            .expect("every key is inside at 100%")
    }

    /// Who is inside a rollout is a promise to users: the same key keeps its place across
    /// releases of release-svc. These values were computed with an independent
    /// implementation (Python's `mmh3` and `cbor2`, the libraries the flagd Python
    /// provider buckets with) for each `fractional` generation; they must never change.
    /// A change here re-buckets every user of every running rollout.
    #[test]
    fn rollout_entry_points_never_change() {
        let long = "x".repeat(300);
        let pinned: [(&str, &str, u32, u32, u32); 12] = [
            ("checkout", "user-42", 9304, 4652, 5866),
            ("checkout", "user-1", 3915, 1958, 2921),
            ("checkout", "alice", 9958, 5022, 5983),
            ("new-cart", "u1", 9566, 4783, 2765),
            ("new-cart", "bob", 5044, 7479, 5820),
            ("banner", "user-0", 9876, 4938, 3876),
            ("banner", "user-1999", 5141, 7430, 9571),
            ("search", "", 718, 9642, 5370),
            (
                "dark-mode",
                "\u{fc}n\u{ef}c\u{f8}d\u{e9}-\u{43a}\u{43b}\u{44e}\u{447}",
                1055,
                9473,
                2388,
            ),
            // Longer than the stack buffer: the heap path.
            ("checkout", &long, 4281, 7860, 855),
            ("a", "b", 8387, 5807, 4132),
            (
                "one-page-checkout",
                "7f9c2ba4-e88f-11ee-8c90-0242ac120002",
                9235,
                5383,
                7390,
            ),
        ];
        for (feature, key, v1, v2, v3) in pinned {
            for (bucketing, want) in [
                (Bucketing::V1, v1),
                (Bucketing::V2, v2),
                (Bucketing::V3, v3),
            ] {
                assert_eq!(
                    entry_point(bucketing, feature, key),
                    want,
                    "the place of {feature}/{key} under {bucketing:?} changed"
                );
            }
        }
        assert!(!in_rollout(Bucketing::V2, "a", "b", 0.0));
        assert!(in_rollout(Bucketing::V2, "a", "b", 100.0));
    }

    #[test]
    fn rollout_is_monotone_and_features_bucket_independently() {
        for bucketing in [Bucketing::V1, Bucketing::V2, Bucketing::V3] {
            let mut differs = false;
            for i in 0..1_000 {
                let key = format!("user-{i}");
                let mut was_in = false;
                for p in [0.0, 0.01, 1.0, 5.0, 10.0, 25.0, 50.0, 99.0, 99.99, 100.0] {
                    let now_in = in_rollout(bucketing, "checkout", &key, p);
                    assert!(!was_in || now_in, "{key} left the rollout at {p}%");
                    was_in = now_in;
                }
                assert!(was_in, "{key} outside at 100%");
                differs |= in_rollout(bucketing, "checkout", &key, 50.0)
                    != in_rollout(bucketing, "search", &key, 50.0);
            }
            assert!(differs, "{bucketing:?}: features share buckets");
        }
    }

    #[test]
    fn ten_percent_of_10000_keys_is_10_percent_within_1_5_points() {
        for bucketing in [Bucketing::V1, Bucketing::V2, Bucketing::V3] {
            let inside = (0..10_000)
                .filter(|i| in_rollout(bucketing, "checkout", &format!("user-{i}"), 10.0))
                .count();
            let share = inside as f64 / 10_000.0;
            assert!(
                (share - 0.10).abs() <= 0.015,
                "{bucketing:?}: 10% gave {share}"
            );
        }
    }
}
