//! One simulated car: a driving cycle and the physics that tie its 18 signals together,
//! plus the faults it can develop.
//!
//! The state advances in simulated time, so the same seed gives the same readings whether
//! the fleet runs live over MQTT or offline into a file. Every step draws the same random
//! numbers in the same order whatever the car's fault, so a faulty car and its healthy twin
//! (same seed, no fault) read identically until the fault's onset: the tests use that to
//! check each fault shows in the signals it should.
//!
//! The model, in short: speed follows segments (stopped, city, highway) with bounded
//! acceleration; throttle, intake air flow and engine vibration follow speed and
//! acceleration; coolant warms from ambient to the thermostat's band; a hybrid traction
//! battery drains under load, recovers by regeneration and engine charging, and its voltage
//! sags with current; tyres warm up a little; each wheel's RMS vertical acceleration is
//! road roughness growing with speed.

use prost_types::Timestamp;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;
use sensor::{FaultKind, SensorReading};

/// A fault a car develops: what, when (simulated seconds since the car started), and how
/// fast it reaches full severity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultPlan {
    pub kind: FaultKind,
    pub onset_s: f64,
    /// Which wheel (tyre loss, shock absorber) or which stuck signal, by index.
    pub target: usize,
}

/// Seconds from onset to full severity: short, so a fault is a fault from its first
/// labelled reading on, rather than a long ambiguous drift.
pub const RAMP_S: f64 = 10.0;

/// Sensors that can get stuck, and the value each then reports: its rail, as an open or
/// shorted circuit reads (an NTC coolant sensor open-circuit reads its coldest; a dead
/// speed, air-flow, vibration or throttle sensor reads zero). [`FaultPlan::target`] picks
/// one. A sensor frozen at its last plausible value would be invisible in any single
/// reading, which is all a per-event detector sees.
pub const STUCK_CANDIDATES: [(&str, f64); 5] = [
    ("coolant_temp", -40.0),
    ("intake_air_flow_speed", 0.0),
    ("speed", 0.0),
    ("engine_vibration_amplitude", 0.0),
    ("throttle_pos", 0.0),
];

const BATTERY_CAPACITY_AS: f64 = 18.6 * 3600.0; // 18.6 Ah, a ~6.5 kWh hybrid pack at 350 V
const NOISE_DRAWS: usize = 16;

#[derive(Debug)]
pub struct Car {
    pub device_id: String,
    rng: StdRng,
    fault: Option<FaultPlan>,
    t: f64,
    sequence: u64,
    firmware: u32,
    ambient: f64,
    speed: f64,
    target_speed: f64,
    segment_left: f64,
    coolant: f64,
    soc: f64,
    charging: bool,
    tire_base: [f64; 4],
    driven_s: f64,
}

impl Car {
    /// Car number `index` of a fleet with `seed`: its own random stream, so cars are
    /// independent of each other and of how many there are.
    pub fn new(index: usize, seed: u64, fault: Option<FaultPlan>) -> Self {
        let mut rng = StdRng::seed_from_u64(mix(seed, index as u64));
        let ambient = rng.random_range(2.0..28.0);
        // Some cars start warm (driven shortly before), most from cold.
        let coolant = if rng.random_bool(0.3) { rng.random_range(80.0..92.0) } else { ambient };
        let tire_base = std::array::from_fn(|_| 33.5 + 0.6 * rng.sample::<f64, _>(StandardNormal));
        Self {
            device_id: format!("car-{index:05}"),
            firmware: if rng.random_bool(0.7) { 2000 } else { 2100 },
            soc: rng.random_range(45.0..90.0),
            rng,
            fault,
            t: 0.0,
            sequence: 0,
            ambient,
            speed: 0.0,
            target_speed: 0.0,
            segment_left: 0.0,
            coolant,
            charging: false,
            tire_base,
            driven_s: 0.0,
        }
    }

    pub fn fault(&self) -> Option<FaultPlan> {
        self.fault
    }

