//! Balancer behaviour with a fixed seed and a manual clock.

use super::*;

fn spec(key: u32, weight: f64, priority: u32) -> EndpointSpec<u32> {
    EndpointSpec {
        key,
        max_weight: weight,
        min_weight: 0.0,
        priority,
        zone: None,
    }
}

fn build(
    config: BalancerConfig,
    specs: Vec<EndpointSpec<u32>>,
) -> (Balancer<u32>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::default());
    let balancer = Balancer::new(config, clock.clone());
    balancer.update(specs);
    (balancer, clock)
}

/// Picks `n` times, reporting success, and counts picks per key.
fn counts(balancer: &Balancer<u32>, rng: &mut fastrand::Rng, n: usize) -> HashMap<u32, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let picked = balancer.pick(rng).expect("pick");
        *counts.entry(picked.key).or_default() += 1;
        balancer.report(picked, Outcome::Success);
    }
    counts
}

/// Pearson's chi-square statistic of observed counts against expected shares.
fn chi_square(counts: &HashMap<u32, usize>, expected: &[(u32, f64)], n: usize) -> f64 {
    expected
        .iter()
        .map(|(key, share)| {
            let want = share * n as f64;
            let got = *counts.get(key).unwrap_or(&0) as f64;
            (got - want).powi(2) / want
        })
        .sum()
}

fn weight_of_key(balancer: &Balancer<u32>, key: u32) -> f64 {
    balancer
        .endpoints()
        .into_iter()
        .find(|view| view.key == key)
        .map(|view| view.current_weight)
        .expect("endpoint")
}

fn fail(balancer: &Balancer<u32>, key: u32, outcome: Outcome) {
    // Pick until `key` comes up, so the report goes through the public path.
    let mut rng = fastrand::Rng::with_seed(u64::from(key));
    for _ in 0..100_000 {
        if let Some(picked) = balancer.pick(&mut rng) {
            if picked.key == key {
                balancer.report(picked, outcome);
                return;
            }
            balancer.report(picked, Outcome::Success);
        }
    }
    panic!("endpoint {key} was never picked");
}

#[test]
fn picks_match_the_weights_by_chi_square() {
    // Critical chi-square values at p = 0.001: 2 degrees of freedom 13.82, 4 degrees 18.47.
    let (balancer, _) = build(
        BalancerConfig::default(),
        vec![spec(1, 10.0, 0), spec(2, 20.0, 0), spec(3, 70.0, 0)],
    );
    let mut rng = fastrand::Rng::with_seed(42);
    let n = 200_000;
    let observed = counts(&balancer, &mut rng, n);
    let statistic = chi_square(&observed, &[(1, 0.1), (2, 0.2), (3, 0.7)], n);
    assert!(statistic < 13.82, "chi-square {statistic} for {observed:?}");

    // Degraded weights: endpoint 1 at 50 after one failure (the draw is by current weight,
    // through rejection sampling).
    let (balancer, _) = build(
        BalancerConfig {
            track_in_flight: true,
            ..BalancerConfig::default()
        },
        vec![
            spec(1, 100.0, 0),
            spec(2, 20.0, 0),
            spec(3, 70.0, 0),
            spec(4, 60.0, 0),
            spec(5, 30.0, 0),
        ],
    );
    fail(&balancer, 1, Outcome::Failure);
    assert_eq!(weight_of_key(&balancer, 1), 50.0);
    // Keep the weights still while counting: report nothing during the count.
    let mut rng = fastrand::Rng::with_seed(7);
    let mut observed: HashMap<u32, usize> = HashMap::new();
    let mut held = Vec::new();
    for _ in 0..n {
        let picked = balancer.pick(&mut rng).expect("pick");
        *observed.entry(picked.key).or_default() += 1;
        held.push(picked);
    }
    let total = 50.0 + 20.0 + 70.0 + 60.0 + 30.0;
    let shares: Vec<(u32, f64)> = [(1, 50.0), (2, 20.0), (3, 70.0), (4, 60.0), (5, 30.0)]
        .iter()
        .map(|(key, weight)| (*key, weight / total))
        .collect();
    let statistic = chi_square(&observed, &shares, n);
    assert!(statistic < 18.47, "chi-square {statistic} for {observed:?}");
    let in_flight: u32 = balancer.endpoints().iter().map(|view| view.in_flight).sum();
    assert_eq!(
        in_flight as usize, n,
        "every pick holds a slot until reported"
    );
    for picked in held {
        balancer.report(picked, Outcome::Success);
    }
    assert!(balancer.endpoints().iter().all(|view| view.in_flight == 0));
}

