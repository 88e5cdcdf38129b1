//! The clients of the run: each a [`Session`] driven by its role (sender, churner, bulk sender,
//! staller, quiet sender or member), recording everything it receives for the checker.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context as _, bail};
use chorus_client::{Backoff, Event, Session, Stats};
use chorus_e2e::metric_sum;
use chorus_protocol::{RoomId, close};
use tokio::sync::{Barrier, watch};
use tokio::time::Instant;

use crate::{Args, Profile, QUIET};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Sender,
    Churner,
    BulkSender,
    Staller,
    QuietSender,
    QuietMember,
}

impl Role {
    pub(crate) fn sends(self) -> bool {
        matches!(
            self,
            Role::Sender | Role::Churner | Role::BulkSender | Role::QuietSender
        )
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Role::Sender => "sender",
            Role::Churner => "churner",
            Role::BulkSender => "bulk sender",
            Role::Staller => "staller",
            Role::QuietSender => "quiet sender",
            Role::QuietMember => "quiet member",
        }
    }
}

/// One client of the run.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) index: usize,
    pub(crate) role: Role,
    /// The room it sends to, churns in or stalls in.
    pub(crate) room: RoomId,
    /// Rooms it is in as well, only reading.
    pub(crate) also: Vec<RoomId>,
    /// Messages to send.
    pub(crate) messages: usize,
}

impl Plan {
    pub(crate) fn rooms(&self) -> impl Iterator<Item = &RoomId> {
        std::iter::once(&self.room).chain(&self.also)
    }
}

/// What every client task and the conductor share.
pub(crate) struct Shared {
    /// ws URLs (without query) of the gateways clients may connect to; [0] is the faulty one.
    pub(crate) live: RwLock<Vec<String>>,
    /// Acks, messages, joins and connections: what the progress watchdog watches.
    pub(crate) progress: AtomicU64,
    pub(crate) acked: AtomicUsize,
    /// Highest acked seq per room.
    pub(crate) acked_head: HashMap<RoomId, AtomicU64>,
    /// Senders per room still sending.
    pub(crate) sending: HashMap<RoomId, AtomicUsize>,
    /// Each client's position in its room (for the quiet room's repair check).
    pub(crate) positions: Vec<AtomicU64>,
    /// Each client's current activity, for the watchdog's report.
    pub(crate) board: Mutex<Vec<String>>,
    pub(crate) quiet_done: AtomicBool,
    /// Indexes of the quiet room's clients, its sender included.
    pub(crate) quiet_clients: Vec<usize>,
    /// When every client has joined and sending starts.
    pub(crate) started: Instant,
}

