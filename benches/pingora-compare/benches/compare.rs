//! One run, same endpoint sets (5, 100, 1,000 endpoints, weights 100..106), one and two threads:
//! rocketmesh's balancer (pick + report success, through the balancer and through a worker's own
//! picker handle) next to pingora-load-balancing's weighted round robin `select` (pingora has no
//! success/failure feedback, so it only picks).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use futures::FutureExt;
use pingora_load_balancing::selection::RoundRobin;
use pingora_load_balancing::{Backend, Backends, LoadBalancer, discovery};
use rocketmesh::balance::{
    Balancer, BalancerConfig, EndpointSpec, Outcome, SystemClock, ThreadRandom,
};

fn ours(endpoints: u32) -> Balancer<u32> {
    let balancer = Balancer::new(BalancerConfig::default(), Arc::new(SystemClock::default()));
    balancer.update(
        (0..endpoints)
            .map(|key| EndpointSpec {
                key,
                max_weight: 100.0 + f64::from(key % 7),
                min_weight: 0.0,
                priority: 0,
                zone: None,
            })
            .collect(),
    );
    balancer
}

fn pingora(endpoints: u32) -> LoadBalancer<RoundRobin> {
    let backends = (0..endpoints)
        .filter_map(|key| {
            Backend::new_with_weight(
                &format!("127.0.0.1:{}", 10_000 + key),
                100 + (key % 7) as usize,
            )
            .ok()
        })
        .collect();
    let balancer = LoadBalancer::from_backends(Backends::new(discovery::Static::new(backends)));
    // Static discovery completes at once.
    let _ = balancer.update().now_or_never();
    balancer
}

/// Runs `work` for `iterations` rounds split over `threads` threads; the wall time.
fn on_threads(
    threads: u64,
    iterations: u64,
    work: impl Fn(u64) + Send + Sync + 'static,
) -> Duration {
    let work = Arc::new(work);
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let work = work.clone();
            let rounds = iterations.max(threads) / threads;
            std::thread::spawn(move || work(rounds))
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
    started.elapsed()
}

/// One benchmark: `work(rounds)` on `threads` threads, each taking its share of the iterations.
fn bench(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    endpoints: u32,
    threads: u64,
    work: impl Fn(u64) + Clone + Send + Sync + 'static,
) {
    group.bench_with_input(
        BenchmarkId::new(format!("{name}/{threads}_thread"), endpoints),
        &endpoints,
        |b, _| b.iter_custom(|iterations| on_threads(threads, iterations, work.clone())),
    );
}

fn compare(c: &mut Criterion) {
    let mut group = c.benchmark_group("weighted_pick");
    group.throughput(Throughput::Elements(1));
    for endpoints in [5, 100, 1000] {
        let mine = Arc::new(ours(endpoints));
        let theirs = Arc::new(pingora(endpoints));
        for threads in [1u64, 2] {
            let shared = mine.clone();
            bench(
                &mut group,
                "rocketmesh_pick_and_report",
                endpoints,
                threads,
                move |rounds| {
                    for _ in 0..rounds {
                        if let Some(picked) = shared.pick(&mut ThreadRandom) {
                            shared.report(black_box(picked), Outcome::Success);
                        }
                    }
                },
            );
            let shared = mine.clone();
            bench(
                &mut group,
                "rocketmesh_picker_pick_and_report",
                endpoints,
                threads,
                move |rounds| {
                    let mut picker = shared.picker();
                    for _ in 0..rounds {
                        if let Some(picked) = picker.pick() {
                            picker.report(black_box(picked), Outcome::Success);
                        }
                    }
                },
            );
            let shared = theirs.clone();
            bench(
                &mut group,
                "pingora_select",
                endpoints,
                threads,
                move |rounds| {
                    for _ in 0..rounds {
                        black_box(shared.select(b"", 256));
                    }
                },
            );
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = compare
}
criterion_main!(benches);