#[test]
fn equal_weights_take_turns_exactly() {
    let (balancer, _) = build(
        BalancerConfig::default(),
        vec![spec(1, 100.0, 0), spec(2, 100.0, 0), spec(3, 100.0, 0)],
    );
    let observed = counts(&balancer, &mut fastrand::Rng::with_seed(1), 3_000);
    assert_eq!(
        observed
            .values()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        [1_000].into()
    );
}

/// Share of picks that land in priority 0 when P0 has the given current weights (max 100 each)
/// and P1 is fully healthy.
fn p0_share(p0_weights: &[f64]) -> f64 {
    let mut specs: Vec<_> = (0..p0_weights.len() as u32)
        .map(|k| spec(k, 100.0, 0))
        .collect();
    specs.extend((100..110).map(|k| spec(k, 100.0, 1)));
    let (balancer, _) = build(
        BalancerConfig {
            outlier: OutlierConfig {
                consecutive_failures: 0,
                ..OutlierConfig::default()
            },
            ..BalancerConfig::default()
        },
        specs,
    );
    let snapshot = balancer.snapshot.load();
    for (key, weight) in p0_weights.iter().enumerate() {
        let member = &snapshot.members[snapshot.by_key[&(key as u32)]];
        member.state.update(|_, _, _| *weight);
    }
    let mut rng = fastrand::Rng::with_seed(99);
    let n = 100_000;
    let mut in_p0 = 0;
    for _ in 0..n {
        // Not reported: the weights stay where the test put them.
        if balancer.pick(&mut rng).expect("pick").priority() == 0 {
            in_p0 += 1;
        }
    }
    in_p0 as f64 / n as f64
}

#[test]
fn priority_shares_follow_envoys_table() {
    let close = |share: f64, want: f64| (share - want).abs() < 0.01;
    let at_71 = p0_share(&[71.0]);
    assert!(close(at_71, 0.994), "71% healthy P0 took {at_71}");
    let at_50 = p0_share(&[100.0, 0.0]);
    assert!(close(at_50, 0.70), "50% healthy P0 took {at_50}");
    let at_25 = p0_share(&[100.0, 0.0, 0.0, 0.0]);
    assert!(close(at_25, 0.35), "25% healthy P0 took {at_25}");
    assert!(close(p0_share(&[100.0, 100.0]), 1.0));
    assert!(close(p0_share(&[0.0, 0.0]), 0.0));
}

#[test]
fn weights_follow_the_documented_sequence() {
    let (balancer, _) = build(
        BalancerConfig {
            outlier: OutlierConfig {
                consecutive_failures: 0,
                ..OutlierConfig::default()
            },
            rules: WeightRules {
                recover_after_passes: 2,
                ..WeightRules::default()
            },
            ..BalancerConfig::default()
        },
        vec![spec(1, 100.0, 0), spec(2, 100.0, 0)],
    );
    let mut trail = Vec::new();
    for _ in 0..7 {
        fail(&balancer, 1, Outcome::Failure);
        trail.push(weight_of_key(&balancer, 1));
    }
    assert_eq!(trail, vec![50.0, 25.0, 12.5, 6.25, 3.125, 1.5625, 0.0]);
    assert_eq!(balancer.check_candidates(), vec![1]);
    balancer.check_result(&1, true);
    assert_eq!(
        weight_of_key(&balancer, 1),
        0.0,
        "one pass is not enough with a threshold of 2"
    );
    balancer.check_result(&1, false);
    balancer.check_result(&1, true);
    assert_eq!(
        weight_of_key(&balancer, 1),
        0.0,
        "a failed check restarts the count"
    );
    balancer.check_result(&1, true);
    assert_eq!(
        weight_of_key(&balancer, 1),
        10.0,
        "two passes in a row add 10% of max"
    );
    fail(&balancer, 1, Outcome::Success);
    assert_eq!(
        weight_of_key(&balancer, 1),
        11.0,
        "a success adds 1% of max"
    );
    fail(&balancer, 2, Outcome::Down);
    assert_eq!(
        weight_of_key(&balancer, 2),
        0.0,
        "down drops to the minimum at once"
    );
}