impl Shared {
    fn bump(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    fn head(&self, room: &RoomId) -> u64 {
        self.acked_head[room].load(Ordering::Relaxed)
    }

    fn still_sending(&self, room: &RoomId) -> bool {
        self.sending[room].load(Ordering::Relaxed) > 0
    }
}

/// What a client saw of one of its rooms.
#[derive(Debug, Default)]
pub(crate) struct RoomRecord {
    /// The seq of the client's first `joined`: every message after it is expected.
    pub(crate) first_joined: Option<u64>,
    /// (seq, id) of every message received, in order, across all connections.
    pub(crate) received: Vec<(u64, String)>,
}

#[derive(Debug, Default)]
pub(crate) struct ClientReport {
    pub(crate) name: String,
    pub(crate) role: Option<Role>,
    pub(crate) rooms: BTreeMap<RoomId, RoomRecord>,
    /// Messages of other rooms (never expected).
    pub(crate) foreign: usize,
    /// What the session counted: the gateway's duplicates, holes and messages of rooms never
    /// joined are dropped there (the app never sees them), so the checker reads them here.
    pub(crate) session: Stats,
    /// Acked sends: (id, room, seq).
    pub(crate) acked: Vec<(String, RoomId, u64)>,
    pub(crate) connects: usize,
    /// Closes by code (resume codes), and drops (`None`).
    pub(crate) closes: BTreeMap<Option<u16>, usize>,
    /// Connections ended during a replay the client stopped reading: closed with 4001, or
    /// dropped (the gateway's close grace passed, or the gateway was killed meanwhile).
    pub(crate) kicked_mid_join: usize,
    pub(crate) dropped_mid_join: usize,
    /// Replays this client stopped reading during.
    pub(crate) stalled_replays: usize,
    /// Per stalled replay, what happened, in words.
    pub(crate) stall_notes: Vec<String>,
    /// 4001 closes of a client that kept reading, while a join of its was being replayed (the
    /// room's live messages outgrew the buffer kept for it meanwhile: documented) and while it
    /// had no join pending (its queue overflowed while it was reading: should not happen).
    pub(crate) kicked_replaying: usize,
    pub(crate) kicked_live: usize,
    pub(crate) churns: BTreeMap<&'static str, usize>,
    pub(crate) retried_errors: BTreeMap<String, usize>,
    /// Quiet sender: seconds from a burst's last ack until every member had it.
    pub(crate) repairs: Vec<f64>,
}

/// A client: its session and its record.
struct Driver {
    plan: Plan,
    name: String,
    session: Session,
    shared: Arc<Shared>,
    report: ClientReport,
    /// Rooms the client is in (or joining).
    wanted: BTreeSet<RoomId>,
    /// Rooms whose join (first, re-join, or after a reconnect) awaits its `joined`.
    awaiting: BTreeSet<RoomId>,
    /// A join was asked for and the client stalled before reading its replay; what the gateway
    /// did about it is read next.
    stalled_join: bool,
    /// The gateway of the current connection (its `ws://` URL).
    url: Option<String>,
    /// The send awaiting its ack.
    current: Option<String>,
    left: bool,
}

impl Driver {
    fn new(plan: Plan, shared: Arc<Shared>) -> anyhow::Result<Driver> {
        let name = format!("client-{}", plan.index);
        let pinned = matches!(plan.role, Role::QuietSender | Role::QuietMember);
        let urls = Arc::clone(&shared);
        let user = name.clone();
        let home = plan.index;
        let mut session = Session::with_url_source(
            move |attempt| {
                let live = urls.live.read().expect("live lock");
                // The quiet room lives on gateway-0, behind the fault layer.
                let base = if pinned {
                    &live[0]
                } else {
                    &live[(home + attempt) % live.len()]
                };
                format!("{base}?user={user}")
            },
            None,
        );
        session.set_backoff(Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
        });
        session.set_id_prefix(&name)?;
        let report = ClientReport {
            name: name.clone(),
            role: Some(plan.role),
            rooms: plan
                .rooms()
                .map(|r| (r.clone(), RoomRecord::default()))
                .collect(),
            ..ClientReport::default()
        };
        Ok(Driver {
            plan,
            name,
            session,
            shared,
            report,
            wanted: BTreeSet::new(),
            awaiting: BTreeSet::new(),
            stalled_join: false,
            url: None,
            current: None,
            left: false,
        })
    }

    fn status(&self, what: impl std::fmt::Display) {
        let line = format!(
            "{} ({}, {}): {what}",
            self.name,
            self.plan.role.name(),
            self.plan.room
        );
        self.shared.board.lock().expect("board lock")[self.plan.index] = line;
    }

    /// Position in the main room.
    fn position(&self) -> u64 {
        self.position_in(&self.plan.room)
    }

    fn position_in(&self, room: &RoomId) -> u64 {
        self.session.position(room).map_or(0, |s| s.0)
    }

    fn awaiting_main(&self) -> bool {
        self.awaiting.contains(&self.plan.room)
    }

    /// One event of the session, recorded.
    async fn step(&mut self) -> anyhow::Result<()> {
        let event = self
            .session
            .next_event()
            .await
            .with_context(|| format!("{}: closed for good", self.name))?;
        self.record(event)
    }

    /// One event, or nothing by `deadline` (`false`).
    async fn step_until(&mut self, deadline: Instant) -> anyhow::Result<bool> {
        match tokio::time::timeout_at(deadline, self.session.next_event()).await {
            Err(_) => Ok(false),
            Ok(event) => {
                let event = event.with_context(|| format!("{}: closed for good", self.name))?;
                self.record(event)?;
                Ok(true)
            }
        }
    }

