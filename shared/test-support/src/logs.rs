//! Log output captured in memory, for a test to read what the code under test logged:
//! hand `move || logs.clone()` to `tracing_subscriber::fmt().with_writer(..)`.

use std::sync::{Arc, Mutex, PoisonError};

/// A shared, growing buffer of log output; clones write to the same buffer.
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn clones_write_to_one_buffer() {
        let logs = CapturedLogs::default();
        let mut writer = logs.clone();
        writer.write_all(b"first ").unwrap();
        logs.clone().write_all(b"second").unwrap();
        assert_eq!(logs.text(), "first second");
    }
}
