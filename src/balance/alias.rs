//! Vose's alias method: O(1) weighted sampling from a fixed set of weights.

/// A prebuilt sampling table; `sample` maps two uniform numbers to an index with probability
/// proportional to its weight.
#[derive(Debug, Clone)]
pub struct AliasTable {
    /// Chance of keeping column i (else take `alias[i]`), scaled to u64.
    keep: Vec<u64>,
    alias: Vec<u32>,
}

impl AliasTable {
    /// `None` when there is nothing to sample (no weights, or all zero).
    pub fn new(weights: &[f64]) -> Option<Self> {
        let count = weights.len();
        let total: f64 = weights.iter().map(|w| w.max(0.0)).sum();
        if count == 0 || total <= 0.0 || count > u32::MAX as usize {
            return None;
        }
        let mut scaled: Vec<f64> = weights
            .iter()
            .map(|w| w.max(0.0) * count as f64 / total)
            .collect();
        let mut keep = vec![u64::MAX; count];
        let mut alias: Vec<u32> = (0..count as u32).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..count).partition(|&i| scaled[i] < 1.0);
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            keep[s] = (scaled[s] * u64::MAX as f64) as u64;
            alias[s] = l as u32;
            scaled[l] -= 1.0 - scaled[s];
            if scaled[l] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        // Leftovers (rounding) keep their own column.
        Some(Self { keep, alias })
    }

    pub fn len(&self) -> usize {
        self.keep.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keep.is_empty()
    }

    /// An index drawn with probability proportional to its weight, from one random number: its
    /// low half picks the column, its high half tosses the coin (32 bits each are plenty).
    pub fn sample(&self, random: u64) -> usize {
        let count = self.keep.len() as u64;
        // Multiply-shift maps 32 random bits uniformly onto 0..count without a division.
        let column = (((random & 0xFFFF_FFFF) * count) >> 32) as usize;
        let coin = random & 0xFFFF_FFFF_0000_0000;
        match (self.keep.get(column), self.alias.get(column)) {
            (Some(keep), Some(alias)) if coin > *keep => *alias as usize,
            _ => column,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_follow_the_weights() {
        let table = AliasTable::new(&[1.0, 2.0, 7.0, 0.0]).expect("table");
        let mut rng = fastrand::Rng::with_seed(7);
        let mut counts = [0u32; 4];
        for _ in 0..100_000 {
            counts[table.sample(rng.u64(..))] += 1;
        }
        assert_eq!(counts[3], 0, "a zero weight is never drawn");
        for (count, share) in counts.iter().zip([0.1, 0.2, 0.7]) {
            let expected = 100_000.0 * share;
            assert!(
                (f64::from(*count) - expected).abs() < expected * 0.03,
                "{counts:?}"
            );
        }
        assert!(AliasTable::new(&[]).is_none());
        assert!(AliasTable::new(&[0.0, 0.0]).is_none());
    }
}