    fn record(&mut self, event: Event) -> anyhow::Result<()> {
        let shared = Arc::clone(&self.shared);
        match event {
            Event::Connected { url } => {
                self.url = Some(url);
                self.report.connects += 1;
                // The session re-joins every room the client is in.
                self.awaiting.clone_from(&self.wanted);
                shared.bump();
            }
            Event::ConnectFailed { .. } | Event::TokenRefreshFailed { .. } => {}
            Event::Disconnected { code, .. } => {
                *self.report.closes.entry(code).or_default() += 1;
                let kicked = matches!(code, None | Some(close::SLOW_CONSUMER));
                if kicked && self.stalled_join && self.awaiting_main() {
                    // The connection of the stalled replay ended (read after the stall).
                    if code.is_some() {
                        self.report.kicked_mid_join += 1;
                    } else {
                        self.report.dropped_mid_join += 1;
                    }
                    self.stalled_join = false;
                } else if code == Some(close::SLOW_CONSUMER) {
                    if self.awaiting.is_empty() {
                        self.report.kicked_live += 1;
                    } else {
                        self.report.kicked_replaying += 1;
                    }
                }
            }
            Event::Message(m) => {
                let Some(record) = self.report.rooms.get_mut(&m.room) else {
                    self.report.foreign += 1;
                    return Ok(());
                };
                record.received.push((m.seq.0, m.id.to_string()));
                if m.room == self.plan.room {
                    shared.positions[self.plan.index].fetch_max(m.seq.0, Ordering::Relaxed);
                }
                shared.bump();
            }
            Event::Joined { room, seq, .. } if self.report.rooms.contains_key(&room) => {
                let record = self.report.rooms.get_mut(&room).expect("known room");
                record.first_joined.get_or_insert(seq.0);
                self.awaiting.remove(&room);
                if room == self.plan.room {
                    self.left = false;
                    shared.positions[self.plan.index].fetch_max(seq.0, Ordering::Relaxed);
                }
                shared.bump();
            }
            Event::Left { room } if room == self.plan.room => self.left = true,
            Event::Acked { id, room, seq } => {
                if self.current.as_deref() == Some(id.as_str()) {
                    self.current = None;
                    self.report
                        .acked
                        .push((id.to_string(), room.clone(), seq.0));
                    shared.acked.fetch_add(1, Ordering::Relaxed);
                    shared.acked_head[&room].fetch_max(seq.0, Ordering::Relaxed);
                    shared.bump();
                }
            }
            // The session retries these (a send with the same id, a join after a backoff).
            Event::Retrying { code, .. } => {
                *self
                    .report
                    .retried_errors
                    .entry(format!("{code:?}"))
                    .or_default() += 1;
            }
            other => bail!("{}: unexpected event {other:?}", self.name),
        }
        Ok(())
    }

    /// Joins every room of the client and waits for their `joined`.
    async fn join_all(&mut self) -> anyhow::Result<()> {
        self.status("joining");
        let rooms: Vec<RoomId> = self.plan.rooms().cloned().collect();
        for room in rooms {
            self.session.join(room.clone(), None);
            self.wanted.insert(room.clone());
            self.awaiting.insert(room);
        }
        while !self.awaiting.is_empty() {
            self.step().await?;
        }
        Ok(())
    }

    /// (Re-)joins the main room (with `since` = its position) and waits for `joined`.
    async fn join_main(&mut self) -> anyhow::Result<()> {
        self.status("re-joining");
        let room = self.plan.room.clone();
        self.session.join(room.clone(), None);
        self.wanted.insert(room.clone());
        self.awaiting.insert(room);
        while self.awaiting_main() {
            self.step().await?;
        }
        Ok(())
    }

    /// Leaves the main room and waits for `left`.
    async fn leave_main(&mut self) -> anyhow::Result<()> {
        let room = self.plan.room.clone();
        self.session.leave(&room);
        self.wanted.remove(&room);
        self.awaiting.remove(&room);
        self.left = false;
        while !self.left {
            self.step().await?;
        }
        Ok(())
    }

    /// Sends one message and reads until it is acked.
    async fn send_one(&mut self, n: usize, body: &str) -> anyhow::Result<()> {
        let id = self.session.send(&self.plan.room, body)?;
        self.current = Some(id.to_string());
        self.status(format_args!(
            "sending {}/{}: awaiting the ack of {id}",
            n + 1,
            self.plan.messages
        ));
        while self.current.is_some() {
            self.step().await?;
        }
        Ok(())
    }

    /// Reads (and keeps the session going) until `deadline`.
    async fn read_until(&mut self, deadline: Instant) -> anyhow::Result<()> {
        while self.step_until(deadline).await? {}
        Ok(())
    }

