//! A process-wide count of bytes held in read buffers for frames not yet complete.

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub struct BufferBudget {
    max: usize,
    used: AtomicUsize,
}

impl BufferBudget {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            used: AtomicUsize::new(0),
        }
    }

    /// Takes `bytes` from the budget, or nothing when they do not fit.
    pub fn try_charge(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.max)
            })
            .is_ok()
    }

    pub fn release(&self, bytes: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            });
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_fit_under_the_maximum_and_releases_return_them() {
        let budget = BufferBudget::new(100);
        assert!(budget.try_charge(60));
        assert!(!budget.try_charge(41), "over the maximum takes nothing");
        assert_eq!(budget.used(), 60);
        assert!(budget.try_charge(40));
        budget.release(100);
        assert_eq!(budget.used(), 0);
        budget.release(5);
        assert_eq!(budget.used(), 0, "never below zero");
    }
}
