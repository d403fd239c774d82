//! Which version answers a request under a rollout.
//!
//! A request that names a version or a label gets exactly that: the caller asked for it.
//! The rest are split by the canary's weight. With a routing key (the stream processor
//! sends the device id) the split is sticky: the key hashes to one of 10,000 buckets and
//! the canary takes the buckets below its weight in basis points. So a device sees the
//! same version for as long as the weight stays, and raising the weight only moves devices
//! from stable to canary, never back: a device on the canary at 5% is still on it at 25%,
//! and its score history switches model once, not back and forth. The hash is xxh3 of the
//! key seeded by the model name, fixed across replicas, restarts and releases, so every
//! replica routes a device the same way without talking to the others. A request without
//! a key is split at random by the same weight.
//!
//! Shadow traffic uses the same scheme on an independent hash: a sticky share of the
//! devices the stable version answers is also scored by the canary, whose answer is only
//! recorded, never returned.

use rand::RngExt as _;

/// Buckets a routing key falls into; a weight is a number of them (basis points).
pub const BUCKETS: u16 = 10_000;

/// Seeds the shadow hash apart from the split's, so the shadowed devices are not a slice
/// of the bucket range next to the canary's.
const SHADOW_SALT: u64 = 0x5348_4144_4f57_0001;

/// A share of traffic in basis points: 1% is 100, all of it 10,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Weight(u16);

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("a traffic share must be 0-100%, not {0}%")]
pub struct WeightOutOfRange(pub f64);

impl Weight {
    pub const ZERO: Weight = Weight(0);
    pub const FULL: Weight = Weight(BUCKETS);

    /// `percent` rounded to a basis point.
    pub fn from_percent(percent: f64) -> Result<Self, WeightOutOfRange> {
        if !(0.0..=100.0).contains(&percent) {
            return Err(WeightOutOfRange(percent));
        }
        Ok(Self((percent * 100.0).round() as u16))
    }

    pub fn basis_points(self) -> u16 {
        self.0
    }

    pub fn percent(self) -> f64 {
        f64::from(self.0) / 100.0
    }
}

impl std::fmt::Display for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}%", self.percent())
    }
}

/// Which side of a rollout answers a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arm {
    Stable,
    Canary,
}

/// A model's versions under a rollout, and the canary's share of unpinned traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    pub stable: i64,
    pub canary: i64,
    pub canary_weight: Weight,
}

impl Split {
    /// The arm that answers an unpinned request for `model`: sticky by `routing_key`
    /// when there is one, at random otherwise.
    pub fn arm(&self, model: &str, routing_key: Option<&[u8]>, rng: &mut impl rand::Rng) -> Arm {
        let bucket = match routing_key {
            Some(key) => bucket(model, key),
            None => rng.random_range(0..BUCKETS),
        };
        if bucket < self.canary_weight.0 { Arm::Canary } else { Arm::Stable }
    }

    pub fn version(&self, arm: Arm) -> i64 {
        match arm {
            Arm::Stable => self.stable,
            Arm::Canary => self.canary,
        }
    }
}

/// The bucket (0..[`BUCKETS`]) `key` falls into for `model`.
pub fn bucket(model: &str, key: &[u8]) -> u16 {
    seeded_bucket(xxhash_rust::xxh3::xxh3_64(model.as_bytes()), key)
}

fn seeded_bucket(seed: u64, key: &[u8]) -> u16 {
    (xxhash_rust::xxh3::xxh3_64_with_seed(key, seed) % u64::from(BUCKETS)) as u16
}