#[test]
fn ejection_and_return_follow_the_timeline() {
    let specs: Vec<_> = (0..10).map(|k| spec(k, 100.0, 0)).collect();
    let (balancer, clock) = build(BalancerConfig::default(), specs);
    let ejected = |key: u32| {
        balancer
            .endpoints()
            .iter()
            .any(|view| view.key == key && view.ejected)
    };
    for _ in 0..5 {
        fail(&balancer, 3, Outcome::Failure);
    }
    assert!(ejected(3), "5 consecutive failures eject");
    // At most 10% of the level (one endpoint) may be out at once.
    for _ in 0..5 {
        fail(&balancer, 4, Outcome::Failure);
    }
    assert!(!ejected(4), "a second ejection would exceed the share");
    let mut rng = fastrand::Rng::with_seed(5);
    let picks_of = |rng: &mut fastrand::Rng, key: u32| {
        (0..10_000)
            .filter(|_| {
                // Not reported: ejection and weights stay as the timeline set them.
                balancer.pick(rng).expect("pick").key == key
            })
            .count()
    };
    assert_eq!(
        picks_of(&mut rng, 3),
        0,
        "an ejected endpoint takes no traffic"
    );
    clock.advance(Duration::from_secs(29));
    assert!(ejected(3));
    clock.advance(Duration::from_secs(2));
    assert!(!ejected(3), "back after the 30 s base ejection");
    assert!(picks_of(&mut rng, 3) > 0, "and picked again");
    assert_eq!(
        weight_of_key(&balancer, 3),
        10.0,
        "returning at the recovery step"
    );
    // Successes climb back to full weight (no clock time passes, so nothing is forgiven)...
    for _ in 0..90 {
        fail(&balancer, 3, Outcome::Success);
    }
    assert_eq!(weight_of_key(&balancer, 3), 100.0);
    // ...and a second ejection lasts twice as long.
    for _ in 0..5 {
        fail(&balancer, 3, Outcome::Failure);
    }
    assert!(ejected(3));
    clock.advance(Duration::from_secs(59));
    assert!(ejected(3));
    clock.advance(Duration::from_secs(2));
    assert!(!ejected(3));
    let ejections = |balancer: &Balancer<u32>| {
        balancer
            .endpoints()
            .iter()
            .find(|v| v.key == 3)
            .map(|v| v.ejections)
    };
    assert_eq!(ejections(&balancer), Some(2));
    // In service for a base ejection time after it: one ejection is forgiven.
    for _ in 0..90 {
        fail(&balancer, 3, Outcome::Success);
    }
    assert_eq!(ejections(&balancer), Some(2));
    clock.advance(Duration::from_secs(30));
    fail(&balancer, 3, Outcome::Success);
    assert_eq!(ejections(&balancer), Some(1));
}

#[test]
fn a_hot_update_keeps_the_state_of_endpoints_that_stay() {
    let (balancer, _) = build(
        BalancerConfig {
            initial_weight_share: 0.05,
            track_in_flight: true,
            ..BalancerConfig::default()
        },
        vec![spec(1, 100.0, 0), spec(2, 100.0, 0), spec(3, 100.0, 0)],
    );
    assert_eq!(weight_of_key(&balancer, 1), 5.0, "new endpoints start slow");
    let snapshot = balancer.snapshot.load();
    for key in [1, 2, 3] {
        snapshot.members[snapshot.by_key[&key]]
            .state
            .update(|_, _, max| max);
    }
    drop(snapshot);
    fail(&balancer, 1, Outcome::Failure);
    let held = balancer
        .pick_excluding(&mut fastrand::Rng::with_seed(3), &[1, 3])
        .expect("pick");
    assert_eq!(held.key, 2);
    let result = balancer.update(vec![spec(1, 100.0, 0), spec(2, 50.0, 1), spec(4, 100.0, 0)]);
    assert_eq!(result.added, vec![4]);
    assert_eq!(result.removed, vec![3]);
    assert_eq!(result.changed, vec![2]);
    assert_eq!(
        weight_of_key(&balancer, 1),
        50.0,
        "kept its degraded weight"
    );
    assert_eq!(
        weight_of_key(&balancer, 2),
        50.0,
        "rescaled to its new maximum"
    );
    assert_eq!(weight_of_key(&balancer, 4), 5.0, "slow start");
    let in_flight = balancer
        .endpoints()
        .iter()
        .find(|v| v.key == 2)
        .map(|v| v.in_flight);
    assert_eq!(in_flight, Some(1), "in-flight counts carry over");
    balancer.report(held, Outcome::Success);
    assert!(balancer.endpoints().iter().all(|view| view.in_flight == 0));
    let loads = balancer.priority_loads();
    assert_eq!(
        loads.iter().map(|(p, _, _)| *p).collect::<Vec<_>>(),
        vec![0, 1]
    );
}

