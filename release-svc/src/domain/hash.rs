//! Stable hashing for percentage rollouts (and, in `rules`, flagd's `fractional`).
//!
//! MurmurHash3 (x86, 32-bit, seed 0) is what flagd uses, so buckets agree with flagd for
//! the same inputs. A rollout bucket is `murmur3("{feature}/{targeting_key}") % 10_000`:
//! a key is inside a rollout of p% when its bucket is below p x 100, so a key inside at
//! 10% is inside at every larger percentage (monotone), with 0.01% granularity.

/// MurmurHash3 x86 32-bit.
pub fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut h = seed;
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let mut k = 0u32;
    if tail.len() >= 3 {
        k ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        k ^= u32::from(tail[1]) << 8;
    }
    if let Some(first) = tail.first() {
        k ^= u32::from(*first);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
    }
    // The length is mixed in modulo 2^32, as in the reference implementation.
    h ^= u32::try_from(data.len() & 0xffff_ffff).unwrap_or(0);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// The rollout bucket of a targeting key for a feature, in `0..10_000`.
pub fn rollout_bucket(feature: &str, targeting_key: &str) -> u32 {
    let len = feature.len() + 1 + targeting_key.len();
    // The hot path: keys up to 256 bytes are joined on the stack.
    let mut stack = [0u8; 256];
    let mut heap = Vec::new();
    let buf: &mut [u8] = if len <= stack.len() {
        &mut stack[..len]
    } else {
        heap.resize(len, 0);
        &mut heap
    };
    buf[..feature.len()].copy_from_slice(feature.as_bytes());
    buf[feature.len()] = b'/';
    buf[feature.len() + 1..].copy_from_slice(targeting_key.as_bytes());
    murmur3_32(buf, 0) % 10_000
}

/// Whether a key in `bucket` is inside a rollout of `percent` (0-100).
pub fn in_rollout(bucket: u32, percent: f64) -> bool {
    // Basis points; the cast is exact for 0..=10_000.
    let threshold = (percent.clamp(0.0, 100.0) * 100.0).round() as u32;
    bucket < threshold
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn buckets_are_stable() {
        let a = rollout_bucket("checkout", "user-42");
        assert_eq!(a, rollout_bucket("checkout", "user-42"));
        assert!(a < 10_000);
        // Another feature buckets the same user independently.
        let differs = (0..100).any(|i| {
            rollout_bucket("checkout", &format!("u{i}"))
                != rollout_bucket("search", &format!("u{i}"))
        });
        assert!(differs);
    }

    /// Who is inside a rollout is a promise to users: the same key keeps its bucket across
    /// releases of release-svc. These values were computed once (and checked against an
    /// independent MurmurHash3 implementation); they must never change. A change here
    /// re-buckets every user of every running rollout.
    #[test]
    fn rollout_buckets_never_change() {
        let long = "x".repeat(300);
        let pinned: [(&str, &str, u32); 12] = [
            ("checkout", "user-42", 6374),
            ("checkout", "user-1", 9819),
            ("checkout", "alice", 6885),
            ("new-cart", "u1", 9780),
            ("new-cart", "bob", 1937),
            ("banner", "user-0", 4757),
            ("banner", "user-1999", 6683),
            ("search", "", 6761),
            (
                "dark-mode",
                "\u{fc}n\u{ef}c\u{f8}d\u{e9}-\u{43a}\u{43b}\u{44e}\u{447}",
                3877,
            ),
            // Longer than the 256-byte stack buffer: the heap path.
            ("checkout", &long, 3115),
            ("a", "b", 7863),
            (
                "one-page-checkout",
                "7f9c2ba4-e88f-11ee-8c90-0242ac120002",
                8840,
            ),
        ];
        for (feature, key, bucket) in pinned {
            assert_eq!(
                rollout_bucket(feature, key),
                bucket,
                "the bucket of {feature}/{key} changed"
            );
        }
        // The thresholds: basis points, strictly below.
        assert!(in_rollout(0, 0.01) && !in_rollout(1, 0.01));
        assert!(in_rollout(6373, 63.74) && !in_rollout(6374, 63.74));
        assert!(in_rollout(9999, 100.0) && !in_rollout(0, 0.0));
    }

    #[test]
    fn rollout_is_monotone() {
        for i in 0..2_000 {
            let b = rollout_bucket("checkout", &format!("user-{i}"));
            let mut was_in = false;
            for p in [0.0, 1.0, 5.0, 10.0, 25.0, 50.0, 99.0, 100.0] {
                let now_in = in_rollout(b, p);
                assert!(!was_in || now_in, "user-{i} left the rollout at {p}%");
                was_in = now_in;
            }
            assert!(in_rollout(b, 100.0));
            assert!(!in_rollout(b, 0.0));
        }
    }

    #[test]
    fn ten_percent_of_10000_keys_is_10_percent_within_1_5_points() {
        let inside = (0..10_000)
            .filter(|i| in_rollout(rollout_bucket("checkout", &format!("user-{i}")), 10.0))
            .count();
        let share = inside as f64 / 10_000.0;
        assert!((share - 0.10).abs() <= 0.015, "10% rollout gave {share}");
    }
}