    /// The fault active at the car's current time, if any, and its severity in (0, 1].
    fn active_fault(&self) -> Option<(FaultPlan, f64)> {
        let plan = self.fault?;
        (self.t >= plan.onset_s).then(|| (plan, ((self.t - plan.onset_s) / RAMP_S).clamp(0.05, 1.0)))
    }

    /// Advances `dt` seconds and returns the reading taken at the new time, stamped with
    /// `start` + the car's elapsed time.
    pub fn step(&mut self, dt: f64, start: &Timestamp) -> SensorReading {
        let noise: [f64; NOISE_DRAWS] = std::array::from_fn(|_| self.rng.sample(StandardNormal));
        let segment_draw: (f64, f64) = (self.rng.random(), self.rng.random());
        self.t += dt;
        self.sequence += 1;
        let fault = self.active_fault();
        let severity = |kind: FaultKind| fault.filter(|(p, _)| p.kind == kind).map_or(0.0, |(_, s)| s);

        // Driving cycle: a segment sets a target speed for a while.
        self.segment_left -= dt;
        if self.segment_left <= 0.0 {
            let (kind, length) = segment_draw;
            (self.target_speed, self.segment_left) = match kind {
                k if k < 0.15 => (0.0, 10.0 + 30.0 * length),
                k if k < 0.6 => (8.0 + 6.0 * length, 30.0 + 90.0 * length),
                _ => (25.0 + 8.0 * length, 60.0 + 240.0 * length),
            };
        }
        let previous = self.speed;
        let wanted = (self.target_speed - self.speed) / dt;
        let accel = wanted.clamp(-3.5, 2.5);
        self.speed = (self.speed + accel * dt + 0.15 * noise[0]).max(0.0);
        let accel = (self.speed - previous) / dt;
        if self.speed > 0.5 {
            self.driven_s += dt;
        }

        let throttle = if accel < -0.2 {
            (0.02 + 0.01 * noise[1]).clamp(0.0, 1.0)
        } else {
            (0.06 + 0.012 * self.speed + 0.22 * accel.max(0.0) + 0.02 * noise[1]).clamp(0.0, 1.0)
        };
        let air_flow = (2.5 + 1.6 * self.speed * (0.4 + throttle) + 0.8 * noise[2]).max(0.0);
        let shaft = 1.0 + 0.9 * severity(FaultKind::DriveShaftWear);
        let vibration = (180.0 + 55.0 * self.speed * shaft + 120.0 * throttle + 25.0 * noise[3]).max(0.0);

        // Coolant: warms toward the thermostat's band (higher under load). A failed pump or
        // fan moves the band up by 45 degC and the engine heats fast toward it.
        let overheating = severity(FaultKind::Overheating);
        let band = 90.0 + 4.0 * throttle + 45.0 * overheating;
        let tau = match () {
            _ if overheating > 0.0 => 30.0,
            _ if self.coolant < band => 150.0,
            _ => 60.0,
        };
        self.coolant += (band - self.coolant) * (1.0 - (-dt / tau).exp()) + 0.15 * noise[4];
        let intake_temp = self.ambient + 2.0 + 0.06 * (self.coolant - self.ambient) + 0.3 * noise[5];

        // Hybrid battery: load draws, braking regenerates, the engine charges it when low.
        // A failing battery holds a fifth of its charge, its resistance rises eightfold and a
        // shorted cell group takes 15 V off its open-circuit voltage.
        let battery_fault = severity(FaultKind::BatteryFailure);
        if self.soc < 30.0 {
            self.charging = true;
        } else if self.soc > 60.0 {
            self.charging = false;
        }
        let mut current = if accel < -0.3 { -18.0 * accel.abs().min(3.0) } else { 6.0 + 55.0 * throttle };
        if self.charging {
            current -= 30.0;
        }
        current += 1.5 * noise[6];
        let capacity = BATTERY_CAPACITY_AS * (1.0 - 0.8 * battery_fault);
        self.soc = (self.soc - current * dt / capacity * 100.0).clamp(0.0, 100.0);
        let resistance = 0.08 * (1.0 + 7.0 * battery_fault);
        let voltage = 330.0 + 0.6 * self.soc - 15.0 * battery_fault - resistance * current + 0.4 * noise[7];

        // Tyres warm by ~1.5 psi over the first ten minutes of driving; a leak takes one
        // toward 15 psi below its base.
        let warm = 1.5 * (1.0 - (-self.driven_s / 600.0).exp());
        let leak = fault.filter(|(p, _)| p.kind == FaultKind::TirePressureLoss);
        let tires: [f64; 4] = std::array::from_fn(|i| {
            let lost = leak.filter(|(p, _)| p.target % 4 == i).map_or(0.0, |(_, s)| 15.0 * s);
            self.tire_base[i] + warm - lost + 0.1 * noise[8 + i]
        });

        // Each wheel's RMS vertical acceleration over the interval: road roughness growing
        // with speed; a worn shock absorber lets its wheel move four times as much.
        let shock = fault.filter(|(p, _)| p.kind == FaultKind::ShockAbsorber);
        let accelerometers: [f64; 4] = std::array::from_fn(|i| {
            let damping = 1.0 + shock.filter(|(p, _)| p.target % 4 == i).map_or(0.0, |(_, s)| 3.0 * s);
            ((0.3 + 0.04 * self.speed) * damping * (1.0 + 0.1 * noise[12 + i])).max(0.0)
        });

        let mut reading = SensorReading {
            device_id: self.device_id.clone(),
            event_time: Some(offset(start, self.t)),
            sequence: self.sequence,
            fault: fault.map_or(FaultKind::None, |(p, _)| p.kind) as i32,
            coolant_temp: self.coolant as f32,
            intake_air_temp: intake_temp as f32,
            intake_air_flow_speed: air_flow as f32,
            battery_percentage: self.soc as f32,
            battery_voltage: voltage as f32,
            current_draw: current as f32,
            speed: self.speed as f32,
            engine_vibration_amplitude: vibration as f32,
            throttle_pos: throttle as f32,
            tire_pressure_1_1: tires[0] as f32,
            tire_pressure_1_2: tires[1] as f32,
            tire_pressure_2_1: tires[2] as f32,
            tire_pressure_2_2: tires[3] as f32,
            accelerometer_1_1_value: accelerometers[0] as f32,
            accelerometer_1_2_value: accelerometers[1] as f32,
            accelerometer_2_1_value: accelerometers[2] as f32,
            accelerometer_2_2_value: accelerometers[3] as f32,
            control_unit_firmware: self.firmware,
        };
        // A stuck sensor reports its rail value from the onset on.
        if let Some((plan, _)) = fault.filter(|(p, _)| p.kind == FaultKind::StuckSensor) {
            let (name, rail) = STUCK_CANDIDATES[plan.target % STUCK_CANDIDATES.len()];
            sensor::signal(name).expect("stuck candidates are signals").set(&mut reading, rail);
        }
        clamp_to_ranges(&mut reading);
        reading
    }
}

/// Keeps every signal inside its valid range (a physical sensor saturates).
fn clamp_to_ranges(reading: &mut SensorReading) {
    for signal in sensor::signals() {
        let value = signal.get(reading);
        if value < signal.min || value > signal.max {
            signal.set(reading, value.clamp(signal.min, signal.max));
        }
    }
}

fn offset(start: &Timestamp, seconds: f64) -> Timestamp {
    let total_nanos = (seconds * 1e9).round() as i64 + i64::from(start.nanos);
    Timestamp {
        seconds: start.seconds + total_nanos.div_euclid(1_000_000_000),
        nanos: total_nanos.rem_euclid(1_000_000_000) as i32,
    }
}

/// SplitMix64 of the seed and an index: independent, reproducible streams per car.
pub fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