#[test]
fn exclusions_and_total_outage_are_explicit() {
    let specs = vec![spec(1, 100.0, 0), spec(2, 100.0, 1)];
    let (balancer, _) = build(BalancerConfig::default(), specs.clone());
    let mut rng = fastrand::Rng::with_seed(11);
    for _ in 0..100 {
        let picked = balancer.pick_excluding(&mut rng, &[1]).expect("pick");
        assert_eq!(picked.key, 2, "an excluded endpoint is never picked");
        balancer.report(picked, Outcome::Success);
    }
    assert!(balancer.pick_excluding(&mut rng, &[1, 2]).is_none());
    fail(&balancer, 1, Outcome::Down);
    fail(&balancer, 2, Outcome::Down);
    let spread = balancer.pick(&mut rng);
    assert!(
        spread.is_some(),
        "with every endpoint down, picks spread over all of them"
    );
    let (strict, _) = balancer_strict(specs);
    fail(&strict, 1, Outcome::Down);
    fail(&strict, 2, Outcome::Down);
    assert!(strict.pick(&mut rng).is_none(), "or fail, when configured");
}

fn balancer_strict(specs: Vec<EndpointSpec<u32>>) -> (Balancer<u32>, Arc<ManualClock>) {
    build(
        BalancerConfig {
            fail_when_all_down: true,
            ..BalancerConfig::default()
        },
        specs,
    )
}

#[test]
fn least_request_avoids_busy_endpoints() {
    let (balancer, _) = build(
        BalancerConfig {
            policy: Policy::LeastRequest { bias: 1.0 },
            ..BalancerConfig::default()
        },
        vec![spec(1, 100.0, 0), spec(2, 100.0, 0)],
    );
    let mut rng = fastrand::Rng::with_seed(8);
    // Endpoint 1 gets stuck with 20 requests in flight.
    let stuck: Vec<_> = (0..20)
        .map(|_| balancer.pick_excluding(&mut rng, &[2]).expect("pick"))
        .collect();
    let observed = counts(&balancer, &mut rng, 10_000);
    assert!(
        observed.get(&1).copied().unwrap_or(0) < 3_000,
        "{observed:?}"
    );
    for picked in stuck {
        balancer.report(picked, Outcome::Success);
    }
}

#[test]
fn concurrent_reports_lose_no_weight_updates() {
    let specs: Vec<_> = (0..8).map(|k| spec(k, 100.0, 0)).collect();
    let (balancer, _) = build(
        BalancerConfig {
            outlier: OutlierConfig {
                consecutive_failures: 0,
                ..OutlierConfig::default()
            },
            track_in_flight: true,
            ..BalancerConfig::default()
        },
        specs,
    );
    let balancer = Arc::new(balancer);
    let threads: Vec<_> = (0..4)
        .map(|seed| {
            let balancer = balancer.clone();
            std::thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(seed);
                for round in 0..20_000 {
                    let picked = balancer.pick(&mut rng).expect("pick");
                    let outcome = if round % 10 == 0 {
                        Outcome::Failure
                    } else {
                        Outcome::Success
                    };
                    balancer.report(picked, outcome);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("thread");
    }
    let sum: f64 = balancer.endpoints().iter().map(|v| v.current_weight).sum();
    let (_, health, _) = balancer.priority_loads()[0];
    assert!(
        (health - sum / 800.0).abs() < 1e-9,
        "group total {health} vs weights {sum}"
    );
    assert!(balancer.endpoints().iter().all(|view| view.in_flight == 0));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, rng_seed: proptest::test_runner::RngSeed::Fixed(20261121), ..ProptestConfig::default() })]

        /// Any sequence of outcomes keeps every weight within [min, max] and each level's total equal
        /// to the sum of its endpoints' weights; in-flight slots all come back.
        #[test]
        fn outcomes_keep_weights_in_bounds_and_totals_exact(
            weights in proptest::collection::vec(1u32..500, 1..8),
            outcomes in proptest::collection::vec(0u8..3, 1..300),
        ) {
            let specs: Vec<_> = weights
                .iter()
                .enumerate()
                .map(|(key, weight)| spec(key as u32, f64::from(*weight), key as u32 % 2))
                .collect();
            let (balancer, _) = build(
                BalancerConfig { track_in_flight: true, ..BalancerConfig::default() },
                specs,
            );
            let mut rng = fastrand::Rng::with_seed(3);
            for outcome in outcomes {
                let Some(picked) = balancer.pick(&mut rng) else { continue };
                let outcome = match outcome {
                    0 => Outcome::Success,
                    1 => Outcome::Failure,
                    _ => Outcome::Down,
                };
                balancer.report(picked, outcome);
            }
            for view in balancer.endpoints() {
                prop_assert!(view.current_weight >= view.min_weight && view.current_weight <= view.max_weight);
                prop_assert_eq!(view.in_flight, 0);
            }
            for (priority, health, _) in balancer.priority_loads() {
                let (sum, max): (f64, f64) = balancer
                    .endpoints()
                    .iter()
                    .filter(|view| view.priority == priority)
                    .fold((0.0, 0.0), |(s, m), v| (s + v.current_weight, m + v.max_weight));
                prop_assert!((health - sum / max).abs() < 1e-9);
            }
        }
    }
}

