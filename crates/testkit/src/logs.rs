//! Logs captured in memory, for tests that check what a service logs (and what it never does):
//! hand [`CapturedLogs`] to `tracing_subscriber::fmt().with_writer(move || logs.clone())`.

use std::sync::{Arc, Mutex};

/// Everything written to it, kept in memory; clones share it.
#[derive(Debug, Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// What was written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("logs lock")).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
