//! Weight dynamics of one endpoint (after simple-failover-java's ratio weight function) and the
//! endpoint's shared, lock-free state.
//!
//! Weights are kept as fixed-point integers (millionths) in atomics: a change is a CAS on the
//! endpoint's weight and an exact integer add of the difference to its group's total, so concurrent
//! reports never lose an update and totals never drift.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};

/// Fixed-point scale: weights are stored in millionths.
pub const SCALE: f64 = 1_000_000.0;

pub fn to_units(weight: f64) -> u64 {
    (weight.max(0.0) * SCALE).round() as u64
}

pub fn to_weight(units: u64) -> f64 {
    units as f64 / SCALE
}

/// How weights move. Defaults are simple-failover-java's `RatioWeightFunction`.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightRules {
    /// A failure keeps this share of the current weight.
    pub fail_keep: f64,
    /// Below this share of max, a failing endpoint drops to its minimum (down).
    pub down_below: f64,
    /// A success adds this share of max.
    pub success_step: f64,
    /// A passing health check at the minimum adds this share of max...
    pub recover_step: f64,
    /// ...once this many checks in a row have passed.
    pub recover_after_passes: u32,
}

impl Default for WeightRules {
    fn default() -> Self {
        Self {
            fail_keep: 0.5,
            down_below: 0.01,
            success_step: 0.01,
            recover_step: 0.1,
            recover_after_passes: 1,
        }
    }
}

impl WeightRules {
    /// The weight after a failure.
    pub fn after_failure(&self, current: f64, min: f64, max: f64) -> f64 {
        let kept = current * self.fail_keep;
        if kept < max * self.down_below {
            min
        } else {
            kept.clamp(min, max)
        }
    }

    /// The weight after a success.
    pub fn after_success(&self, current: f64, min: f64, max: f64) -> f64 {
        (current + max * self.success_step).clamp(min, max)
    }

    /// The weight after a passing health check at the minimum.
    pub fn after_recovery(&self, current: f64, min: f64, max: f64) -> f64 {
        (current + max * self.recover_step).clamp(min, max)
    }
}

/// The live state of one endpoint, shared by every snapshot that contains it.
#[derive(Debug)]
pub struct EndpointState {
    pub(crate) max: AtomicU64,
    pub(crate) min: AtomicU64,
    pub(crate) current: AtomicU64,
    pub(crate) in_flight: AtomicU32,
    pub(crate) consecutive_failures: AtomicU32,
    pub(crate) consecutive_passes: AtomicU32,
    /// Clock time (ns) until which the endpoint is ejected; 0 when it is not.
    pub(crate) ejected_until: AtomicU64,
    /// Ejections in a row; each lasts base × this, capped.
    pub(crate) ejections: AtomicU32,
    /// Clock time (ns) the last ejection ended, or the last time the ejection count was forgiven.
    pub(crate) ejection_ended: AtomicU64,
    /// The group total the weight belongs to; moved on a hot update.
    pub(crate) group_total: AtomicPtrTotal,
}

/// Where an endpoint adds its weight changes: its group's running total.
#[derive(Debug, Default)]
pub struct AtomicPtrTotal(pub(crate) arc_swap::ArcSwapOption<AtomicI64>);

impl EndpointState {
    pub fn new(max: f64, min: f64, initial: f64) -> Self {
        let (max_units, min_units) = (to_units(max), to_units(min.min(max)));
        Self {
            max: AtomicU64::new(max_units),
            min: AtomicU64::new(min_units),
            current: AtomicU64::new(to_units(initial).clamp(min_units, max_units)),
            in_flight: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            consecutive_passes: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            ejection_ended: AtomicU64::new(0),
            group_total: AtomicPtrTotal::default(),
        }
    }

    pub fn max_weight(&self) -> f64 {
        to_weight(self.max.load(Ordering::Relaxed))
    }

    pub fn min_weight(&self) -> f64 {
        to_weight(self.min.load(Ordering::Relaxed))
    }

    pub fn current_weight(&self) -> f64 {
        to_weight(self.current.load(Ordering::Relaxed))
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn is_down(&self) -> bool {
        self.current.load(Ordering::Relaxed) <= self.min.load(Ordering::Relaxed)
    }

    pub fn ejected_at(&self, now: u64) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now < until
    }

    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Applies `change` to the current weight atomically; returns (old, new) in units.
    pub(crate) fn update(&self, change: impl Fn(f64, f64, f64) -> f64) -> (u64, u64) {
        let min = self.min_weight();
        let max = self.max_weight();
        let mut old = self.current.load(Ordering::Relaxed);
        loop {
            let new = to_units(change(to_weight(old), min, max));
            if new == old {
                return (old, old);
            }
            match self
                .current
                .compare_exchange_weak(old, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    if let Some(total) = self.group_total.0.load().as_ref() {
                        total.fetch_add(new as i64 - old as i64, Ordering::Relaxed);
                    }
                    return (old, new);
                }
                Err(actual) => old = actual,
            }
        }
    }

    /// Releases one in-flight slot (never below zero).
    pub(crate) fn release(&self) {
        // One atomic op in the normal case; undo in the (buggy-caller) case of an extra release.
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 0 {
            self.in_flight.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seven_failures_take_a_weight_of_100_down_and_successes_climb_by_one() {
        let rules = WeightRules::default();
        let mut weight = 100.0;
        let mut seen = Vec::new();
        for _ in 0..7 {
            weight = rules.after_failure(weight, 0.0, 100.0);
            seen.push(weight);
        }
        assert_eq!(seen, vec![50.0, 25.0, 12.5, 6.25, 3.125, 1.5625, 0.0]);
        weight = rules.after_recovery(weight, 0.0, 100.0);
        assert_eq!(weight, 10.0);
        weight = rules.after_success(weight, 0.0, 100.0);
        assert_eq!(weight, 11.0);
        assert_eq!(rules.after_success(100.0, 0.0, 100.0), 100.0);
    }

    #[test]
    fn updates_move_the_group_total_by_the_exact_difference() {
        let state = EndpointState::new(100.0, 0.0, 100.0);
        let total = std::sync::Arc::new(AtomicI64::new(to_units(100.0) as i64));
        state.group_total.0.store(Some(total.clone()));
        let rules = WeightRules::default();
        state.update(|current, min, max| rules.after_failure(current, min, max));
        assert_eq!(state.current_weight(), 50.0);
        assert_eq!(total.load(Ordering::Relaxed), to_units(50.0) as i64);
        state.release();
        assert_eq!(state.in_flight(), 0, "release never goes below zero");
    }
}
