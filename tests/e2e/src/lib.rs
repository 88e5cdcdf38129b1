//! Harness for the end-to-end tests: a [`Stack`] of real `chorus-*` binaries (built by
//! `cargo build --bins`, which `scripts/test` runs first) against the AWS emulator named by
//! `AWS_ENDPOINT_URL`. Each stack gets its own table and topic, so tests run in parallel.
//!
//! Readiness comes from the services themselves: each logs `… listening` with its address (read
//! from its JSON log on stderr), and a gateway is used only once `/readyz` answers 200. Every
//! wait ends on progress (`chorus_testkit::wait`): it gives up only when nothing moved for the
//! idle limit.

pub mod balancer;
pub mod faults;
pub mod proxy;

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chorus_service::service_auth::ServiceKeys;
use chorus_testkit::emulator::{aws, sns_endpoint};
use chorus_testkit::tokens::gateway_client;
use chorus_testkit::wait::{Poll, idle_limit};

use crate::balancer::Balancer;

/// Where the workspace's binaries are: beside this executable, or beside the `deps/` folder a
/// test executable lives in.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe has a folder");
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().expect("target/debug").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first (./scripts/test does)",
        path.display()
    );
    path
}

/// The service key every writer and gateway started here shares (a file made once per process,
/// with a random key): the writers refuse calls without a token signed with it.
pub fn service_key_file() -> &'static Path {
    static FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!(
            "chorus-e2e-service-key-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let key = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        std::fs::write(&path, key).expect("writing the e2e service key");
        path
    })
}

/// An HTTP client that calls writers as a gateway would (with a service token), for tests that
/// read a writer's history themselves.
pub fn writer_http() -> reqwest::Client {
    let keys =
        ServiceKeys::from_files(&[service_key_file().to_path_buf()]).expect("the e2e service key");
    gateway_client(&keys, "e2e-checker")
}

