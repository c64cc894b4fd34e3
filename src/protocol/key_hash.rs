//! Which partition a key belongs to: a wire contract, since a producer
//! that retries must send the retry to the partition the broker would
//! pick, and every client in every language must agree with it.
//!
//! ```text
//! key_hash (u8, in TopicSummary)
//!   1 = murmur2   partition = (murmur2(key) & 0x7fffffff) % partitions
//!                 Kafka's default partitioner: seed 0x9747b28c,
//!                 m = 0x5bd1e995, r = 24, 4-byte words little-endian
//!   0 = legacy    foldhash 0.1 `fast::FixedState` seeded
//!                 0x0b1da5eed0000001, modulo partitions; only topics
//!                 created before the murmur2 default have it
//! ```
//!
//! Pure functions, no I/O.

use std::hash::{BuildHasher, Hasher};

/// How a topic maps keys to partitions; fixed when the topic is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum KeyHash {
    /// The hash of topics created before bida used murmur2.
    Legacy,
    /// Kafka's murmur2, the default for new topics.
    #[default]
    Murmur2,
}

impl KeyHash {
    /// The byte that names this hash on the wire.
    pub fn wire(self) -> u8 {
        match self {
            KeyHash::Legacy => 0,
            KeyHash::Murmur2 => 1,
        }
    }

    /// The hash named by a wire byte, if it is one this build knows.
    pub fn from_wire(byte: u8) -> Option<KeyHash> {
        match byte {
            0 => Some(KeyHash::Legacy),
            1 => Some(KeyHash::Murmur2),
            _ => None,
        }
    }

    /// The partition of `key` among `partitions` (which must be ≥ 1).
    pub fn partition(self, key: &[u8], partitions: u32) -> u32 {
        debug_assert!(partitions > 0);
        let partitions = partitions.max(1);
        match self {
            KeyHash::Murmur2 => (murmur2(key) & 0x7fff_ffff) % partitions,
            KeyHash::Legacy => (legacy_foldhash(key) % u64::from(partitions)) as u32,
        }
    }
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`), as a
/// `u32`: Kafka's `int` result has the same bits.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        let mut k = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = words.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

fn legacy_foldhash(key: &[u8]) -> u64 {
    let mut h = foldhash::fast::FixedState::with_seed(0x0b1d_a5ee_d000_0001).build_hasher();
    h.write(key);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectors of Kafka's own test (`UtilsTest.testMurmur2`), as
    /// Java `int`s.
    #[test]
    fn murmur2_matches_kafka() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, want) in cases {
            assert_eq!(
                murmur2(key) as i32,
                want,
                "{:?}",
                String::from_utf8_lossy(key)
            );
        }
    }

    #[test]
    fn partitions_are_in_range_and_stable() {
        for n in [1u32, 2, 3, 7, 1024, 10_000] {
            for i in 0..500u32 {
                let key = i.to_string();
                for hash in [KeyHash::Murmur2, KeyHash::Legacy] {
                    let p = hash.partition(key.as_bytes(), n);
                    assert!(p < n);
                    assert_eq!(p, hash.partition(key.as_bytes(), n));
                }
            }
        }
        // The documented vectors of docs/PROTOCOL.md.
        for (key, want) in [
            (&b"21"[..], 0),
            (b"foobar", 6),
            (b"abc", 3),
            (b"a-little-bit-long-string", 8),
        ] {
            assert_eq!(KeyHash::Murmur2.partition(key, 12), want);
        }
        assert_eq!(
            KeyHash::Murmur2.partition(b"", 4),
            (murmur2(b"") & 0x7fff_ffff) % 4
        );
    }

    #[test]
    fn wire_bytes_round_trip() {
        for h in [KeyHash::Legacy, KeyHash::Murmur2] {
            assert_eq!(KeyHash::from_wire(h.wire()), Some(h));
        }
        assert_eq!(KeyHash::from_wire(2), None);
    }
}
