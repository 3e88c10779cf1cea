//! Hashing for the quota state: the device-key fingerprint, and the two hashers of the maps.
//!
//! A device is counted under a 128-bit fingerprint of (productKey, deviceName) instead of the
//! two strings: SipHash-1-3 with a random key (so a client cannot aim two devices at one
//! bucket) beside a randomly seeded FxHash (cheap). No allocation per check, and no practical
//! chance of two devices sharing a bucket: with a million devices, about 10^-27.
//!
//! The maps then need no real hashing of their own: [`FoldState`] folds a fingerprint's two
//! words into one, and [`FxState`] serves the maps built from the config, whose keys a client
//! cannot add to. Both are on every forward's path, which is why they are this simple.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};

/// A device's key: a 128-bit fingerprint of (productKey, deviceName), as two words (8-byte
/// aligned, so an entry is 24 bytes, not the 32 a `u128` key would take).
pub(super) type DeviceKey = (u64, u64);

/// The keys of the device fingerprint, drawn at random once per limiter.
pub(super) struct Fingerprint {
    sip: RandomState,
    seed: u64,
}

impl Fingerprint {
    pub(super) fn new() -> Fingerprint {
        Fingerprint {
            sip: RandomState::new(),
            seed: RandomState::new().hash_one(0x10f_u16),
        }
    }

    /// SipHash-1-3 (keyed: a client cannot aim collisions) and a seeded FxHash (cheap) of
    /// (productKey, deviceName): 128 bits.
    pub(super) fn of(&self, product_key: &str, device_name: &str) -> DeviceKey {
        let fx = fx(
            fx(self.seed, product_key.as_bytes()),
            device_name.as_bytes(),
        );
        (self.sip.hash_one((product_key, device_name)), fx)
    }
}

/// `BuildHasher` for the maps built from the config (products, instances, tenants): FxHash,
/// several times cheaper than SipHash for short keys. Flooding is no concern there: the maps
/// are never inserted into after they are built, so a key chosen by a client only costs one
/// probe sequence among the configured keys.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct FxState;

/// A map built from the config, keyed by an id or a productKey.
pub(super) type FxMap<V> = HashMap<Box<str>, V, FxState>;

pub(super) struct FxHasher(u64);

const FX_K: u64 = 0x517c_c1b7_2722_0a95;

impl BuildHasher for FxState {
    type Hasher = FxHasher;

    fn build_hasher(&self) -> FxHasher {
        FxHasher(0)
    }
}

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = fx(self.0, bytes);
    }

    fn write_u8(&mut self, v: u8) {
        self.0 = fx_word(self.0, u64::from(v));
    }
}

fn fx_word(h: u64, word: u64) -> u64 {
    (h.rotate_left(5) ^ word).wrapping_mul(FX_K)
}

/// FxHash of `bytes` on top of `h`; the length is mixed in last, so `("ab", "c")` and
/// `("a", "bc")` differ.
fn fx(h: u64, bytes: &[u8]) -> u64 {
    fx_word(words(bytes).fold(h, fx_word), bytes.len() as u64)
}

/// `BuildHasher` for the device fingerprints, which are already uniformly random: folds the
/// 128 bits to 64 instead of hashing them again.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct FoldState;

pub(super) struct FoldHasher(u64);

impl BuildHasher for FoldState {
    type Hasher = FoldHasher;

    fn build_hasher(&self) -> FoldHasher {
        FoldHasher(0)
    }
}

impl Hasher for FoldHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = words(bytes).fold(self.0, fold_word);
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = fold_word(self.0, v);
    }
}

fn fold_word(h: u64, word: u64) -> u64 {
    h.rotate_left(29) ^ word
}

/// `bytes` as little-endian 8-byte words, the last one padded with zeros.
fn words(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    let chunks = bytes.chunks_exact(8);
    let rest = chunks.remainder();
    let last = (!rest.is_empty()).then(|| {
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        u64::from_le_bytes(word)
    });
    chunks
        .map(|chunk| u64::from_le_bytes(chunk.try_into().expect("8 bytes")))
        .chain(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_hasher_mixes_both_words() {
        let hash = |key: DeviceKey| FoldState.hash_one(key);
        assert_eq!(hash((0, 5)), 5);
        assert_eq!(hash((1, 0)), 1 << 29);
        assert_ne!(hash((1, 2)), hash((2, 1)));
        let mut h = FoldState.build_hasher();
        h.write(&[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(h.finish(), 1);
    }
}
