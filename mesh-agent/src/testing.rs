//! Helpers shared by unit tests of several modules.

use std::sync::{Arc, Mutex};

/// Everything a `tracing` subscriber writes through it (`.with_writer(capture.clone())`), kept in memory so a test
/// can read the log lines.
#[derive(Clone, Default)]
pub(crate) struct LogCapture(pub(crate) Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    /// The captured text so far.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;

    fn make_writer(&'a self) -> LogCapture {
        self.clone()
    }
}