    /// Reads until the room's acked head is `ahead` past `from`, its senders are done, or `cap`
    /// passes (without reading when `read` is false).
    async fn wait_for_room(
        &mut self,
        from: u64,
        ahead: u64,
        cap: Option<Duration>,
        read: bool,
    ) -> anyhow::Result<()> {
        let until = cap.map(|cap| Instant::now() + cap);
        let room = self.plan.room.clone();
        while until.is_none_or(|until| Instant::now() < until)
            && self.shared.head(&room) < from + ahead
            && self.shared.still_sending(&room)
        {
            let tick = Instant::now() + Duration::from_millis(50);
            if read {
                self.read_until(tick).await?;
            } else {
                tokio::time::sleep_until(tick).await;
            }
        }
        Ok(())
    }

    /// Waits for the final heads, then reads until the client has each room's head; closes.
    async fn finish(
        mut self,
        mut heads: watch::Receiver<Option<HashMap<RoomId, u64>>>,
    ) -> anyhow::Result<ClientReport> {
        self.status(IDLE);
        let targets: Vec<(RoomId, u64)> = loop {
            if let Some(heads) = heads.borrow().as_ref() {
                break self.plan.rooms().map(|r| (r.clone(), heads[r])).collect();
            }
            tokio::select! {
                changed = heads.changed() => changed?,
                event = self.session.next_event() => {
                    let event = event.with_context(|| format!("{}: closed for good", self.name))?;
                    self.record(event)?;
                }
            }
        };
        loop {
            let behind: Vec<String> = targets
                .iter()
                .filter(|(room, head)| {
                    self.position_in(room) < *head || self.awaiting.contains(room)
                })
                .map(|(room, head)| format!("{room} at seq {} of {head}", self.position_in(room)))
                .collect();
            if behind.is_empty() {
                break;
            }
            self.status(format_args!(
                "catching up: {}{}",
                behind.join(", "),
                if self.session.is_connected() {
                    ""
                } else {
                    " (reconnecting)"
                }
            ));
            self.step().await?;
        }
        self.status("finished");
        self.report.session = self.session.stats();
        let _ = self.session.close().await;
        Ok(self.report)
    }
}

/// The board's line of a client that has done its part and waits for the final heads.
pub(crate) const IDLE: &str = "done; waiting for the final heads";

/// Paces a sender: message `n` not before this instant.
fn pace(shared: &Shared, profile: &Profile, n: usize, of: usize) -> Instant {
    if profile.min_duration.is_zero() || of == 0 {
        return shared.started;
    }
    shared.started + profile.min_duration.mul_f64(n as f64 / of as f64)
}

pub(crate) async fn run_client(
    plan: Plan,
    shared: Arc<Shared>,
    profile: Profile,
    args: Arc<Args>,
    start: Arc<Barrier>,
    heads: watch::Receiver<Option<HashMap<RoomId, u64>>>,
) -> anyhow::Result<ClientReport> {
    let mut driver = Driver::new(plan.clone(), Arc::clone(&shared))?;
    driver.join_all().await?;
    driver.status("joined; waiting for the start");
    tokio::select! {
        _ = start.wait() => {}
        // Keep reading meanwhile (heartbeats, nothing else is sent yet).
        result = async { loop { driver.step().await?; } } => return result,
    }
    match plan.role {
        Role::Sender | Role::Churner | Role::BulkSender => {
            let body = |n: usize| -> String {
                if plan.role == Role::BulkSender {
                    let head = format!("bulk {n} from {} ", driver_name(plan.index));
                    let fill = args.bulk_body_bytes.saturating_sub(head.len()).max(1);
                    format!("{head}{}", "x".repeat(fill))
                } else {
                    format!("message {n} from {}", driver_name(plan.index))
                }
            };
            for n in 0..plan.messages {
                let not_before = pace(&shared, &profile, n, plan.messages);
                driver.read_until(not_before).await?;
                driver.send_one(n, &body(n)).await?;
                if plan.role == Role::Churner && (n + 1) % args.churn_every == 0 {
                    churn(&mut driver, (n + 1) / args.churn_every).await?;
                }
            }
            shared.sending[&plan.room].fetch_sub(1, Ordering::Relaxed);
        }
        Role::Staller => {
            let total = profile.bulk_messages() as u64;
            let span = total / profile.stalls as u64;
            for stall in 0..profile.stalls as u64 {
                // Read normally until this stall's turn, then go away while the room moves on by
                // most of a span (megabytes of bulk bodies), then ask for the replay and stop
                // reading.
                let leave_at = stall * span + 5 + plan.index as u64 % 5;
                driver.status(format_args!(
                    "reading until the bulk head reaches {leave_at}"
                ));
                let from = driver.position();
                driver
                    .wait_for_room(from, leave_at.saturating_sub(from), None, true)
                    .await?;
                stall_during_replay(
                    &mut driver,
                    &args,
                    span * 9 / 10,
                    (stall + plan.index as u64) % 2 == 0,
                )
                .await?;
            }
        }
        Role::QuietSender => quiet_sender(&mut driver, &args, &profile).await?,
        Role::QuietMember => {
            driver.status("reading");
        }
    }
    if plan.role != Role::QuietSender && plan.room.as_str() == QUIET {
        // Quiet members read until the quiet sender is done.
        while !shared.quiet_done.load(Ordering::Relaxed) {
            driver
                .read_until(Instant::now() + Duration::from_millis(100))
                .await?;
        }
    }
    driver.finish(heads).await
}

