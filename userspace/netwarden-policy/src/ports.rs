//! Port ranges as LPM prefixes.

/// Splits the inclusive range `first..=last` into the fewest power-of-two aligned blocks, each
/// given as `(first port of the block, number of fixed leading bits)`: the form in which a range
/// can live in an LPM trie.
#[must_use]
pub fn port_prefixes(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut blocks = Vec::new();
    let mut start = u32::from(first);
    let end = u32::from(last);
    while start <= end {
        // The largest aligned block that starts at `start` and does not pass `end`.
        let mut size_bits = start.trailing_zeros().min(16);
        while size_bits > 0 && start + (1 << size_bits) - 1 > end {
            size_bits -= 1;
        }
        blocks.push((start as u16, 16 - size_bits as u8));
        start += 1 << size_bits;
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::port_prefixes;

    #[test]
    fn a_single_port_is_a_full_prefix() {
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
    }

    #[test]
    fn ranges_split_into_aligned_blocks_that_cover_exactly_the_range() {
        assert_eq!(port_prefixes(32000, 32767), vec![(32000, 8), (32256, 7)]);
        for (first, last) in [
            (1, 65535),
            (0, 65535),
            (5, 9),
            (1000, 1000),
            (8080, 8090),
            (65535, 65535),
        ] {
            let blocks = port_prefixes(first, last);
            let covered: u32 = blocks.iter().map(|(_, bits)| 1u32 << (16 - bits)).sum();
            assert_eq!(
                covered,
                u32::from(last) - u32::from(first) + 1,
                "{first}-{last}: {blocks:?}"
            );
            for port in [first, last, first.saturating_add(1).min(last)] {
                assert!(
                    blocks.iter().any(|(start, bits)| {
                        let mask = if *bits == 0 {
                            0
                        } else {
                            u16::MAX << (16 - bits)
                        };
                        port & mask == *start
                    }),
                    "{port} not covered by {blocks:?}"
                );
            }
        }
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
    }
}
