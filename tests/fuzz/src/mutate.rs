//! Seeded mutations of the seeds, for the short run in `cargo test`: not coverage-guided like
//! libFuzzer, but deterministic, cheap, and enough to walk a little off the seeds' paths on
//! every CI run.

/// A small deterministic generator (xorshift64*): the same seed gives the same inputs on every
/// machine, so a failure in CI reproduces.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced: xorshift needs a nonzero state).
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `bound` (which must not be 0).
    pub fn below(&mut self, bound: usize) -> usize {
        // The bias of a modulo is irrelevant here.
        (self.next_u64() % bound as u64) as usize
    }
}

/// `input` with one to four random edits: a byte flipped, set to an interesting value,
/// inserted or removed, a chunk repeated or dropped, or a chunk of `other` spliced in.
#[must_use]
pub fn mutate(input: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    const INTERESTING: [u8; 10] = [0, 1, 0x7f, 0x80, 0xff, b'\n', b'-', b':', b'{', b'"'];
    let mut output = input.to_vec();
    for _ in 0..=rng.below(4) {
        let len = output.len();
        match rng.below(7) {
            0 if len > 0 => {
                let at = rng.below(len);
                output[at] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                output[at] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => {
                let at = rng.below(len + 1);
                output.insert(at, INTERESTING[rng.below(INTERESTING.len())]);
            }
            3 if len > 0 => {
                output.remove(rng.below(len));
            }
            4 if len > 0 => {
                let start = rng.below(len);
                let end = start + rng.below(len - start) + 1;
                let chunk = output[start..end].to_vec();
                let at = rng.below(len + 1);
                output.splice(at..at, chunk);
            }
            5 if len > 0 => {
                let start = rng.below(len);
                let end = start + rng.below(len - start) + 1;
                output.drain(start..end);
            }
            _ if !other.is_empty() => {
                let start = rng.below(other.len());
                let end = start + rng.below(other.len() - start) + 1;
                let at = rng.below(len + 1);
                output.splice(at.., other[start..end].iter().copied());
            }
            _ => {}
        }
    }
    output
}

#[cfg(test)]
mod tests {
    use super::{Rng, mutate};

    #[test]
    fn the_same_seed_gives_the_same_mutations() {
        let mut first = Rng::new(7);
        let mut second = Rng::new(7);
        for _ in 0..100 {
            assert_eq!(
                mutate(b"kind: Pod", b"kind: Node", &mut first),
                mutate(b"kind: Pod", b"kind: Node", &mut second)
            );
        }
    }
}
