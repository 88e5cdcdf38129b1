//! The fan-out run: the highest message rate into one room of N members that every member gets
//! in full, with no connection closed and a p99 latency under the limit, for the gateway and for
//! the baseline, interleaved step by step so both see the same machine.
//!
//! A step: every client (re)joins the step's own room `bench-<step>` (the gateway's rooms then
//! start at seq 1; the baseline has no rooms and just counts the step), then the injector sends
//! `rate × step_secs` messages on a fixed schedule, one per bus notification (see
//! [`crate::injector`]). Each body starts with
//! `<step>:<scheduled send time, µs since the epoch>:`, stamped with the *scheduled* time so that
//! an injector that falls behind shows up as latency. Clients count the step's messages and
//! record latency against their clock at read time (same machine). A step passes when
//! received == rate × step_secs × N, no connection was closed, and p99 < the limit.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::injector::{Injector, Job};
use crate::latency::{Batch, Histogram, Summary};
use crate::wsclient::{self, Frame};
use crate::{ServerKind, ServerProcess};

/// Reconnections one client may make within one step (a step that overloads a server closes
/// many clients with 4001, and the search may run many such steps in a row).
const MAX_RECONNECTS: u32 = 20;
/// Per-connection read buffer of the load generator.
const CLIENT_BUFFER: usize = 32 * 1024;

/// Knobs of the fan-out run.
#[derive(Debug, Clone)]
pub(crate) struct FanoutArgs {
    pub(crate) clients: usize,
    pub(crate) step_secs: f64,
    pub(crate) body_bytes: usize,
    pub(crate) max_p99_ms: f64,
    pub(crate) start_rate: u32,
    pub(crate) max_rate: u32,
    pub(crate) bisections: u32,
    pub(crate) retries: u32,
    /// 127.0.0.x for the gateway's clients; the baseline's use the next address.
    pub(crate) source: u8,
}

/// One step's outcome.
#[derive(Debug, Clone)]
pub(crate) struct StepResult {
    pub(crate) rate: u32,
    pub(crate) latency: Summary,
    pub(crate) pass: bool,
}

/// What the run found for one server.
#[derive(Debug, Clone)]
pub(crate) struct FanoutResult {
    pub(crate) clients: usize,
    /// RSS growth per connection once all clients had connected and joined (before any
    /// message).
    pub(crate) kib_per_conn: f64,
    /// The highest passing step, if any.
    pub(crate) best: Option<StepResult>,
}

impl FanoutResult {
    pub(crate) fn deliveries_per_s(&self) -> f64 {
        self.best
            .as_ref()
            .map_or(0.0, |b| f64::from(b.rate) * self.clients as f64)
    }
}

/// Counters shared by one server's client tasks.
#[derive(Default)]
struct Shared {
    /// Clients that have joined the current step's room (baseline: seen the step).
    ready: AtomicUsize,
    /// Messages of the current step received, over all clients.
    received: AtomicU64,
    histogram: Histogram,
    /// Why connections ended, by reason (`close 4001`, `eof`, …).
    ended: Mutex<BTreeMap<String, u64>>,
    gave_up: AtomicUsize,
}

impl Shared {
    fn ended_total(&self) -> u64 {
        self.ended.lock().expect("lock").values().sum()
    }
}

/// One server under test with its clients.
struct Target {
    kind: ServerKind,
    server: ServerProcess,
    /// Before any client connected.
    rss_start_kib: u64,
    shared: Arc<Shared>,
    step_tx: watch::Sender<u32>,
    step: u32,
    clients: JoinSet<()>,
    injector: Injector,
    n: usize,
}

impl Target {
    async fn start(kind: ServerKind, n: usize, source: Ipv4Addr) -> anyhow::Result<Target> {
        let server = ServerProcess::start(kind, 0).await?;
        let ingress = match kind {
            ServerKind::Gateway => server.ws,
            ServerKind::Baseline => server.ingress.context("baseline without ingress")?,
        };
        let injector = Injector::start(kind, ingress).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_start_kib = server.child.rss_kib()?;
        let shared = Arc::new(Shared::default());
        let (step_tx, _) = watch::channel(0u32);
        let mut clients = JoinSet::new();
        for i in 0..n {
            clients.spawn(client(
                kind,
                server.ws,
                source,
                format!("/ws?user=fan{i}"),
                Arc::clone(&shared),
                step_tx.subscribe(),
            ));
        }
        Ok(Target {
            kind,
            server,
            rss_start_kib,
            shared,
            step_tx,
            step: 0,
            clients,
            injector,
            n,
        })
    }

