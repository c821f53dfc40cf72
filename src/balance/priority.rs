//! Envoy's priority-level arithmetic: how much traffic each priority takes given its health.
//!
//! `health(P) = min(1, factor × healthy share of P)`, `total = min(1, Σ health)`, and each level
//! takes `health / total`, capped by what the levels before it left. Health here is "soft": the
//! sum of current weights over the sum of maximum weights, so a degraded endpoint counts partly.

/// Traffic shares of each priority level, best first; all zero when every level is dead.
pub fn loads(health: &[f64], overprovisioning: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(health.len());
    for_each_load(health.iter().copied(), overprovisioning, |load| {
        out.push(load)
    });
    out
}

/// The same as [`loads`] without allocating: `visit` is called once per level, in order.
pub fn for_each_load(
    health: impl Iterator<Item = f64> + Clone,
    overprovisioning: f64,
    mut visit: impl FnMut(f64),
) {
    let boosted = |h: f64| (h.clamp(0.0, 1.0) * overprovisioning).min(1.0);
    let total: f64 = health.clone().map(boosted).sum::<f64>().min(1.0);
    let mut left = 1.0_f64;
    for h in health {
        let load = if total > 0.0 {
            (boosted(h) / total).min(left).max(0.0)
        } else {
            0.0
        };
        left -= load;
        visit(load);
    }
}

/// The normalized total health (Envoy's "normalized total availability"), 0..=1.
pub fn normalized_total(health: impl Iterator<Item = f64>, overprovisioning: f64) -> f64 {
    health
        .map(|h| (h.clamp(0.0, 1.0) * overprovisioning).min(1.0))
        .sum::<f64>()
        .min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn percent(health: &[f64]) -> Vec<i64> {
        loads(health, 1.4)
            .into_iter()
            .map(|load| (load * 100.0).round() as i64)
            .collect()
    }

    #[test]
    fn loads_match_envoys_published_table() {
        // P1 fully healthy; P0 at 72%, 71%, 50%, 25%, 0%.
        assert_eq!(percent(&[0.72, 1.0]), vec![100, 0]);
        assert_eq!(percent(&[0.71, 1.0]), vec![99, 1]);
        assert_eq!(percent(&[0.50, 1.0]), vec![70, 30]);
        assert_eq!(percent(&[0.25, 1.0]), vec![35, 65]);
        assert_eq!(percent(&[0.0, 1.0]), vec![0, 100]);
        // Normalisation when the total is short: 25/25 -> 50/50; 25/25/20 -> 36/36/28.
        assert_eq!(percent(&[0.25, 0.25]), vec![50, 50]);
        // Envoy's integer percentages print 36/36/28; the exact shares are 35.7/35.7/28.6.
        let three = loads(&[0.25, 0.25, 0.20], 1.4);
        for (load, want) in three.iter().zip([0.357, 0.357, 0.286]) {
            assert!((load - want).abs() < 0.001, "{three:?}");
        }
        assert_eq!(percent(&[0.0, 0.0]), vec![0, 0]);
        assert!((normalized_total([0.25, 0.25].into_iter(), 1.4) - 0.7).abs() < 1e-9);
    }
}
