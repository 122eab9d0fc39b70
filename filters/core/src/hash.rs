//! The sticky-key hash.
//!
//! `bucket = fmix64(FNV-1a-64(model ‖ 0x00 ‖ key)) mod 10 000`
//!
//! FNV-1a is tiny, has no seed and no platform dependence, so the same key
//! lands in the same bucket on every proxy, every worker and after every
//! restart; MurmurHash3's 64-bit finaliser (`fmix64`) spreads FNV's weak low
//! bits over the whole word before the modulo. Hashing the model name in
//! means a user who is canary for one model is not automatically canary for
//! every other model.

/// Number of buckets: weights are expressed in basis points of this space.
pub const BUCKETS: u32 = 10_000;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// MurmurHash3's 64-bit finaliser: full avalanche, bijective.
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// Stable 64-bit hash of a sticky key, scoped to a model.
pub fn key_hash(model: &str, key: &[u8]) -> u64 {
    let h = fnv1a(FNV_OFFSET, model.as_bytes());
    let h = fnv1a(h, &[0]);
    fmix64(fnv1a(h, key))
}

/// The key's bucket in `0..BUCKETS`.
pub fn bucket(model: &str, key: &[u8]) -> u32 {
    // The remainder is < 10 000, so the narrowing is lossless.
    (key_hash(model, key) % u64::from(BUCKETS)) as u32
}

/// Maps a random word (from the host) to a bucket, for requests without a
/// sticky key.
pub fn random_bucket(random: u64) -> u32 {
    (fmix64(random) % u64::from(BUCKETS)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_pinned_so_every_proxy_agrees() {
        // Exact values: a change here moves users between versions in a
        // running rollout, so it must be a deliberate, visible decision.
        assert_eq!(fnv1a(FNV_OFFSET, b""), FNV_OFFSET);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            bucket("digits-mlp", b"user-1"),
            bucket("digits-mlp", b"user-1")
        );
        let pinned = [
            bucket("digits-mlp", b"user-1"),
            bucket("digits-mlp", b"user-2"),
            bucket("tiny-cnn", b"user-1"),
        ];
        assert_eq!(pinned, PINNED_BUCKETS);
    }

    // From an independent implementation of the formula in the module docs
    // (Python, arbitrary-precision integers masked to 64 bits); frozen.
    const PINNED_BUCKETS: [u32; 3] = [4276, 1107, 8461];

    #[test]
    fn model_scopes_the_hash() {
        let same = (0..1000)
            .filter(|i| {
                let k = format!("u{i}");
                bucket("a", k.as_bytes()) == bucket("b", k.as_bytes())
            })
            .count();
        assert!(same < 10, "{same}/1000 keys share a bucket across models");
    }

    #[test]
    fn buckets_are_uniform() {
        let mut hist = [0u32; 10];
        for i in 0..100_000 {
            let b = bucket("m", format!("user-{i}").as_bytes());
            if let Some(slot) = hist.get_mut((b / 1000) as usize) {
                *slot += 1;
            }
        }
        for (i, n) in hist.iter().enumerate() {
            assert!((9_500..=10_500).contains(n), "decile {i} got {n}/100000");
        }
    }
}
