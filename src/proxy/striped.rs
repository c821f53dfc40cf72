//! Values kept once per serving thread, so that threads counting the same thing never write the
//! same cache line: a counter both threads bump on every message would otherwise move between
//! their cores each time. Writers touch their own thread's stripe; readers combine all of them.

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
    pub fn local(&self) -> &T {
        let stripe = workers::current().map_or(0, |(index, _)| 1 + index % (STRIPES - 1));
        // `stripe < STRIPES` by construction; the fallback is never taken.
        match self.stripes.get(stripe) {
            Some(padded) => &padded.0,
            None => &self.stripes[0].0,
        }
    }

    /// Every stripe, to combine.
    pub fn all(&self) -> impl Iterator<Item = &T> {
        self.stripes.iter().map(|padded| &padded.0)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

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
                    counter.local().fetch_add(1, Ordering::Relaxed);
                }
                let _ = done.send(());
            }));
        }
        for _ in 0..4 {
            finished
                .recv_timeout(std::time::Duration::from_secs(5))
                .unwrap();
        }
        counter.local().fetch_add(1, Ordering::Relaxed);
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
