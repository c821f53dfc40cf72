//! Serving threads, one per core by default. Each runs a single-threaded runtime that owns the
//! client connections handed to it and the upstream connections they use, the way L4 proxies
//! run. A request then crosses no thread inside the sidecar: its connection task, the upstream
//! writer and the reader that gets the answer share a thread, so an answer wakes no other one.
//! The multi-threaded runtime keeps everything else (admin, xDS, health checks, relays).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// On a serving thread: its index and how many there are.
    static SERVING: Cell<Option<(usize, usize)>> = const { Cell::new(None) };
}

/// The serving worker this thread is, and how many there are; `None` off the serving threads.
pub fn current() -> Option<(usize, usize)> {
    SERVING.with(Cell::get)
}

/// The serving threads. Dropping this stops them; the tasks they still hold are dropped.
pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Dropped with `Workers`: each thread's runtime then returns from `block_on` and ends.
    _stop: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// Starts `count` serving threads (0: one per core).
    pub fn start(count: usize) -> std::io::Result<Self> {
        let count = match count {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            count => count,
        };
        let mut handles = Vec::with_capacity(count);
        let mut stops = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(crate::memory::on_park)
                .build()?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            std::thread::Builder::new()
                .name(format!("rocketmesh-serve-{index}"))
                .spawn(move || {
                    SERVING.with(|serving| serving.set(Some((index, count))));
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                })?;
        }
        Ok(Self {
            handles,
            next: AtomicUsize::new(0),
            _stop: stops,
        })
    }

    /// Every serving thread's runtime, in worker order.
    pub fn handles(&self) -> Vec<Handle> {
        self.handles.clone()
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// The runtime the next connection goes to (round robin).
    pub fn next(&self) -> &Handle {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len().max(1);
        // `start` makes at least one worker, so `index` is in range.
        &self.handles[index]
    }

    /// Wakes every serving thread once, so each parks again soon (and runs its park hook).
    pub fn wake_all(&self) {
        for handle in &self.handles {
            drop(handle.spawn(async {}));
        }
    }
}

/// The slot of an `len`-slot pool this thread should use, given a rotating `turn`: a serving
/// thread keeps to the slots that are its own (`worker`, `worker + count`, …), so the upstream
/// connections it uses run on it too; other threads take any slot in turn.
pub fn pool_slot(len: usize, turn: usize) -> usize {
    let len = len.max(1);
    match current() {
        Some((worker, count)) if len >= count => {
            let own = (len - worker).div_ceil(count);
            worker + count * (turn % own.max(1))
        }
        Some((worker, _)) => worker % len,
        None => turn % len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_the_serving_threads_slots_rotate() {
        assert_eq!(
            (0..5).map(|turn| pool_slot(3, turn)).collect::<Vec<_>>(),
            [0, 1, 2, 0, 1]
        );
    }

    #[test]
    fn a_serving_thread_keeps_to_its_own_slots() {
        let slots = |worker, count, len| {
            std::thread::spawn(move || {
                SERVING.with(|serving| serving.set(Some((worker, count))));
                (0..4).map(|turn| pool_slot(len, turn)).collect::<Vec<_>>()
            })
            .join()
            .unwrap_or_default()
        };
        assert_eq!(slots(0, 2, 2), [0, 0, 0, 0]);
        assert_eq!(slots(1, 2, 2), [1, 1, 1, 1]);
        assert_eq!(slots(1, 2, 5), [1, 3, 1, 3]);
        assert_eq!(slots(0, 2, 5), [0, 2, 4, 0]);
        assert_eq!(
            slots(3, 4, 2),
            [1, 1, 1, 1],
            "fewer slots than workers: shared"
        );
    }

    #[test]
    fn connections_are_spread_and_run_on_the_serving_threads() {
        let workers = Workers::start(2).unwrap();
        assert_eq!(workers.count(), 2);
        let seen: Vec<_> = (0..4)
            .map(|_| {
                let (sender, receiver) = std::sync::mpsc::channel();
                drop(workers.next().spawn(async move {
                    let _ = sender.send(current());
                }));
                receiver
                    .recv_timeout(std::time::Duration::from_secs(5))
                    .ok()
                    .flatten()
            })
            .collect();
        assert_eq!(
            seen,
            [Some((0, 2)), Some((1, 2)), Some((0, 2)), Some((1, 2))]
        );
    }
}
