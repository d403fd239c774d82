//! A fleet of simulated cars for Vigil: realistic, reproducible sensor readings with
//! labelled faults, published over MQTT like the seed demo's cars (topic
//! `vehicles/sensor/data/<device-id>`, QoS 1) or written to JSON Lines or CSV for training.
//!
//! [`car`] holds the physics and the faults, [`fleet`] who gets which fault and when,
//! [`publish`] sends a fleet's readings over MQTT, counted in [`metrics`].
//! Readings are [`sensor::SensorReading`]s in Vigil's JSON form, each carrying its ground
//! truth in `fault`, so detection can be scored reading by reading.

#![forbid(unsafe_code)]

pub mod car;
pub mod cli;
pub mod fleet;
pub mod metrics;
pub mod output;
pub mod publish;