pub(crate) fn driver_name(index: usize) -> String {
    format!("client-{index}")
}

/// A churner's churn, by turns: leave and re-join with `since`; drop the connection and resume;
/// re-join in place (the session leaves first).
async fn churn(driver: &mut Driver, turn: usize) -> anyhow::Result<()> {
    let from = driver.position();
    match turn % 3 {
        1 => {
            driver.status("left; re-joining with since once the room moved on");
            driver.leave_main().await?;
            driver
                .wait_for_room(from, 10, Some(Duration::from_secs(2)), true)
                .await?;
            driver.join_main().await?;
            *driver.report.churns.entry("leave and re-join").or_default() += 1;
        }
        2 => {
            driver.status("dropped its connection; resuming once the room moved on");
            driver.session.drop_connection();
            driver
                .wait_for_room(from, 10, Some(Duration::from_secs(2)), false)
                .await?;
            while !driver.session.is_connected() || driver.awaiting_main() {
                driver.step().await?;
            }
            *driver.report.churns.entry("drop and resume").or_default() += 1;
        }
        _ => {
            driver.join_main().await?;
            *driver.report.churns.entry("re-join in place").or_default() += 1;
        }
    }
    Ok(())
}

/// Goes away (leaves, or drops the connection), waits until the room has moved on by `ahead`,
/// asks for the replay, and reads nothing for `--stall-secs`.
async fn stall_during_replay(
    driver: &mut Driver,
    args: &Args,
    ahead: u64,
    by_leaving: bool,
) -> anyhow::Result<()> {
    let room = driver.plan.room.clone();
    // Either way the replay goes to a fresh connection: the kernel grows the buffers of one that
    // has been reading fast, and they would swallow the whole replay.
    driver.session.drop_connection();
    if by_leaving {
        while !driver.session.is_connected() || !driver.awaiting.is_empty() {
            driver.step().await?;
        }
        driver.leave_main().await?;
    }
    let from = driver.position();
    driver.status(format_args!(
        "away from seq {from} until the room is {ahead} messages further"
    ));
    // Away: reading the other room after a leave, not reading (not even connected) otherwise.
    driver.wait_for_room(from, ahead, None, by_leaving).await?;
    if !by_leaving {
        // Reconnect: the session re-joins every room with since once it writes.
        while !driver.session.is_connected() {
            driver.step().await?;
        }
    }
    let metrics = driver.url.as_deref().map(metrics_url);
    let slow_before = match &metrics {
        Some(url) => slow_consumers(url).await,
        None => None,
    };
    if by_leaving {
        driver.session.join(room.clone(), None);
        driver.wanted.insert(room.clone());
        driver.awaiting.insert(room);
    }
    driver.session.flush().await.ok();
    driver.stalled_join = true;
    driver.report.stalled_replays += 1;
    let head = driver.shared.head(&driver.plan.room);
    driver.status(format_args!(
        "not reading during its replay from seq {from} (room head {head}), until its gateway \
         counts a slow consumer or {} s pass",
        args.stall_secs
    ));
    let stalled = Instant::now();
    while stalled.elapsed() < Duration::from_secs(args.stall_secs) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = match &metrics {
            Some(url) => slow_consumers(url).await,
            None => None,
        };
        if now.is_some() && now > slow_before {
            break;
        }
    }
    let stall_took = stalled.elapsed();
    driver.status("reading its replay after the stall");
    let (ended_before, closes_before) =
        (ended_mid_join(&driver.report), driver.report.closes.clone());
    let resumed = Instant::now();
    while driver.awaiting_main() {
        driver.step().await?;
    }
    driver.stalled_join = false;
    driver.report.stall_notes.push(format!(
        "{}: {} from seq {from} (head {head}), stalled {:.1} s: {} after the stall, joined {:.1} s later at seq {}",
        driver.name,
        if by_leaving { "left and re-joined" } else { "reconnected" },
        stall_took.as_secs_f64(),
        if ended_mid_join(&driver.report) == ended_before {
            "not closed".to_owned()
        } else {
            let new: Vec<String> = driver
                .report
                .closes
                .iter()
                .filter(|(code, n)| closes_before.get(*code) != Some(*n))
                .map(|(code, _)| code.map_or("dropped".to_owned(), |c| format!("closed with {c}")))
                .collect();
            format!("{} mid-join", new.join(" and "))
        },
        resumed.elapsed().as_secs_f64(),
        driver.position()
    ));
    Ok(())
}

