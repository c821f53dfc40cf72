//! Balancer pick + report: 5, 100 and 1,000 endpoints; weighted and least-request; 1,000 endpoints
//! with 0.1% failures; on one thread and on two threads sharing one balancer. Each case runs through
//! the balancer itself (`shared`: per-thread snapshot cache, thread-local random) and through a
//! worker's own [`Picker`] handle (`picker`).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rocketmesh::balance::{
    Balancer, BalancerConfig, EndpointSpec, Outcome, OutlierConfig, Policy, SystemClock,
    ThreadRandom,
};

fn balancer(endpoints: u32, policy: Policy) -> Arc<Balancer<u32>> {
    let balancer = Balancer::new(
        BalancerConfig {
            policy,
            // Ejection would take failing endpoints out and change what is measured.
            outlier: OutlierConfig {
                consecutive_failures: 0,
                ..OutlierConfig::default()
            },
            ..BalancerConfig::default()
        },
        Arc::new(SystemClock::default()),
    );
    balancer.update(
        (0..endpoints)
            .map(|key| EndpointSpec {
                key,
                // Unequal weights: the alias-table path, not plain round robin.
                max_weight: 100.0 + f64::from(key % 7),
                min_weight: 0.0,
                priority: 0,
                zone: None,
            })
            .collect(),
    );
    Arc::new(balancer)
}

#[derive(Clone, Copy)]
enum Mode {
    Shared,
    Picker,
}

fn outcome(round: u64, fail_every: u64) -> Outcome {
    if fail_every != 0 && round.is_multiple_of(fail_every) {
        Outcome::Failure
    } else {
        Outcome::Success
    }
}

/// `iterations` pick + report rounds; every `fail_every`-th report is a failure (0: never).
fn run(balancer: &Balancer<u32>, mode: Mode, iterations: u64, fail_every: u64) {
    match mode {
        Mode::Shared => {
            let mut random = ThreadRandom;
            for round in 0..iterations {
                if let Some(picked) = balancer.pick(&mut random) {
                    balancer.report(black_box(picked), outcome(round, fail_every));
                }
            }
        }
        Mode::Picker => {
            let mut picker = balancer.picker();
            for round in 0..iterations {
                if let Some(picked) = picker.pick() {
                    picker.report(black_box(picked), outcome(round, fail_every));
                }
            }
        }
    }
}

fn on_threads(
    balancer: &Arc<Balancer<u32>>,
    mode: Mode,
    threads: u64,
    iterations: u64,
    fail_every: u64,
) -> Duration {
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let balancer = balancer.clone();
            std::thread::spawn(move || run(&balancer, mode, iterations / threads, fail_every))
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
    started.elapsed()
}

fn picks(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick_and_report");
    group.throughput(Throughput::Elements(1));
    let cases = [
        ("weighted", 5, Policy::Weighted, 0),
        ("weighted", 100, Policy::Weighted, 0),
        ("weighted", 1000, Policy::Weighted, 0),
        ("least_request", 5, Policy::LeastRequest { bias: 1.0 }, 0),
        ("least_request", 1000, Policy::LeastRequest { bias: 1.0 }, 0),
        ("weighted_0.1%_failures", 1000, Policy::Weighted, 1000),
    ];
    for (name, endpoints, policy, fail_every) in cases {
        let shared = balancer(endpoints, policy);
        for (mode, mode_name) in [(Mode::Shared, "shared"), (Mode::Picker, "picker")] {
            for threads in [1u64, 2] {
                let label = if threads == 1 {
                    "1_thread"
                } else {
                    "2_threads"
                };
                group.bench_with_input(
                    BenchmarkId::new(format!("{name}/{mode_name}/{label}"), endpoints),
                    &endpoints,
                    |b, _| {
                        b.iter_custom(|iterations| {
                            on_threads(&shared, mode, threads, iterations.max(threads), fail_every)
                        })
                    },
                );
            }
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = picks
}
criterion_main!(benches);