/// A running service process. Killed on drop if still running.
pub struct Service {
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

/// The command for a service binary with JSON logs, and where its log goes.
fn service_command(
    name: &str,
    bin: &str,
    args: &[&str],
    envs: &[(&str, &str)],
) -> anyhow::Result<(Command, PathBuf)> {
    let log_dir = bin_dir().join("e2e-logs");
    std::fs::create_dir_all(&log_dir)?;
    let log = log_dir.join(format!("{name}-{}.log", uuid::Uuid::new_v4().simple()));
    let mut command = Command::new(binary(bin));
    command
        .args(args)
        .env("CHORUS_LOG_FORMAT", "json")
        .env("CHORUS_LOG", "info,chorus_gateway=debug")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    for (k, v) in envs {
        command.env(k, v);
    }
    Ok((command, log))
}

impl Service {
    /// Starts `bin args…` with JSON logs and waits until it logs `ready_message` with its
    /// listening address (`addr`).
    ///
    /// # Errors
    /// When it exits, or logs nothing for the idle limit before it listens.
    pub fn start(
        name: &str,
        bin: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        ready_message: &'static str,
    ) -> anyhow::Result<Service> {
        let (mut command, log) = service_command(name, bin, args, envs)?;
        command.stderr(Stdio::piped());
        let mut child = command.spawn().with_context(|| format!("starting {bin}"))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let (addr_tx, addr_rx) = mpsc::channel::<SocketAddr>();
        let log_path = log.clone();
        // Copy the log to a file for post-mortems, and report the listening address once seen.
        std::thread::spawn(move || {
            let mut file = std::fs::File::create(&log_path).ok();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                if let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line)
                    && entry["message"]
                        .as_str()
                        .is_some_and(|m| m == ready_message)
                    && let Some(addr) = entry["addr"].as_str().and_then(|a| a.parse().ok())
                {
                    let _ = addr_tx.send(addr);
                }
            }
        });
        // Each line logged is progress: give up only when it logs nothing for the idle limit.
        let idle = idle_limit();
        let (mut logged, mut moved_at) = (0, Instant::now());
        loop {
            if let Ok(addr) = addr_rx.recv_timeout(Duration::from_millis(50)) {
                return Ok(Service {
                    name: name.to_owned(),
                    addr,
                    child,
                    log,
                });
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{name} exited during start-up ({status}); log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let now_logged = log_len(&log);
            if now_logged != logged {
                (logged, moved_at) = (now_logged, Instant::now());
            } else if moved_at.elapsed() > idle {
                let _ = child.kill();
                bail!(
                    "{name} logged nothing for {idle:?} and does not listen yet; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
    }

    /// Starts a process that does not listen (the publisher poller).
    ///
    /// # Errors
    /// When it cannot be spawned.
    pub fn start_unlistening(
        name: &str,
        bin: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> anyhow::Result<Service> {
        let (mut command, log) = service_command(name, bin, args, envs)?;
        command.stderr(std::fs::File::create(&log)?);
        let child = command.spawn().with_context(|| format!("starting {bin}"))?;
        Ok(Service {
            name: name.to_owned(),
            addr: "127.0.0.1:0".parse()?,
            child,
            log,
        })
    }

    pub fn http(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws(&self, user: &str) -> String {
        format!("ws://{}/ws?user={user}", self.addr)
    }

    /// Waits until the service's `/readyz` answers 200. Its answers and its log are progress;
    /// gives up when neither moved for the idle limit, or at once when the service exits.
    ///
    /// # Errors
    /// When it does not become ready.
    pub async fn ready(&mut self) -> anyhow::Result<()> {
        let url = format!("{}/readyz", self.http());
        let awaited = format!("{} to be ready", self.name);
        Poll::new(url, awaited)
            .watching(|| match self.child.try_wait() {
                Ok(None) => Ok(log_len(&self.log)),
                Ok(Some(status)) => Err(format!(
                    "exited ({status}); log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                )),
                Err(e) => Err(format!("its state cannot be read: {e}")),
            })
            .ready()
            .await?;
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `/metrics` has every expected line (counters move right after the effect a
    /// client sees); panics when the exposition stops changing without them, showing the last
    /// one. An expectation without a value matches any value.
    pub async fn wait_for_metrics(&self, expected: &[&str]) {
        chorus_testkit::wait::metrics(&format!("{}/metrics", self.http()), expected).await;
    }

    /// The service's `/metrics` exposition.
    ///
    /// # Errors
    /// When it does not answer 200.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let res = reqwest::Client::new()
            .get(format!("{}/metrics", self.http()))
            .timeout(Duration::from_secs(10))
            .send()
            .await?
            .error_for_status()?;
        Ok(res.text().await?)
    }

    /// The value of one series of `/metrics` (`name{labels}` as exposed), if it is there.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = reqwest::get(format!("{}/metrics", self.http()))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// The service's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM without waiting for the exit ([`Service::exit_status`] says when it
    /// happened).
    ///
    /// # Errors
    /// When the signal cannot be sent.
    pub fn signal_terminate(&self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM {} failed", self.pid());
        Ok(())
    }

    /// How it exited, if it has.
    ///
    /// # Errors
    /// When its state cannot be read.
    pub fn exit_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Sends SIGTERM and waits for the exit, at most `timeout`.
    ///
    /// # Errors
    /// When it does not exit in time.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.signal_terminate()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} still running {timeout:?} after SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Gateways unsubscribe on SIGTERM; a dead subscriber would fail every later publish
            // on the emulator (it delivers synchronously).
            let _ = self.terminate(Duration::from_secs(10));
            self.kill();
        }
    }
}

/// The length of a service's log so far (0 before it has one): it grows as the service makes
/// progress.
fn log_len(log: &Path) -> u64 {
    std::fs::metadata(log).map_or(0, |m| m.len())
}

/// The sum of every series of metric `name` in a Prometheus text exposition (`None` when there
/// is none).
pub fn metric_sum(exposition: &str, name: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            // The exact name: labels or the value follow.
            let value = match rest.chars().next()? {
                '{' => rest.split_once('}')?.1,
                ' ' => rest,
                _ => return None,
            };
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .fold(None, |sum, v| Some(sum.unwrap_or(0.0) + v))
}

/// How to build a [`Stack`].
#[derive(Debug, Clone, Copy, Default)]
pub struct StackOptions {
    /// Writers (at least one is started).
    pub writers: usize,
    /// Put the writers behind one [`Balancer`] that every gateway calls, as the internal load
    /// balancer of a deployment; otherwise each gateway calls one writer (round robin).
    pub balance_writers: bool,
    /// Give the publisher a checkpoint file, kept across its restarts, if it supports
    /// `--checkpoint-file` (see [`publisher_supports_checkpoint`]).
    pub publisher_checkpoint: bool,
}

/// A table + topic of its own, writers, a publisher poller, and gateways.
pub struct Stack {
    pub table: String,
    pub topic_arn: String,
    pub writer: Service,
    /// Writers beyond the first; gateways are spread over all writers.
    pub more_writers: Vec<Service>,
    /// In front of all writers, with [`StackOptions::balance_writers`].
    pub writer_balancer: Option<Balancer>,
    pub publisher: Service,
    /// The publisher's checkpoint file, with [`StackOptions::publisher_checkpoint`].
    pub publisher_checkpoint: Option<PathBuf>,
    pub gateways: Vec<Service>,
}

/// A messages table and an SNS topic of their own, named `<prefix>-<random>`: (table, topic ARN).
///
/// # Errors
/// When the emulator refuses to make them.
pub async fn table_and_topic(prefix: &str) -> anyhow::Result<(String, String)> {
    let aws = aws().await;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let table = format!("{prefix}-{}", &suffix[..12]);
    chorus_writer::store::ensure_table(&aws_sdk_dynamodb::Client::new(&aws), &table).await?;
    let topic_arn =
        chorus_publisher::sns::ensure_topic(&aws_sdk_sns::Client::new(&aws), &table).await?;
    Ok((table, topic_arn))
}

impl Stack {
    /// Starts a stack with `gateways` gateways and waits until every gateway is ready.
    ///
    /// # Errors
    /// When any part does not start.
    pub async fn start(gateways: usize) -> anyhow::Result<Stack> {
        Self::start_with(1, gateways).await
    }

    /// Starts a stack with `writers` writers (≥ 1) and `gateways` gateways.
    ///
    /// # Errors
    /// When any part does not start.
    pub async fn start_with(writers: usize, gateways: usize) -> anyhow::Result<Stack> {
        let options = StackOptions {
            writers,
            ..StackOptions::default()
        };
        Self::start_with_options(options, gateways).await
    }

    /// Starts a stack as `options` say, with `gateways` gateways.
    ///
    /// # Errors
    /// When any part does not start.
    pub async fn start_with_options(
        options: StackOptions,
        gateways: usize,
    ) -> anyhow::Result<Stack> {
        let writers = options.writers.max(1);
        let (table, topic_arn) = table_and_topic("e2e").await?;

        let writer = start_writer("writer", &table)?;
        let mut more_writers = Vec::new();
        for i in 1..writers {
            more_writers.push(start_writer(&format!("writer-{i}"), &table)?);
        }
        let writer_balancer = if options.balance_writers {
            let mut addrs = vec![writer.addr];
            addrs.extend(more_writers.iter().map(|w| w.addr));
            Some(Balancer::start(addrs).await?)
        } else {
            None
        };
        let publisher_checkpoint =
            (options.publisher_checkpoint && publisher_supports_checkpoint()).then(|| {
                bin_dir()
                    .join("e2e-logs")
                    .join(format!("{table}.checkpoint"))
            });
        let publisher = start_publisher(&table, &topic_arn, publisher_checkpoint.as_deref())?;
        let mut stack = Stack {
            table,
            topic_arn,
            writer,
            more_writers,
            writer_balancer,
            publisher,
            publisher_checkpoint,
            gateways: Vec::new(),
        };
        for _ in 0..gateways {
            stack.add_gateway(&[]).await?;
        }
        Ok(stack)
    }

    /// Starts one more gateway (extra flags appended) and waits until it is ready.
    ///
    /// # Errors
    /// When it does not become ready ([`Service::ready`]).
    pub async fn add_gateway(&mut self, extra: &[&str]) -> anyhow::Result<usize> {
        self.add_gateway_with(extra, |_| {}).await
    }

    /// [`Stack::add_gateway`], calling `listening` with the gateway as soon as it listens, before
    /// waiting until it is ready: to point something in front of it (the chaos run's fault layer)
    /// at it while SNS may already be posting its SubscriptionConfirmation.
    ///
    /// # Errors
    /// When it does not become ready ([`Service::ready`]).
    pub async fn add_gateway_with(
        &mut self,
        extra: &[&str],
        listening: impl FnOnce(&Service),
    ) -> anyhow::Result<usize> {
        let name = format!("gateway-{}", self.gateways.len());
        let writer_index = self.gateways.len() % self.writer_count();
        let mirror = sns_endpoint();
        let key_file = &*service_key_file().to_string_lossy();
        let writer_url = match &self.writer_balancer {
            Some(balancer) => balancer.url(),
            None => self.writer_mut(writer_index).http(),
        };
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--writer-url",
            &writer_url,
            "--topic-arn",
            &self.topic_arn,
            "--gateway-id",
            &name,
            "--sns-cert-mirror",
            &mirror,
            "--writer-key-file",
            key_file,
            "--insecure-dev-users",
            "--drain-timeout-ms",
            "5000",
            "--gap-timeout-ms",
            "200",
            // Tests and chaos drive clients far faster than people type; the per-connection
            // rate limits have tests of their own (crates/gateway/tests/clients.rs).
            "--sends-per-sec",
            "10000",
            "--send-burst",
            "10000",
            "--joins-per-sec",
            "10000",
            "--join-burst",
            "10000",
        ];
        args.extend_from_slice(extra);
        let mut gateway = Service::start(&name, "chorus-gateway", &args, &[], "gateway listening")?;
        listening(&gateway);
        gateway.ready().await?;
        self.gateways.push(gateway);
        Ok(self.gateways.len() - 1)
    }
}

impl Stack {
    /// Stops the publisher (SIGTERM) and starts a fresh one, which reads the stream from its
    /// start, or from its checkpoint if it has one.
    ///
    /// # Errors
    /// When the old one does not stop or the new one does not start.
    pub fn restart_publisher(&mut self) -> anyhow::Result<()> {
        self.publisher.terminate(Duration::from_secs(10))?;
        self.start_new_publisher()
    }

    /// Kills the publisher (SIGKILL, as a crash) and starts a fresh one.
    ///
    /// # Errors
    /// When the new one does not start.
    pub fn crash_and_restart_publisher(&mut self) -> anyhow::Result<()> {
        self.publisher.kill();
        self.start_new_publisher()
    }

    fn start_new_publisher(&mut self) -> anyhow::Result<()> {
        self.publisher = start_publisher(
            &self.table,
            &self.topic_arn,
            self.publisher_checkpoint.as_deref(),
        )?;
        Ok(())
    }

    /// Writers started (the first is `writer`, then `more_writers`).
    pub fn writer_count(&self) -> usize {
        1 + self.more_writers.len()
    }

    fn writer_mut(&mut self, index: usize) -> &mut Service {
        match index {
            0 => &mut self.writer,
            i => &mut self.more_writers[i - 1],
        }
    }

    /// Kills writer `index` (SIGKILL, as a crash).
    pub fn kill_writer(&mut self, index: usize) {
        self.writer_mut(index).kill();
    }

    /// Starts a fresh writer in place of writer `index` (on a new port) and, with a balancer,
    /// sends new connections to it.
    ///
    /// # Errors
    /// When it does not start.
    pub fn restart_writer(&mut self, index: usize) -> anyhow::Result<()> {
        let name = self.writer_mut(index).name.clone();
        let writer = start_writer(&name, &self.table)?;
        *self.writer_mut(index) = writer;
        if let Some(balancer) = &self.writer_balancer {
            let mut addrs = vec![self.writer.addr];
            addrs.extend(self.more_writers.iter().map(|w| w.addr));
            balancer.set_backends(addrs);
        }
        Ok(())
    }
}

fn start_writer(name: &str, table: &str) -> anyhow::Result<Service> {
    Service::start(
        name,
        "chorus-writer",
        &[
            "--listen",
            "127.0.0.1:0",
            "--table",
            table,
            "--service-key-file",
            &service_key_file().to_string_lossy(),
        ],
        &[],
        "writer listening",
    )
}

/// Whether this build's `chorus-publisher poll` takes `--checkpoint-file` (from its `--help`).
pub fn publisher_supports_checkpoint() -> bool {
    Command::new(binary("chorus-publisher"))
        .args(["poll", "--help"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("--checkpoint-file"))
}

/// Starts the publisher as a stream poller of `table` publishing to `topic_arn`, with
/// `checkpoint` as its checkpoint file if given; its address is its metrics port.
///
/// # Errors
/// When it exits during start-up or does not listen.
pub fn start_publisher(
    table: &str,
    topic_arn: &str,
    checkpoint: Option<&Path>,
) -> anyhow::Result<Service> {
    let mut args = vec![
        "poll",
        "--table",
        table,
        "--topic-arn",
        topic_arn,
        "--idle-ms",
        "50",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let checkpoint = checkpoint.map(|p| p.to_string_lossy().into_owned());
    if let Some(path) = &checkpoint {
        args.extend(["--checkpoint-file", path]);
    }
    // The poller's address is its metrics port.
    Service::start(
        "publisher",
        "chorus-publisher",
        &args,
        &[],
        "metrics listening",
    )
}