fn ended_mid_join(report: &ClientReport) -> usize {
    report.kicked_mid_join + report.dropped_mid_join
}

/// `http://…/metrics` of the gateway behind a client's `ws://…/ws?…` URL.
fn metrics_url(ws: &str) -> String {
    let addr = ws
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default();
    format!("http://{addr}/metrics")
}

/// The gateway's count of connections closed as slow consumers (`None` if it cannot be read).
async fn slow_consumers(metrics: &str) -> Option<u64> {
    let text = reqwest::Client::new()
        .get(metrics)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    metric_sum(&text, "chorus_gateway_slow_consumers_total").map(|v| v as u64)
}

/// Sends bursts; the fault layer drops each burst's last message at gateway-0, which comes after
/// a silence of `--quiet-pause-ms`. After it, the room stays quiet until every quiet client has
/// that message.
async fn quiet_sender(driver: &mut Driver, args: &Args, profile: &Profile) -> anyhow::Result<()> {
    let members = driver.shared.quiet_clients.clone();
    for burst in 0..profile.quiet_bursts {
        for k in 0..args.quiet_burst_len {
            let n = burst * args.quiet_burst_len + k;
            if k + 1 == args.quiet_burst_len {
                driver.status(format_args!(
                    "burst {}: quiet before its last message",
                    burst + 1
                ));
                driver
                    .read_until(Instant::now() + Duration::from_millis(args.quiet_pause_ms))
                    .await?;
            }
            driver
                .send_one(n, &format!("quiet {n} from {}", driver.name))
                .await?;
        }
        let target = driver.shared.head(&driver.plan.room);
        if target % args.quiet_burst_len as u64 != 0 {
            bail!("quiet room: burst ended at seq {target}, which the drop rule does not name");
        }
        // No clock decides here: a gateway that never finds the lost message leaves the room
        // waiting, and once everything else is done the progress watchdog fails the run naming
        // this wait. How long the repair took is reported.
        let acked = Instant::now();
        loop {
            let behind: Vec<String> = members
                .iter()
                .map(|i| (*i, driver.shared.positions[*i].load(Ordering::Relaxed)))
                .filter(|(_, at)| *at < target)
                .map(|(i, at)| format!("{} at {at}", driver_name(i)))
                .collect();
            if behind.is_empty() {
                driver.report.repairs.push(acked.elapsed().as_secs_f64());
                break;
            }
            driver.status(format_args!(
                "burst {}: waiting until every quiet member has seq {target} (its notification \
                 was dropped at gateway-0 {:.0} s ago; {})",
                burst + 1,
                acked.elapsed().as_secs_f64(),
                behind.join(", ")
            ));
            driver
                .read_until(Instant::now() + Duration::from_millis(50))
                .await?;
        }
    }
    driver.shared.sending[&driver.plan.room].fetch_sub(1, Ordering::Relaxed);
    driver.shared.quiet_done.store(true, Ordering::Relaxed);
    Ok(())
}
