//! Child processes owned by a test: killed and reaped on drop, stdout collected line by line, stderr in a log file.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::de::DeserializeOwned;

use crate::util::{eventually, tail_file};

/// A running child process. Dropping it sends SIGKILL and reaps it.
///
/// Stdout is read by a thread into memory (the test pod tool prints little: one JSON line per run or a
/// "listening" line per server); stderr goes to `<log_dir>/<name>.stderr` so it survives the process and can be
/// printed when a test fails.
pub struct Proc {
    name: String,
    child: Option<Child>,
    stdout: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    stderr_path: PathBuf,
}

/// What a finished process left behind.
#[derive(Debug, Clone)]
pub struct ProcOutput {
    /// The process's name as given to [`Proc::spawn`].
    pub name: String,
    /// Its exit status.
    pub status: ExitStatus,
    /// Every stdout line.
    pub stdout: Vec<String>,
    /// The whole stderr log.
    pub stderr: String,
}

impl ProcOutput {
    /// Parses the last non-empty stdout line as JSON (the test pod tool's result line).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        let line = self
            .stdout
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .ok_or_else(|| {
                anyhow!(
                    "{}: no output ({}); stderr: {}",
                    self.name,
                    self.status,
                    self.stderr
                )
            })?;
        serde_json::from_str(line).with_context(|| {
            format!(
                "{}: parsing {line:?} ({}); stderr: {}",
                self.name, self.status, self.stderr
            )
        })
    }

    /// Fails unless the process exited with status 0.
    pub fn success(self) -> Result<ProcOutput> {
        if !self.status.success() {
            bail!(
                "{} exited with {}; stdout: {}; stderr: {}",
                self.name,
                self.status,
                self.stdout.join("\n"),
                self.stderr
            );
        }
        Ok(self)
    }
}

impl Proc {
    /// Spawns `cmd` with stdin closed, stdout captured and stderr appended to `<log_dir>/<name>.stderr`.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Result<Proc> {
        std::fs::create_dir_all(log_dir).with_context(|| format!("mkdir {}", log_dir.display()))?;
        let stderr_path = log_dir.join(format!("{name}.stderr"));
        let stderr = File::options()
            .create(true)
            .append(true)
            .open(&stderr_path)
            .with_context(|| format!("open {}", stderr_path.display()))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        let out = child.stdout.take().expect("stdout is piped");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let sink = stdout.clone();
        // Ends at EOF, i.e. when the process (and anything that inherited its stdout) is gone.
        let reader = std::thread::Builder::new()
            .name(format!("stdout-{name}"))
            .spawn(move || {
                for line in BufReader::new(out).lines() {
                    match line {
                        Ok(l) => sink.lock().unwrap_or_else(|p| p.into_inner()).push(l),
                        Err(_) => break,
                    }
                }
            })
            .context("spawning stdout reader")?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            stdout,
            reader: Some(reader),
            stderr_path,
        })
    }

    /// The process name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id (0 once reaped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Stdout lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.stdout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Path of the stderr log.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits until a stdout line satisfies `pred` and returns it; fails early if the process exits.
    pub fn wait_for_line(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let name = self.name.clone();
        let r = eventually(timeout, Duration::from_millis(5), || {
            if let Some(l) = self.lines().into_iter().find(|l| pred(l)) {
                return Ok(l);
            }
            if !self.is_running() {
                return Err(format!("{name} exited before printing the expected line"));
            }
            Err(format!("{name} has not printed the expected line yet"))
        });
        r.map_err(|e| {
            anyhow!(
                "{e}; stdout: {:?}; stderr: {}",
                self.lines(),
                tail_file(&self.stderr_path, 20)
            )
        })
    }

    /// Waits for the process to exit on its own, at most `timeout`, then returns what it printed. On timeout the
    /// process is killed and an error is returned.
    pub fn wait(mut self, timeout: Duration) -> Result<ProcOutput> {
        let deadline = Instant::now() + timeout;
        let mut child = self.child.take().expect("not yet waited");
        let status = loop {
            if let Some(s) = child.try_wait().context("try_wait")? {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} did not finish within {timeout:?}; stdout: {:?}; stderr: {}",
                    self.name,
                    self.lines(),
                    tail_file(&self.stderr_path, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // The pipe is at EOF once the process is gone; give the reader a bounded moment to drain it.
        if let Some(r) = self.reader.take() {
            let until = Instant::now() + Duration::from_secs(2);
            while !r.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(2));
            }
            if r.is_finished() {
                let _ = r.join();
            }
        }
        Ok(ProcOutput {
            name: self.name.clone(),
            status,
            stdout: self.lines(),
            stderr: std::fs::read_to_string(&self.stderr_path).unwrap_or_default(),
        })
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM, waits up to `grace` for the exit, then falls back to SIGKILL. Returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let _ = crate::sys::signal(c.id(), libc::SIGTERM);
        let deadline = Instant::now() + grace;
        loop {
            match c.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = c.kill();
                    return c.wait().ok();
                }
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.name)
            .field("pid", &self.pid())
            .finish()
    }
}