#[test]
fn a_picker_follows_the_weights_and_the_updates() {
    let (balancer, _) = build(
        BalancerConfig {
            track_in_flight: true,
            ..BalancerConfig::default()
        },
        vec![spec(1, 10.0, 0), spec(2, 20.0, 0), spec(3, 70.0, 0)],
    );
    let mut picker = balancer.picker_with(fastrand::Rng::with_seed(11));
    let n = 200_000;
    let mut observed: HashMap<u32, usize> = HashMap::new();
    for _ in 0..n {
        let picked = picker.pick().expect("pick");
        *observed.entry(picked.key).or_default() += 1;
        picker.report(picked, Outcome::Success);
    }
    let statistic = chi_square(&observed, &[(1, 0.1), (2, 0.2), (3, 0.7)], n);
    assert!(statistic < 13.82, "chi-square {statistic} for {observed:?}");

    // A pick held across an update that moves every index still reports to its endpoint.
    let held = picker.pick_excluding(&[1, 2]).expect("pick");
    assert_eq!(held.key, 3);
    balancer.update(vec![
        spec(4, 100.0, 0),
        spec(1, 10.0, 0),
        spec(2, 20.0, 0),
        spec(3, 70.0, 0),
    ]);
    picker.report(held, Outcome::Failure);
    assert_eq!(weight_of_key(&balancer, 3), 35.0, "the failure reached 3");
    assert_eq!(weight_of_key(&balancer, 4), 100.0);
    assert!(balancer.endpoints().iter().all(|view| view.in_flight == 0));

    // The picker sees the new set at once: 3 removed, 4 added.
    balancer.update(vec![spec(1, 10.0, 0), spec(2, 20.0, 0), spec(4, 100.0, 0)]);
    let mut seen: HashMap<u32, usize> = HashMap::new();
    for _ in 0..10_000 {
        let picked = picker.pick().expect("pick");
        *seen.entry(picked.key).or_default() += 1;
        // Picks from a picker may be reported to the balancer itself.
        balancer.report(picked, Outcome::Success);
    }
    assert_eq!(seen.get(&3), None, "{seen:?}");
    assert!(seen.get(&4).is_some_and(|count| *count > 7_000), "{seen:?}");
}

#[test]
fn observed_outcomes_move_weights_like_reports() {
    let (balancer, _) = build(
        BalancerConfig {
            track_in_flight: true,
            outlier: OutlierConfig {
                consecutive_failures: 3,
                max_ejection_share: 0.5,
                ..OutlierConfig::default()
            },
            ..BalancerConfig::default()
        },
        vec![spec(1, 100.0, 0), spec(2, 100.0, 0)],
    );
    balancer.observe(&1, Outcome::Failure);
    assert_eq!(weight_of_key(&balancer, 1), 50.0);
    balancer.observe(&1, Outcome::Success);
    assert_eq!(weight_of_key(&balancer, 1), 51.0);
    balancer.observe(&9, Outcome::Failure);
    assert_eq!(
        weight_of_key(&balancer, 2),
        100.0,
        "an unknown key changes nothing"
    );
    for _ in 0..3 {
        balancer.observe(&2, Outcome::Failure);
    }
    assert_eq!(weight_of_key(&balancer, 2), 12.5);
    let view = |key| {
        balancer
            .endpoints()
            .into_iter()
            .find(|view| view.key == key)
            .expect("endpoint")
    };
    assert!(!view(2).ejected, "observed failures do not eject");
    assert!(balancer.endpoints().iter().all(|view| view.in_flight == 0));
    balancer.observe(&2, Outcome::Down);
    assert_eq!(weight_of_key(&balancer, 2), 0.0);
}
