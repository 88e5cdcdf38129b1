//! The processes the orchestrator starts: this same executable in another role. Each child
//! talks through lines on stdout and lives while its stdin is open, so it goes away with the
//! orchestrator even if the orchestrator is killed; a [`Child`] dropped (on error too) is
//! killed at once.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, BufReader, Lines};
use tokio::process::{ChildStdin, ChildStdout, Command};

pub(crate) struct Child {
    pub(crate) name: String,
    pub(crate) pid: u32,
    process: tokio::process::Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// Held open: the child exits when it closes.
    _stdin: ChildStdin,
}

impl Child {
    /// Starts `chorus-gateway-bench <args>`.
    pub(crate) fn spawn(name: impl Into<String>, args: &[String]) -> anyhow::Result<Child> {
        let name = name.into();
        let exe = std::env::current_exe()?;
        let mut process = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let pid = process.id().context("child has no pid")?;
        let lines = BufReader::new(process.stdout.take().context("no stdout")?).lines();
        let stdin = process.stdin.take().context("no stdin")?;
        Ok(Child {
            name,
            pid,
            process,
            lines,
            _stdin: stdin,
        })
    }

    /// The child's next line that starts with `word`, waiting at most `timeout`; other lines
    /// are passed through to stdout.
    pub(crate) async fn expect(&mut self, word: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .with_context(|| format!("{} said no `{word}` within {timeout:?}", self.name))?
                .with_context(|| format!("reading from {}", self.name))?;
            match line {
                Some(line) if line.starts_with(word) => {
                    return Ok(line[word.len()..].trim().to_owned());
                }
                Some(line) => println!("{}: {line}", self.name),
                None => bail!("{} exited before saying `{word}`", self.name),
            }
        }
    }

    /// Resident memory of the child, in KiB.
    pub(crate) fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(self.pid)
    }

    /// Kills the child and waits for it.
    pub(crate) async fn stop(mut self) {
        let _ = self.process.kill().await;
    }
}

/// `VmRSS` of a process, in KiB.
pub(crate) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS for pid {pid}"))
}

/// Stops servers first (so the clients' sockets close passively and leave no TIME_WAIT on their
/// source ports), then clients.
pub(crate) async fn stop_all(servers: Vec<Child>, clients: Vec<Child>) {
    for child in servers.into_iter().chain(clients) {
        child.stop().await;
    }
}
