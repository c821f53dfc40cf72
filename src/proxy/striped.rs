//! Values kept once per serving thread, so that threads counting the same thing never write the
//! same cache line: a counter both threads bump on every message would otherwise move between
//! their cores each time. Writers touch their own thread's stripe; readers combine all of them.

use std::sync::atomic::{AtomicU64, Ordering};

use super::workers;

/// Stripes per value: the threads off the serving set share stripe 0, serving thread `i` uses
/// `1 + i % (STRIPES - 1)` (past seven serving threads, some share one; still correct).
const STRIPES: usize = 8;

/// Two cache lines: adjacent-line prefetch pairs lines up on x86.
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

pub struct Striped<T> {
    stripes: Box<[Padded<T>; STRIPES]>,
}

impl<T: Default> Default for Striped<T> {
    fn default() -> Self {
        Self {
            stripes: Box::new(std::array::from_fn(|_| Padded::default())),
        }
    }
}

impl<T> Striped<T> {
    /// Each stripe made by `make`.
    pub fn from_fn(mut make: impl FnMut() -> T) -> Self {
        Self {
            stripes: Box::new(std::array::from_fn(|_| Padded(make()))),
        }
    }

    /// This thread's stripe.
    #[inline]
    pub fn local(&self) -> Stripe<'_, T> {
        let (stripe, exclusive) = match workers::current() {
            Some((index, _)) => (1 + index % (STRIPES - 1), index < STRIPES - 1),
            None => (0, false),
        };
        // `stripe < STRIPES` by construction; the fallback is never taken.
        let value = match self.stripes.get(stripe) {
            Some(padded) => &padded.0,
            None => &self.stripes[0].0,
        };
        Stripe { value, exclusive }
    }

    /// Every stripe, to combine.
    pub fn all(&self) -> impl Iterator<Item = &T> {
        self.stripes.iter().map(|padded| &padded.0)
    }
}

/// One thread's stripe of a value.
pub struct Stripe<'a, T> {
    pub value: &'a T,
    /// Only this thread writes the stripe (a serving thread with a stripe of its own), so a
    /// counter in it can be bumped with a plain load and store instead of a locked add.
    exclusive: bool,
}

impl<T> Stripe<'_, T> {
    /// Adds `by` to `counter`, a counter of this stripe. Wrapping: a gauge keeps its signed
    /// value as two's complement (`by` of `-1i64 as u64` lowers it), and its stripes' wrapping
    /// sum is its value (one thread may end what another began).
    #[inline]
    pub fn add(&self, counter: &AtomicU64, by: u64) {
        if self.exclusive {
            counter.store(
                counter.load(Ordering::Relaxed).wrapping_add(by),
                Ordering::Relaxed,
            );
        } else {
            counter.fetch_add(by, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_every_thread_add_up() {
        let counter = std::sync::Arc::new(Striped::<AtomicU64>::default());
        let workers = workers::Workers::start(2).unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let counter = counter.clone();
            let done = done.clone();
            drop(workers.next().spawn(async move {
                for _ in 0..1000 {
                    let stripe = counter.local();
                    stripe.add(stripe.value, 1);
                }
                let _ = done.send(());
            }));
        }
        for _ in 0..4 {
            finished
                .recv_timeout(std::time::Duration::from_secs(5))
                .unwrap();
        }
        let stripe = counter.local();
        stripe.add(stripe.value, 1);
        let total: u64 = counter.all().map(|c| c.load(Ordering::Relaxed)).sum();
        assert_eq!(total, 4001);
        let used = counter
            .all()
            .filter(|c| c.load(Ordering::Relaxed) > 0)
            .count();
        assert_eq!(
            used, 3,
            "two serving threads and this one, each on a stripe of its own"
        );
    }
}
