//! The one hash of the project: FNV-1a, 64 bits (the `fnv` crate). Stable across releases and
//! platforms, which is what its users need: cache directory names that survive upgrades, name
//! suffixes that stay the same for the same input, and the stable `-random` cron offsets. Not for
//! anything adversarial.

use std::hash::Hasher;

pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    h.write(bytes);
    h.finish()
}

/// Eight hex digits standing for `s` (a name suffix).
pub fn short(s: &str) -> String {
    format!("{:08x}", fnv1a(s.as_bytes()) & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // FNV-1a 64 reference values.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(short("a"), "8601ec8c");
    }
}
