//! A fleet of cars: who develops which fault and when, and stepping them together.

use prost_types::Timestamp;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use sensor::{FaultKind, SensorReading};

use crate::car::{Car, FaultPlan, STUCK_CANDIDATES, mix};

/// The fault kinds the simulator injects, each with its own signature in the signals.
pub const FAULT_KINDS: [FaultKind; 6] = [
    FaultKind::ShockAbsorber,
    FaultKind::TirePressureLoss,
    FaultKind::DriveShaftWear,
    FaultKind::Overheating,
    FaultKind::BatteryFailure,
    FaultKind::StuckSensor,
];

/// What the fleet looks like; the same values give the same readings.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetOptions {
    pub cars: usize,
    pub seed: u64,
    /// Share of cars (0-1) that develop a fault during the run.
    pub fault_share: f64,
    /// The kinds to draw from (all of [`FAULT_KINDS`] by default).
    pub fault_kinds: Vec<FaultKind>,
    /// Onsets are drawn uniformly from this window, in seconds since the car started.
    pub onset_window_s: (f64, f64),
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self { cars: 100, seed: 42, fault_share: 0.1, fault_kinds: FAULT_KINDS.to_vec(), onset_window_s: (60.0, 600.0) }
    }
}

/// Decides each car's fault from its own random stream (separate from its driving, so
/// changing the fault share never changes how a car drives).
pub fn fault_plan(options: &FleetOptions, index: usize) -> Option<FaultPlan> {
    const FAULT_STREAM: u64 = 0xFA_u64 << 56;
    let mut rng = StdRng::seed_from_u64(mix(options.seed ^ FAULT_STREAM, index as u64));
    let faulty = rng.random_bool(options.fault_share.clamp(0.0, 1.0));
    let kind = options.fault_kinds.get(rng.random_range(0..options.fault_kinds.len().max(1))).copied();
    let (from, to) = options.onset_window_s;
    let onset_s = if to > from { rng.random_range(from..to) } else { from };
    let target = rng.random_range(0..4 * STUCK_CANDIDATES.len());
    faulty.then_some(()).and(kind).map(|kind| FaultPlan { kind, onset_s, target })
}

/// Car number `index` of the fleet `options` describe, with its fault.
pub fn car(options: &FleetOptions, index: usize) -> Car {
    Car::new(index, options.seed, fault_plan(options, index))
}

pub struct Fleet {
    cars: Vec<Car>,
    start: Timestamp,
}

impl Fleet {
    /// The fleet, its clock starting at `start`.
    pub fn new(options: &FleetOptions, start: Timestamp) -> Self {
        let cars = (0..options.cars).map(|i| car(options, i)).collect();
        Self { cars, start }
    }

    pub fn cars(&self) -> &[Car] {
        &self.cars
    }

    /// Advances every car by `dt` seconds: one reading per car, in car order.
    pub fn step(&mut self, dt: f64) -> Vec<SensorReading> {
        self.cars.iter_mut().map(|car| car.step(dt, &self.start)).collect()
    }

    /// Advances car `index` alone (live publishing steps cars on their own schedules).
    pub fn step_car(&mut self, index: usize, dt: f64) -> SensorReading {
        self.cars[index].step(dt, &self.start)
    }
}
