//! Handing freed memory back to the OS after a burst of per-topic state is gone.
//!
//! Allocators such as mimalloc keep freed pages in the heap of the thread that allocated them and
//! return them only on later allocations from that thread. A worker that idles after its topics
//! went keeps them for good: RSS stays at its peak although the state is freed. After the sidecar
//! frees state in bulk, [`request_release`] asks every runtime thread to run the allocator's
//! release function (set by the binary with [`install_release`]) the next time it parks: every
//! runtime the sidecar builds has [`on_park`] as its park hook.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

static RELEASE_EPOCH: AtomicU64 = AtomicU64::new(0);
static RELEASE: OnceLock<fn()> = OnceLock::new();

thread_local! {
    static RELEASED_EPOCH: Cell<u64> = const { Cell::new(0) };
}

/// Sets what releasing memory means for this process's allocator (once; later calls are ignored).
pub fn install_release(release: fn()) {
    let _ = RELEASE.set(release);
}

/// Asks each runtime thread to release its free memory once, when it next parks.
pub fn request_release() {
    RELEASE_EPOCH.fetch_add(1, Ordering::Relaxed);
}

/// Requests a release and wakes the current runtime's workers so that each parks again soon,
/// even one that was idle (a parked worker would otherwise answer only on its next wake-up).
pub async fn release_on_all_workers() {
    request_release();
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    // Tasks queued on this worker make it wake a parked one to steal them.
    let wakers: Vec<_> = (0..workers * 2)
        .map(|_| tokio::spawn(tokio::task::yield_now()))
        .collect();
    for waker in wakers {
        let _ = waker.await;
    }
}

/// The park hook of every runtime: runs the installed release on this thread if a release was
/// requested since its last one. Costs one atomic load and a thread-local read otherwise.
pub fn on_park() {
    if let Some(release) = RELEASE.get() {
        release_if_requested(release);
    }
}

fn release_if_requested(release: impl FnOnce()) {
    let wanted = RELEASE_EPOCH.load(Ordering::Relaxed);
    let stale = RELEASED_EPOCH.with(|released| {
        let stale = released.get() != wanted;
        released.set(wanted);
        stale
    });
    if stale {
        release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_releases_once_per_request() {
        let count = |releases: &mut u32| release_if_requested(|| *releases += 1);
        let mut releases = 0;
        request_release();
        count(&mut releases);
        count(&mut releases);
        assert_eq!(
            releases, 1,
            "a second park without a new request releases nothing"
        );
        let on_other_thread = std::thread::spawn(|| {
            let mut releases = 0;
            release_if_requested(|| releases += 1);
            releases
        })
        .join()
        .unwrap_or(0);
        assert_eq!(on_other_thread, 1, "every thread answers the request once");
        request_release();
        count(&mut releases);
        assert_eq!(releases, 2);
    }
}
