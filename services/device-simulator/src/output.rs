//! Readings written to files for training: JSON Lines (Vigil's MQTT JSON form, one reading
//! per line) or CSV with a header (`device_id,event_time,sequence,<18 signals>,fault`).

use std::io::Write;

use sensor::SensorReading;

/// The file formats `generate` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Jsonl,
    Csv,
}

/// Writes readings in one format; CSV starts with its header.
pub struct ReadingWriter<W: Write> {
    out: W,
    format: Format,
}

impl<W: Write> ReadingWriter<W> {
    pub fn new(mut out: W, format: Format) -> std::io::Result<Self> {
        if format == Format::Csv {
            let signals: Vec<&str> = sensor::signals().iter().map(|s| s.name).collect();
            writeln!(out, "device_id,event_time,sequence,{},fault", signals.join(","))?;
        }
        Ok(Self { out, format })
    }

    pub fn write(&mut self, reading: &SensorReading) -> std::io::Result<()> {
        match self.format {
            Format::Jsonl => writeln!(self.out, "{}", sensor::json::to_json(reading)),
            Format::Csv => {
                let time = reading.event_time.as_ref().and_then(sensor::json::format_time).unwrap_or_default();
                // Device ids are the simulator's own `car-NNNNN`: nothing to quote.
                write!(self.out, "{},{time},{}", reading.device_id, reading.sequence)?;
                for signal in sensor::signals() {
                    write!(self.out, ",{}", signal.display(reading))?;
                }
                writeln!(self.out, ",{}", sensor::fault_name(reading.fault()))
            }
        }
    }

    pub fn finish(mut self) -> std::io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{Fleet, FleetOptions};

    /// One step of a `cars`-car fleet, and the text `format` writes for it.
    fn written(format: Format, cars: usize) -> (Vec<SensorReading>, String) {
        let mut fleet = Fleet::new(&FleetOptions { cars, ..FleetOptions::default() }, Default::default());
        let readings = fleet.step(1.0);
        let mut writer = ReadingWriter::new(Vec::new(), format).unwrap();
        for reading in &readings {
            writer.write(reading).unwrap();
        }
        (readings, String::from_utf8(writer.finish().unwrap()).unwrap())
    }

    #[test]
    fn csv_has_a_header_and_one_row_per_reading_with_every_signal() {
        let (readings, text) = written(Format::Csv, 3);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        let header: Vec<&str> = lines[0].split(',').collect();
        assert_eq!(header.len(), 22);
        assert_eq!((header[3], header[21]), ("coolant_temp", "fault"));
        let row: Vec<&str> = lines[2].split(',').collect();
        assert_eq!((row[0], row[1], row[2], row[21]), ("car-00001", "1970-01-01T00:00:01Z", "1", "none"));
        let speed = header.iter().position(|h| *h == "speed").unwrap();
        assert_eq!(row[speed].parse::<f32>().unwrap(), readings[1].speed);
    }

    #[test]
    fn jsonl_lines_parse_back_to_the_readings() {
        let (readings, text) = written(Format::Jsonl, 2);
        let envelope = sensor::json::Envelope { topic_device_id: None, received_at: std::time::SystemTime::now() };
        let parsed: Vec<SensorReading> =
            text.lines().map(|l| sensor::json::parse(l.as_bytes(), &envelope).unwrap()).collect();
        assert_eq!(parsed, readings);
    }
}