/// Whether a request the stable version answers is also scored by the canary in shadow,
/// for `share` of such requests: sticky by `routing_key` when there is one.
pub fn shadowed(model: &str, routing_key: Option<&[u8]>, share: Weight, rng: &mut impl rand::Rng) -> bool {
    let bucket = match routing_key {
        Some(key) => seeded_bucket(xxhash_rust::xxh3::xxh3_64(model.as_bytes()) ^ SHADOW_SALT, key),
        None => rng.random_range(0..BUCKETS),
    };
    bucket < share.0
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng as _;
    use rand::rngs::StdRng;

    use super::*;

    fn split(percent: f64) -> Split {
        Split { stable: 1, canary: 2, canary_weight: Weight::from_percent(percent).unwrap() }
    }

    fn key(i: usize) -> Vec<u8> {
        format!("car-{i:05}").into_bytes()
    }

    /// Within 5 standard deviations of the binomial count: fails by chance about once in
    /// 3.5 million runs, and at any real bias of a percentage point.
    fn assert_near_share(count: usize, n: usize, share: f64, what: &str) {
        let expected = n as f64 * share;
        let sd = (n as f64 * share * (1.0 - share)).sqrt();
        assert!(
            (count as f64 - expected).abs() <= 5.0 * sd,
            "{what}: {count} of {n}, expected {expected:.0} +- {:.0}",
            5.0 * sd
        );
    }

    #[test]
    fn keyed_requests_split_by_weight() {
        let mut rng = StdRng::seed_from_u64(1);
        let n = 100_000;
        for percent in [1.0, 5.0, 25.0, 50.0, 90.0] {
            let s = split(percent);
            let canary = (0..n).filter(|&i| s.arm("car-anomaly", Some(&key(i)), &mut rng) == Arm::Canary).count();
            assert_near_share(canary, n, percent / 100.0, &format!("{percent}% by key"));
        }
    }

    #[test]
    fn unkeyed_requests_split_by_weight() {
        let mut rng = StdRng::seed_from_u64(2);
        let n = 100_000;
        for percent in [5.0, 50.0] {
            let s = split(percent);
            let canary = (0..n).filter(|_| s.arm("car-anomaly", None, &mut rng) == Arm::Canary).count();
            assert_near_share(canary, n, percent / 100.0, &format!("{percent}% at random"));
        }
    }

    #[test]
    fn a_key_sees_one_version_per_weight_and_raising_the_weight_never_moves_it_back() {
        let mut rng = StdRng::seed_from_u64(3);
        let weights = [0.0, 5.0, 25.0, 50.0, 100.0];
        for i in 0..20_000 {
            let arms: Vec<Arm> = weights
                .iter()
                .map(|&w| {
                    let first = split(w).arm("car-anomaly", Some(&key(i)), &mut rng);
                    for _ in 0..3 {
                        assert_eq!(split(w).arm("car-anomaly", Some(&key(i)), &mut rng), first, "sticky at {w}%");
                    }
                    first
                })
                .collect();
            assert_eq!(arms[0], Arm::Stable, "0% sends nothing to the canary");
            assert_eq!(arms[4], Arm::Canary, "100% sends everything to the canary");
            let first_canary = arms.iter().position(|&a| a == Arm::Canary).unwrap();
            assert!(arms[first_canary..].iter().all(|&a| a == Arm::Canary), "key {i}: {arms:?}");
        }
    }

    #[test]
    fn buckets_match_an_independent_xxh3() {
        // From Python's `xxhash` package (a binding of the reference C implementation):
        // xxh3_64_intdigest(key, seed=xxh3_64_intdigest(model)) % 10000.
        for (model, key, expected) in XXH3_GOLDEN {
            assert_eq!(bucket(model, key.as_bytes()), *expected, "{model} / {key}");
        }
    }

    const XXH3_GOLDEN: &[(&str, &str, u16)] = &[
        ("car-anomaly", "car-00000", 4080),
        ("car-anomaly", "car-00041", 428),
        ("car-anomaly", "", 3036),
        ("other-model", "car-00000", 2668),
        ("car-anomaly", "device-ü-7", 1547),
    ];

    #[test]
    fn shadow_share_is_sticky_and_independent_of_the_split() {
        let mut rng = StdRng::seed_from_u64(4);
        let n = 100_000;
        let share = Weight::from_percent(20.0).unwrap();
        let s = split(10.0);
        let (mut shadowed_count, mut shadowed_and_canary) = (0, 0);
        for i in 0..n {
            let shadow = shadowed("car-anomaly", Some(&key(i)), share, &mut rng);
            assert_eq!(shadow, shadowed("car-anomaly", Some(&key(i)), share, &mut rng), "sticky");
            if shadow {
                shadowed_count += 1;
                if s.arm("car-anomaly", Some(&key(i)), &mut rng) == Arm::Canary {
                    shadowed_and_canary += 1;
                }
            }
        }
        assert_near_share(shadowed_count, n, 0.2, "shadowed");
        // Independent hashes: a tenth of the shadowed keys are also canary keys.
        assert_near_share(shadowed_and_canary, shadowed_count, 0.1, "shadowed keys on the canary");
    }

    #[test]
    fn weights_outside_0_to_100_percent_are_refused() {
        for bad in [-0.5, 100.5, f64::NAN, f64::INFINITY] {
            assert!(Weight::from_percent(bad).is_err(), "{bad}");
        }
        assert_eq!(Weight::from_percent(12.345).unwrap().basis_points(), 1235);
        assert_eq!(Weight::from_percent(100.0).unwrap(), Weight::FULL);
        assert_eq!(Weight::from_percent(5.0).unwrap().to_string(), "5%");
    }
}