    /// Moves every client to the next step (room) and waits until all are there.
    async fn next_step(&mut self) -> anyhow::Result<()> {
        self.step += 1;
        self.shared.ready.store(0, Ordering::SeqCst);
        self.step_tx.send_replace(self.step);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self.shared.ready.load(Ordering::SeqCst);
            if ready >= self.n {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{}: only {ready} of {} clients ready for step {} within 30 s ({} gave up)",
                    self.kind,
                    self.n,
                    self.step,
                    self.shared.gave_up.load(Ordering::SeqCst)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn run_step(&mut self, rate: u32, args: &FanoutArgs) -> anyhow::Result<StepResult> {
        self.next_step().await?;
        self.shared.received.store(0, Ordering::SeqCst);
        self.shared.histogram.reset();
        let ended_before = self.shared.ended_total();

        let messages = ((f64::from(rate) * args.step_secs).round() as u64).max(1);
        let expected = messages * self.n as u64;
        let injected = self
            .injector
            .run(Job {
                step: self.step,
                rate,
                messages,
                body_bytes: args.body_bytes,
            })
            .await?;

        // Drain: until everything arrived, or nothing more for 1 s (at most 10 s).
        let drain_deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut last = (0, tokio::time::Instant::now());
        loop {
            let received = self.shared.received.load(Ordering::SeqCst);
            let now = tokio::time::Instant::now();
            if received >= expected || now >= drain_deadline {
                break;
            }
            if received != last.0 {
                last = (received, now);
            } else if now.duration_since(last.1) >= Duration::from_secs(1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let received = self.shared.received.load(Ordering::SeqCst);
        let closes = self.shared.ended_total() - ended_before;
        let latency = self.shared.histogram.summary();
        let pass = received == expected && closes == 0 && latency.p99_ms < args.max_p99_ms;
        println!(
            "fanout {:<8} step={:<2} rate={rate:>5} msg/s deliveries/s={:>9} expected={expected} \
             received={received} closed={closes} p50_ms={:.1} p99_ms={:.1} max_ms={:.1} \
             injector_late_ms={:.0} {}",
            self.kind,
            self.step,
            u64::from(rate) * self.n as u64,
            latency.p50_ms,
            latency.p99_ms,
            latency.max_ms,
            injected.late_ms,
            if pass { "pass" } else { "FAIL" }
        );
        if closes > 0 {
            println!(
                "fanout {:<8} connections ended so far: {:?}",
                self.kind,
                self.shared.ended.lock().expect("lock")
            );
        }
        // Let the servers settle (queues drained, repair tasks done) before the next step.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(StepResult {
            rate,
            latency,
            pass,
        })
    }

    async fn stop(mut self) {
        self.server.child.stop().await;
        self.clients.shutdown().await;
    }
}

/// One client: connects, follows the steps, counts and times the step's messages; reconnects
/// (up to [`MAX_RECONNECTS`] times within a step) when its connection ends.
async fn client(
    kind: ServerKind,
    server: SocketAddr,
    source: Ipv4Addr,
    path: String,
    shared: Arc<Shared>,
    mut step_rx: watch::Receiver<u32>,
) {
    let mut step = *step_rx.borrow();
    let mut attempt = 0;
    loop {
        let now = *step_rx.borrow();
        if now != step {
            // A new step: a new reconnect budget.
            (step, attempt) = (now, 0);
        }
        if attempt > MAX_RECONNECTS {
            break;
        }
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        attempt += 1;
        let why = match wsclient::connect(SocketAddrV4::new(source, 0), server, &path).await {
            Ok((stream, leftover)) => session(kind, stream, leftover, &shared, &mut step_rx).await,
            Err(e) => format!("connect failed: {e:#}"),
        };
        *shared.ended.lock().expect("lock").entry(why).or_default() += 1;
    }
    shared.gave_up.fetch_add(1, Ordering::SeqCst);
}

fn join_frame(step: u32) -> Vec<u8> {
    wsclient::text_frame(&format!(r#"{{"type":"join","room":"bench-{step}"}}"#))
}

fn leave_frame(step: u32) -> Vec<u8> {
    wsclient::text_frame(&format!(r#"{{"type":"leave","room":"bench-{step}"}}"#))
}

/// Serves one connection until it ends; returns why it ended.
async fn session(
    kind: ServerKind,
    mut stream: TcpStream,
    leftover: Vec<u8>,
    shared: &Shared,
    step_rx: &mut watch::Receiver<u32>,
) -> String {
    let mut buf = vec![0u8; CLIENT_BUFFER];
    buf[..leftover.len()].copy_from_slice(&leftover);
    let mut filled = leftover.len();
    let mut step = *step_rx.borrow_and_update();
    if step > 0 {
        if kind == ServerKind::Gateway {
            if stream.write_all(&join_frame(step)).await.is_err() {
                return "write failed".into();
            }
        } else {
            shared.ready.fetch_add(1, Ordering::SeqCst);
        }
    }
    let mut batch = Batch::default();
    loop {
        tokio::select! {
            changed = step_rx.changed() => {
                if changed.is_err() {
                    return "stopped".into();
                }
                let previous = step;
                step = *step_rx.borrow_and_update();
                if kind == ServerKind::Gateway {
                    let mut out = Vec::new();
                    if previous > 0 {
                        out.extend(leave_frame(previous));
                    }
                    out.extend(join_frame(step));
                    if stream.write_all(&out).await.is_err() {
                        return "write failed".into();
                    }
                } else {
                    shared.ready.fetch_add(1, Ordering::SeqCst);
                }
            }
            read = stream.read(&mut buf[filled..]) => {
                let n = match read {
                    Ok(0) => return "eof".into(),
                    Ok(n) => n,
                    Err(e) => return format!("read error: {e}"),
                };
                filled += n;
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64);
                let mut at = 0;
                let mut got = 0;
                while let Some((frame, used)) = wsclient::parse_frame(&buf[at..filled]) {
                    match frame {
                        Frame::Text(text) => {
                            if let Some((s, stamp)) = message_stamp(text) {
                                if s == u64::from(step) {
                                    got += 1;
                                    batch.record(now.saturating_sub(stamp));
                                }
                            } else if joined_room(text) == Some(u64::from(step)) {
                                shared.ready.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Frame::Close(code) => {
                            return code.map_or("close".into(), |c| format!("close {c}"));
                        }
                        Frame::Other => {}
                    }
                    at += used;
                }
                buf.copy_within(at..filled, 0);
                filled -= at;
                if filled == buf.len() {
                    return "frame larger than the client buffer".into();
                }
                if got > 0 {
                    shared.received.fetch_add(got, Ordering::Relaxed);
                    shared.histogram.flush(&mut batch);
                }
            }
        }
    }
}

/// `(step, stamp)` of a message frame: `{"type":"message",…,"body":"<step>:<µs>:…",…}`.
fn message_stamp(text: &[u8]) -> Option<(u64, u64)> {
    if !text.starts_with(br#"{"type":"message""#) {
        return None;
    }
    let body = wsclient::find(text, br#""body":""#)? + 8;
    let (step, rest) = wsclient::leading_number(&text[body..])?;
    let (stamp, _) = wsclient::leading_number(rest.strip_prefix(b":")?)?;
    Some((step, stamp))
}

/// The step of a `joined` frame's room `bench-<step>`.
fn joined_room(text: &[u8]) -> Option<u64> {
    if !text.starts_with(br#"{"type":"joined""#) {
        return None;
    }
    let room = wsclient::find(text, br#""room":"bench-"#)? + 14;
    wsclient::leading_number(&text[room..]).map(|(step, _)| step)
}

/// Finds the highest passing rate: doubling from the start rate until a step fails, then
/// bisecting between the best pass and the lowest failure. A failed step is tried again
/// (`retries` times) before it counts, so one burst of noise does not end the search.
struct Search {
    current: u32,
    max: u32,
    best: Option<StepResult>,
    lowest_fail: Option<u32>,
    bisections_left: u32,
    retries: u32,
    retried: u32,
    done: bool,
}

impl Search {
    fn new(args: &FanoutArgs) -> Self {
        Search {
            current: args.start_rate,
            max: args.max_rate,
            best: None,
            lowest_fail: None,
            bisections_left: args.bisections,
            retries: args.retries,
            retried: 0,
            done: false,
        }
    }

    fn next(&self) -> Option<u32> {
        (!self.done).then_some(self.current)
    }

    fn record(&mut self, result: StepResult) {
        if !result.pass && self.retried < self.retries {
            self.retried += 1;
            return;
        }
        self.retried = 0;
        if result.pass {
            if self.best.as_ref().is_none_or(|b| result.rate > b.rate) {
                self.best = Some(result);
            }
        } else {
            self.lowest_fail = Some(self.lowest_fail.map_or(result.rate, |f| f.min(result.rate)));
        }
        let lo = self.best.as_ref().map_or(0, |b| b.rate);
        match self.lowest_fail {
            None => {
                self.current = self.current.saturating_mul(2);
                self.done = self.current > self.max;
            }
            Some(hi) => {
                let mid = lo + (hi - lo) / 2;
                self.done = self.bisections_left == 0 || mid <= lo || mid >= hi;
                self.bisections_left = self.bisections_left.saturating_sub(1);
                self.current = mid;
            }
        }
    }
}

/// Runs the search for the gateway and the baseline, a step of each in turn.
pub(crate) async fn run(args: &FanoutArgs) -> anyhow::Result<(FanoutResult, FanoutResult)> {
    let mut targets = Vec::new();
    for (i, kind) in [ServerKind::Gateway, ServerKind::Baseline]
        .into_iter()
        .enumerate()
    {
        let target = Target::start(
            kind,
            args.clients,
            Ipv4Addr::new(127, 0, 0, args.source + i as u8),
        )
        .await?;
        targets.push(target);
    }
    let mut results = Vec::new();
    for target in &mut targets {
        let before = target.rss_start_kib;
        target.next_step().await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = target.server.child.rss_kib()?;
        let kib_per_conn = after.saturating_sub(before) as f64 / target.n as f64;
        println!(
            "fanout {:<8} pid={} {} clients joined: rss_start_kib={before} rss_after_kib={after} \
             kib_per_conn={kib_per_conn:.2}",
            target.kind, target.server.child.pid, target.n
        );
        results.push(FanoutResult {
            clients: target.n,
            kib_per_conn,
            best: None,
        });
    }
    let mut searches = [Search::new(args), Search::new(args)];
    loop {
        let mut stepped = false;
        for (target, search) in targets.iter_mut().zip(&mut searches) {
            if let Some(rate) = search.next() {
                let result = target.run_step(rate, args).await?;
                search.record(result);
                stepped = true;
            }
        }
        if !stepped {
            break;
        }
    }
    for ((target, search), result) in targets.into_iter().zip(searches).zip(&mut results) {
        target.stop().await;
        result.best = search.best;
    }
    let baseline = results.pop().context("baseline result")?;
    let gateway = results.pop().context("gateway result")?;
    Ok((gateway, baseline))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_and_rooms_are_found_in_frames() {
        let frame = br#"{"type":"message","room":"bench-3","seq":1,"id":"m1","sender":"bench","body":"3:1700000000123456:xx","ts":"t"}"#;
        assert_eq!(message_stamp(frame), Some((3, 1_700_000_000_123_456)));
        assert_eq!(
            joined_room(br#"{"type":"joined","room":"bench-12","seq":0}"#),
            Some(12)
        );
        assert_eq!(joined_room(br#"{"type":"left","room":"bench-12"}"#), None);
    }

    fn step(rate: u32, pass: bool) -> StepResult {
        StepResult {
            rate,
            latency: Summary::default(),
            pass,
        }
    }

    #[test]
    fn the_search_doubles_then_bisects() {
        let args = FanoutArgs {
            clients: 1,
            step_secs: 1.0,
            body_bytes: 64,
            max_p99_ms: 50.0,
            start_rate: 100,
            max_rate: 10_000,
            bisections: 2,
            retries: 1,
            source: 2,
        };
        let mut search = Search::new(&args);
        let mut tried = Vec::new();
        while let Some(rate) = search.next() {
            tried.push(rate);
            search.record(step(rate, rate <= 500));
        }
        // 800 fails twice (retry), then 600 fails twice, then 500 passes.
        assert_eq!(tried, vec![100, 200, 400, 800, 800, 600, 600, 500]);
        assert_eq!(search.best.map(|b| b.rate), Some(500));
    }
}
