//! The client conformance scenarios of `clients/conformance/scenarios.json`, run for the Rust
//! client (`chorus_client::Session`) against the real stack (writer, publisher poller, gateways,
//! the AWS emulator), as `clients/typescript/test/conformance.test.mjs` runs them for the
//! TypeScript client. Each scenario's params come from the JSON; its runner below performs the
//! steps and checks every line of `expect`: every message once, in order, equal to what the
//! writer stored. A scenario id without a runner (or a runner without a scenario) fails
//! `every_scenario_has_a_runner`.
//!
//! Each client is driven by a task of its own that records every event (and counts as progress);
//! the test waits for what it expects, and fails when nothing at all happened for
//! `CHORUS_TEST_IDLE_MS` (30 s), naming what it awaited — never after a fixed total time.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chorus_client::{
    Backoff, ClientError, ClientMsgId, Event, MessageEvent, PageLimit, RoomId, Seq, Session, Stats,
};
use chorus_e2e::faults::{FaultPlan, FaultyIngress};
use chorus_e2e::proxy::{ProxyOptions, TcpProxy};
use chorus_e2e::{Service, Stack, writer_http};
use chorus_testkit::emulator::aws;
use chorus_testkit::tokens::{TokenIssuer, unix_now};
use chorus_testkit::wait::idle_limit;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

const SUITE: &str = include_str!("../../../clients/conformance/scenarios.json");

/// The scenarios this file runs, by id.
const RUNNERS: &[&str] = &[
    "drain",
    "kill",
    "slow-network",
    "reconnect-mid-send",
    "duplicate-ack",
    "token-expiry",
    "history-expired",
    "resync",
    "resume-codes",
    "scrollback",
];

fn suite() -> Value {
    serde_json::from_str(SUITE).expect("scenarios.json is JSON")
}

#[test]
fn every_scenario_has_a_runner_and_every_runner_a_scenario() {
    let suite = suite();
    assert_eq!(suite["protocol"], "chorus.v1");
    let ids: BTreeSet<&str> = suite["scenarios"]
        .as_array()
        .expect("a list of scenarios")
        .iter()
        .map(|s| s["id"].as_str().expect("each scenario has an id"))
        .collect();
    let runners: BTreeSet<&str> = RUNNERS.iter().copied().collect();
    let without_runner: Vec<&&str> = ids.difference(&runners).collect();
    assert!(
        without_runner.is_empty(),
        "scenarios without a runner: {without_runner:?}"
    );
    let without_scenario: Vec<&&str> = runners.difference(&ids).collect();
    assert!(
        without_scenario.is_empty(),
        "runners without a scenario: {without_scenario:?}"
    );
}

/// A scenario's params and the suite's client defaults.
struct Scenario {
    id: &'static str,
    params: Value,
    backoff: Backoff,
    request_timeout: Duration,
}

impl Scenario {
    fn load(id: &'static str) -> Scenario {
        let suite = suite();
        let scenario = suite["scenarios"]
            .as_array()
            .expect("a list of scenarios")
            .iter()
            .find(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("scenarios.json has no scenario {id}"));
        let defaults = &suite["defaults"];
        let ms = |v: &Value, what: &str| {
            Duration::from_millis(
                v.as_u64()
                    .unwrap_or_else(|| panic!("defaults.{what} is a number")),
            )
        };
        Scenario {
            id,
            params: scenario["params"].clone(),
            backoff: Backoff {
                base: ms(&defaults["backoff"]["initialDelayMs"], "initialDelayMs"),
                cap: ms(&defaults["backoff"]["maxDelayMs"], "maxDelayMs"),
            },
            request_timeout: ms(&defaults["requestTimeoutMs"], "requestTimeoutMs"),
        }
    }

    fn num(&self, name: &str) -> u64 {
        self.params[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: param {name} is not a number", self.id))
    }

    fn nums(&self, name: &str) -> Vec<u64> {
        self.params[name]
            .as_array()
            .unwrap_or_else(|| panic!("{}: param {name} is not a list", self.id))
            .iter()
            .map(|v| v.as_u64().expect("a number"))
            .collect()
    }

    /// A room of its own for each run.
    fn room(&self) -> RoomId {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        RoomId::parse(format!("{}-{}", self.id, &unique[..12])).expect("a valid room name")
    }
}

// ---- progress --------------------------------------------------------------------------------

/// Anything that happened (a client event); waits give up only when this stops moving.
#[derive(Clone)]
struct Progress(watch::Sender<u64>);

impl Progress {
    fn new() -> Progress {
        Progress(watch::Sender::new(0))
    }

    fn bump(&self) {
        self.0.send_modify(|tick| *tick += 1);
    }

    fn waiter(&self, what: impl Into<String>) -> Waiter {
        Waiter {
            ticks: self.0.subscribe(),
            idle: idle_limit(),
            deadline: Instant::now() + idle_limit(),
            what: what.into(),
        }
    }

    /// Returns once `done()` holds, checked after every bump (and every 50 ms, for what moves
    /// without a client event: a process exit); panics when nothing happened for the idle limit.
    async fn until(&self, what: impl Into<String>, mut done: impl FnMut() -> bool) {
        let mut waiter = self.waiter(what);
        while !done() {
            waiter.step().await;
        }
    }
}

/// One wait on [`Progress`].
struct Waiter {
    ticks: watch::Receiver<u64>,
    idle: Duration,
    deadline: Instant,
    what: String,
}

impl Waiter {
    /// Until the next bump, at most 50 ms; panics once nothing happened for the idle limit.
    async fn step(&mut self) {
        tokio::select! {
            changed = self.ticks.changed() => {
                changed.expect("progress lives as long as the test");
                self.deadline = Instant::now() + self.idle;
            }
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        assert!(
            Instant::now() < self.deadline,
            "nothing happened for {:?} while waiting for {}",
            self.idle,
            self.what
        );
    }
}

// ---- clients ---------------------------------------------------------------------------------

/// Everything a client reported, in order.
#[derive(Default)]
struct Seen {
    events: Vec<Event>,
    /// The error `next_event` stopped with, and the ones it gave when polled again after.
    stops: Vec<ClientError>,
}

enum Command {
    Join(RoomId, Option<Seq>),
    Send {
        room: RoomId,
        body: String,
        id: Option<ClientMsgId>,
        reply: oneshot::Sender<Result<ClientMsgId, ClientError>>,
    },
    History {
        room: RoomId,
        before: Option<Seq>,
        limit: PageLimit,
        reply: oneshot::Sender<Result<ClientMsgId, ClientError>>,
    },
    Stats(oneshot::Sender<Stats>),
    Url(oneshot::Sender<Option<String>>),
    /// After a stop: call `next_event` once more (it must not reconnect).
    PollAgain,
}

/// Called in the client's task for each event, before the test sees it.
type Hook = Box<dyn FnMut(&Event) + Send>;

/// A client ([`Session`]) driven by a task of its own, recording what it reports.
struct Recorder {
    name: String,
    progress: Progress,
    commands: mpsc::UnboundedSender<Command>,
    seen: Arc<Mutex<Seen>>,
}

impl Recorder {
    fn start(name: &str, urls: Vec<String>, scenario: &Scenario, progress: &Progress) -> Recorder {
        Recorder::start_configured(name, urls, scenario, progress, |_| {})
    }

    /// [`Recorder::start`], with `configure` called on the session first.
    fn start_configured(
        name: &str,
        urls: Vec<String>,
        scenario: &Scenario,
        progress: &Progress,
        configure: impl FnOnce(&mut Session),
    ) -> Recorder {
        Recorder::start_with_hook(name, urls, scenario, progress, configure, Box::new(|_| {}))
    }

    fn start_with_hook(
        name: &str,
        urls: Vec<String>,
        scenario: &Scenario,
        progress: &Progress,
        configure: impl FnOnce(&mut Session),
        hook: Hook,
    ) -> Recorder {
        let mut session = Session::new(urls, None);
        session.set_backoff(scenario.backoff);
        session.set_request_timeout(scenario.request_timeout);
        session
            .set_id_prefix(name)
            .expect("a valid client message id prefix");
        configure(&mut session);
        let (commands, inbox) = mpsc::unbounded_channel();
        let seen = Arc::new(Mutex::new(Seen::default()));
        tokio::spawn(drive(
            session,
            inbox,
            Arc::clone(&seen),
            progress.clone(),
            hook,
        ));
        Recorder {
            name: name.to_owned(),
            progress: progress.clone(),
            commands,
            seen,
        }
    }

    fn with<T>(&self, read: impl FnOnce(&Seen) -> T) -> T {
        read(&self.seen.lock().expect("seen lock"))
    }

    fn count(&self, what: impl Fn(&Event) -> bool) -> usize {
        self.with(|seen| seen.events.iter().filter(|e| what(e)).count())
    }

    fn command(&self, command: Command) {
        self.commands
            .send(command)
            .unwrap_or_else(|_| panic!("{}'s task ended", self.name));
    }

    /// Joins `room` (with `since`) and waits for its next `joined`; returns (seq, resumed).
    async fn join(&self, room: &RoomId, since: Option<Seq>) -> (Seq, bool) {
        let is_joined = |e: &Event| matches!(e, Event::Joined { room: r, .. } if r == room);
        let before = self.count(is_joined);
        self.command(Command::Join(room.clone(), since));
        self.progress
            .until(format!("{} to join {room}", self.name), || {
                self.count(is_joined) > before
            })
            .await;
        self.with(|seen| {
            seen.events
                .iter()
                .rev()
                .find_map(|e| match e {
                    Event::Joined {
                        room: r,
                        seq,
                        resumed,
                    } if r == room => Some((*seq, *resumed)),
                    _ => None,
                })
                .expect("counted above")
        })
    }

    /// Hands a send to the session (with the caller's id, or a fresh one); returns its id.
    async fn send_now(&self, room: &RoomId, body: &str, id: Option<ClientMsgId>) -> ClientMsgId {
        let (reply, answer) = oneshot::channel();
        self.command(Command::Send {
            room: room.clone(),
            body: body.to_owned(),
            id,
            reply,
        });
        answer
            .await
            .expect("the client's task answers")
            .unwrap_or_else(|e| panic!("{} could not send {body:?}: {e}", self.name))
    }

    /// The seq of the first ack of `id` at or after event `from`, if it came.
    fn acked(&self, id: &ClientMsgId, from: usize) -> Option<Seq> {
        self.with(|seen| {
            seen.events[from.min(seen.events.len())..]
                .iter()
                .find_map(|e| match e {
                    Event::Acked { id: acked, seq, .. } if acked == id => Some(*seq),
                    Event::SendFailed {
                        id: failed,
                        message,
                        ..
                    } if failed == id => panic!("{id} was refused: {message}"),
                    _ => None,
                })
        })
    }

    /// Sends and waits for the ack; returns its seq.
    async fn send(&self, room: &RoomId, body: &str) -> Seq {
        self.send_with_id(room, body, None).await
    }

    async fn send_with_id(&self, room: &RoomId, body: &str, id: Option<ClientMsgId>) -> Seq {
        let from = self.with(|seen| seen.events.len());
        let id = self.send_now(room, body, id).await;
        let mut waiter = self
            .progress
            .waiter(format!("the ack of {}'s {body:?} ({id})", self.name));
        loop {
            if let Some(seq) = self.acked(&id, from) {
                return seq;
            }
            waiter.step().await;
        }
    }

    /// Sends `count` messages one after another, each after the previous ack; `after(n, seq)`
    /// runs after the n-th ack (from 1). Returns the acks' seqs.
    async fn send_in_turn(
        &self,
        room: &RoomId,
        count: u64,
        prefix: &str,
        mut after: impl AsyncFnMut(u64, Seq),
    ) -> Vec<Seq> {
        let mut seqs = Vec::new();
        for n in 1..=count {
            let seq = self.send(room, &format!("{prefix} {n}")).await;
            seqs.push(seq);
            after(n, seq).await;
        }
        seqs
    }

    /// Hands a scrollback request to the session; returns its id.
    async fn ask_history(
        &self,
        room: &RoomId,
        before: Option<Seq>,
        limit: PageLimit,
    ) -> ClientMsgId {
        let (reply, answer) = oneshot::channel();
        self.command(Command::History {
            room: room.clone(),
            before,
            limit,
            reply,
        });
        answer
            .await
            .expect("the client's task answers")
            .unwrap_or_else(|e| panic!("{} could not ask for history: {e}", self.name))
    }

    /// Waits for the page answering the history request `id`: (seq, id, sender, body) each.
    async fn page(&self, id: &ClientMsgId) -> Vec<(u64, String, String, String)> {
        let answer = || {
            self.with(|seen| {
                seen.events.iter().find_map(|e| match e {
                    Event::History {
                        id: answered,
                        messages,
                        ..
                    } if answered == id => Some(
                        messages
                            .iter()
                            .map(|m| {
                                let (seq, id, body) = summary(m);
                                (seq, id, m.sender.to_string(), body)
                            })
                            .collect(),
                    ),
                    Event::HistoryFailed {
                        id: failed,
                        message,
                        ..
                    } if failed == id => {
                        panic!("history request {id} was refused: {message}")
                    }
                    _ => None,
                })
            })
        };
        let mut waiter = self
            .progress
            .waiter(format!("the page answering {}'s {id}", self.name));
        loop {
            if let Some(page) = answer() {
                return page;
            }
            waiter.step().await;
        }
    }

    /// Every message delivered for `room`: (seq, id, body), in the order delivered.
    fn messages(&self, room: &RoomId) -> Vec<(u64, String, String)> {
        self.with(|seen| {
            seen.events
                .iter()
                .filter_map(|e| match e {
                    Event::Message(m) if m.room == *room => Some(summary(m)),
                    _ => None,
                })
                .collect()
        })
    }

    fn seqs(&self, room: &RoomId) -> Vec<u64> {
        self.messages(room)
            .into_iter()
            .map(|(seq, ..)| seq)
            .collect()
    }

    /// Waits until this client has received `count` messages of `room`.
    async fn receive(&self, room: &RoomId, count: usize) {
        self.progress
            .until(
                format!("{} to receive {count} messages of {room}", self.name),
                || self.messages(room).len() >= count,
            )
            .await;
    }

    async fn stats(&self) -> Stats {
        let (reply, answer) = oneshot::channel();
        self.command(Command::Stats(reply));
        answer.await.expect("the client's task answers")
    }

    async fn url(&self) -> Option<String> {
        let (reply, answer) = oneshot::channel();
        self.command(Command::Url(reply));
        answer.await.expect("the client's task answers")
    }

    /// Waits until `done` holds for the session's stats.
    async fn wait_stats(&self, what: &str, done: impl Fn(&Stats) -> bool) -> Stats {
        let mut waiter = self.progress.waiter(format!("{}: {what}", self.name));
        loop {
            let stats = self.stats().await;
            if done(&stats) {
                return stats;
            }
            waiter.step().await;
        }
    }

    /// Index of the first event matching `what`.
    fn position(&self, what: impl Fn(&Event) -> bool) -> Option<usize> {
        self.with(|seen| seen.events.iter().position(what))
    }
}

/// The client's task: the session's events, and the test's commands in between (`next_event` is
/// cancel-safe: a command arriving mid-wait loses nothing).
async fn drive(
    mut session: Session,
    mut commands: mpsc::UnboundedReceiver<Command>,
    seen: Arc<Mutex<Seen>>,
    progress: Progress,
    mut hook: Hook,
) {
    loop {
        let stopped = session.is_stopped();
        tokio::select! {
            command = commands.recv() => match command {
                None => {
                    let _ = session.close().await;
                    return;
                }
                Some(Command::Join(room, since)) => session.join(room, since),
                Some(Command::Send { room, body, id, reply }) => {
                    let sent = match id {
                        Some(id) => session.send_with_id(&room, id.clone(), &body).map(|()| id),
                        None => session.send(&room, &body),
                    };
                    let _ = reply.send(sent);
                }
                Some(Command::History { room, before, limit, reply }) => {
                    let _ = reply.send(session.history(&room, before, limit));
                }
                Some(Command::Stats(reply)) => {
                    let _ = reply.send(session.stats());
                }
                Some(Command::Url(reply)) => {
                    let _ = reply.send(session.url().map(str::to_owned));
                }
                Some(Command::PollAgain) => {
                    let again = tokio::time::timeout(Duration::from_secs(1), session.next_event()).await;
                    let mut seen = seen.lock().expect("seen lock");
                    match again {
                        Ok(Err(error)) => seen.stops.push(error),
                        Ok(Ok(event)) => seen.events.push(event),
                        Err(_) => {}
                    }
                    drop(seen);
                    progress.bump();
                }
            },
            event = session.next_event(), if !stopped => {
                let mut seen = seen.lock().expect("seen lock");
                match event {
                    Ok(event) => {
                        hook(&event);
                        seen.events.push(event);
                    }
                    Err(error) => seen.stops.push(error),
                }
                drop(seen);
                progress.bump();
            }
        }
    }
}

fn summary(m: &MessageEvent) -> (u64, String, String) {
    (m.seq.0, m.id.to_string(), m.body.as_str().to_owned())
}

// ---- the stack -----------------------------------------------------------------------------------

/// Every stored message of `room` after seq `from` (0: all), oldest first, from the writer's
/// history API (which answers 410 for a `from` older than what it still stores).
async fn history(stack: &Stack, room: &RoomId, from: u64) -> Vec<(u64, String, String)> {
    let http = writer_http();
    let mut messages = Vec::new();
    let mut after = from;
    loop {
        let res = http
            .get(format!(
                "{}/v1/rooms/{room}/messages?after={after}&limit=500",
                stack.writer.http()
            ))
            .send()
            .await
            .expect("GET history");
        assert!(res.status().is_success(), "history of {room}: {res:?}");
        let page: chorus_client::protocol::api::HistoryPage =
            res.json().await.expect("a history page");
        messages.extend(page.messages.iter().map(summary));
        match page.messages.last() {
            Some(last) if last.seq < page.head => after = last.seq.0,
            _ => return messages,
        }
    }
}

/// Deletes the stored items holding `seqs` of `room` from the table, as retention would. The
/// writer stores a run of a room's messages in one item keyed by its first seq (`last` is the
/// run's last), so the item holding each seq is the last one starting at or before it.
async fn delete_stored(table: &str, room: &RoomId, seqs: &[u64]) {
    use aws_sdk_dynamodb::types::AttributeValue;
    let dynamo = aws_sdk_dynamodb::Client::new(&aws().await);
    for seq in seqs {
        let found = dynamo
            .query()
            .table_name(table)
            .key_condition_expression("#r = :room AND #s <= :seq")
            .expression_attribute_names("#r", "room")
            .expression_attribute_names("#s", "seq")
            .expression_attribute_values(":room", AttributeValue::S(room.to_string()))
            .expression_attribute_values(":seq", AttributeValue::N(seq.to_string()))
            .scan_index_forward(false)
            .limit(1)
            .consistent_read(true)
            .send()
            .await
            .expect("query the item holding a seq");
        let Some(item) = found.items().first() else {
            continue;
        };
        let number = |name: &str| match item.get(name) {
            Some(AttributeValue::N(n)) => n.parse::<u64>().ok(),
            _ => None,
        };
        let first = number("seq").expect("an item has a seq");
        let last = number("last").unwrap_or(first);
        // Seq 0 is the room's head, not a message.
        if first == 0 || last < *seq {
            continue;
        }
        dynamo
            .delete_item()
            .table_name(table)
            .key("room", AttributeValue::S(room.to_string()))
            .key("seq", AttributeValue::N(first.to_string()))
            .send()
            .await
            .expect("delete a stored item");
    }
}

/// `ws://…/ws` of a gateway, for clients with tokens.
fn ws_url(gateway: &Service) -> String {
    format!("ws://{}/ws", gateway.addr)
}

// ---- checks ----------------------------------------------------------------------------------

/// The client got exactly what the writer stored for the room: each message once, in order.
fn assert_as_stored(client: &Recorder, room: &RoomId, stored: &[(u64, String, String)]) {
    assert_eq!(
        client.messages(room),
        stored,
        "{} got every stored message of {room} once, in order",
        client.name
    );
}

fn assert_each_id_stored_once(stored: &[(u64, String, String)]) {
    let ids: BTreeSet<&str> = stored.iter().map(|(_, id, _)| id.as_str()).collect();
    assert_eq!(
        ids.len(),
        stored.len(),
        "each client message id is stored once"
    );
    let seqs: Vec<u64> = stored.iter().map(|(seq, ..)| *seq).collect();
    assert_eq!(
        seqs,
        (1..=stored.len() as u64).collect::<Vec<_>>(),
        "dense seqs from 1"
    );
}

fn dense(seqs: &[Seq]) -> bool {
    seqs.iter().map(|s| s.0).eq(1..=seqs.len() as u64)
}

fn disconnected_with(code: Option<u16>) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::Disconnected { code: got, .. } if *got == code)
}

fn connected_to(url: String) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::Connected { url: got } if *got == url)
}

// ---- the scenarios -------------------------------------------------------------------------------

/// `drain` and `kill`: gateway-0 fails mid-stream while the sender (on gateway-1) keeps sending;
/// the receiver reaches gateway-1 through a proxy that holds its reconnection until the room has
/// moved on by `awayFor`, so only a resume with `since` gets what it missed.
async fn gateway_fails_mid_stream(scenario: &Scenario, kill: bool) {
    let (messages, fault_after, away_for) = (
        scenario.num("messages"),
        scenario.num("faultAfterAcks"),
        scenario.num("awayFor"),
    );
    let progress = Progress::new();
    let mut stack = Stack::start(2).await.expect("the stack starts");
    let room = scenario.room();
    let gate = TcpProxy::start(stack.gateways[1].addr, ProxyOptions::default())
        .await
        .expect("a proxy");
    gate.pause();
    let receiver = Recorder::start(
        "receiver",
        vec![stack.gateways[0].ws("receiver"), gate.ws("receiver")],
        scenario,
        &progress,
    );
    let sender = Recorder::start(
        "sender",
        vec![stack.gateways[1].ws("sender")],
        scenario,
        &progress,
    );
    receiver.join(&room, None).await;
    sender.join(&room, None).await;

    let acks = sender
        .send_in_turn(&room, messages, scenario.id, async |n, _| {
            if n == fault_after {
                if kill {
                    stack.gateways[0].kill();
                    // Its subscription is dead: the janitor removes it, as an operator's timer
                    // would (the emulator delivers synchronously, so a dead one stalls it).
                    let sns = aws_sdk_sns::Client::new(&aws().await);
                    chorus_gateway::bus::prune_dead_subscriptions(&sns, &stack.topic_arn)
                        .await
                        .expect("the janitor prunes the dead subscription");
                } else {
                    stack.gateways[0]
                        .signal_terminate()
                        .expect("SIGTERM to gateway-0");
                }
            }
            if n == fault_after + away_for {
                sender.receive(&room, n as usize).await;
                gate.resume();
            }
        })
        .await;
    assert!(
        dense(&acks),
        "every send is acked, seqs 1..{messages}: {acks:?}"
    );
    progress
        .until("gateway-0 to exit", || {
            stack.gateways[0]
                .exit_status()
                .expect("its state")
                .is_some()
        })
        .await;
    receiver.receive(&room, messages as usize).await;
    let stored = history(&stack, &room, 0).await;
    assert_eq!(stored.len() as u64, messages);
    assert_as_stored(&receiver, &room, &stored);
    let code = if kill { None } else { Some(4000) };
    let closed = receiver
        .position(disconnected_with(code))
        .unwrap_or_else(|| panic!("the receiver saw its connection end with {code:?}"));
    let moved = receiver
        .position(connected_to(gate.ws("receiver")))
        .expect("the receiver connected to gateway-1");
    assert!(closed < moved, "closed first, then moved to gateway-1");
    assert_eq!(receiver.url().await, Some(gate.ws("receiver")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain() {
    gateway_fails_mid_stream(&Scenario::load("drain"), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill() {
    gateway_fails_mid_stream(&Scenario::load("kill"), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_network() {
    let scenario = Scenario::load("slow-network");
    let (delay_ms, per_client, pause_after, request_timeout_ms) = (
        scenario.num("delayMs"),
        scenario.num("messagesPerClient"),
        scenario.num("pauseAfterAcks"),
        scenario.num("requestTimeoutMs"),
    );
    let progress = Progress::new();
    let stack = Stack::start(2).await.expect("the stack starts");
    let (g0, g1) = (&stack.gateways[0], &stack.gateways[1]);
    let options = ProxyOptions {
        delay: Duration::from_millis(delay_ms),
        ..ProxyOptions::default()
    };
    let proxy = TcpProxy::start(g0.addr, options).await.expect("a proxy");
    let room = scenario.room();
    let client = Recorder::start_configured(
        "client",
        vec![proxy.ws("client"), g1.ws("client")],
        &scenario,
        &progress,
        |s| s.set_request_timeout(Duration::from_millis(request_timeout_ms)),
    );
    let other = Recorder::start("other", vec![g1.ws("other")], &scenario, &progress);
    client.join(&room, None).await;
    other.join(&room, None).await;
    tokio::join!(
        client.send_in_turn(&room, per_client, "client", async |n, _| {
            if n == pause_after {
                proxy.pause();
            }
        }),
        other.send_in_turn(&room, per_client, "other", async |_, _| {}),
    );
    let total = 2 * per_client as usize;
    client.receive(&room, total).await;
    other.receive(&room, total).await;
    let stored = history(&stack, &room, 0).await;
    assert_eq!(stored.len(), total);
    assert_each_id_stored_once(&stored);
    assert_as_stored(&client, &room, &stored);
    assert_as_stored(&other, &room, &stored);
    assert_eq!(
        client.url().await,
        Some(g1.ws("client")),
        "the client left the silent connection for gateway-1"
    );
    assert!(
        client.position(|e| matches!(e, Event::Disconnected { code: None, reason, .. } if reason.contains("nothing heard"))).is_some(),
        "the client noticed the silence"
    );
    let stats = client.stats().await;
    assert!(
        stats.send_retries >= 1,
        "the send that met the silence was sent again: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_mid_send() {
    let scenario = Scenario::load("reconnect-mid-send");
    let (messages, cut_after) = (scenario.num("messages"), scenario.num("cutAfterAcks"));
    let progress = Progress::new();
    let stack = Stack::start(2).await.expect("the stack starts");
    let (g0, g1) = (&stack.gateways[0], &stack.gateways[1]);
    let proxy = Arc::new(
        TcpProxy::start(g0.addr, ProxyOptions::default())
            .await
            .expect("a proxy"),
    );
    let room = scenario.room();
    // The cut comes in the client's own task, at the ack that makes `cut_after`: before the
    // acks after it can reach the client.
    let acked = Arc::new(AtomicU64::new(0));
    let (cutter, counter) = (Arc::clone(&proxy), Arc::clone(&acked));
    let client = Recorder::start_with_hook(
        "client",
        vec![proxy.ws("client"), g1.ws("client")],
        &scenario,
        &progress,
        |_| {},
        Box::new(move |event| {
            if matches!(event, Event::Acked { .. })
                && counter.fetch_add(1, Ordering::SeqCst) + 1 == cut_after
            {
                cutter.cut();
            }
        }),
    );
    let receiver = Recorder::start("receiver", vec![g1.ws("receiver")], &scenario, &progress);
    client.join(&room, None).await;
    receiver.join(&room, None).await;
    let mut ids = Vec::new();
    for n in 1..=messages {
        ids.push(client.send_now(&room, &format!("burst {n}"), None).await);
    }
    progress
        .until(format!("acks of all {messages} sends"), || {
            ids.iter().all(|id| client.acked(id, 0).is_some())
        })
        .await;
    let acks: BTreeSet<u64> = ids
        .iter()
        .filter_map(|id| client.acked(id, 0))
        .map(|s| s.0)
        .collect();
    assert_eq!(acks.len() as u64, messages, "every ack has its own seq");
    assert_eq!(
        client.count(|e| matches!(e, Event::Acked { .. })) as u64,
        messages,
        "one ack each"
    );
    assert!(
        client.position(disconnected_with(None)).is_some(),
        "the cut dropped the client's connection"
    );
    let stats = client.stats().await;
    assert!(
        stats.send_retries >= 1,
        "unacked sends were sent again: {stats:?}"
    );
    client.receive(&room, messages as usize).await;
    receiver.receive(&room, messages as usize).await;
    let stored = history(&stack, &room, 0).await;
    assert_eq!(stored.len() as u64, messages, "each send stored once");
    assert_each_id_stored_once(&stored);
    assert_as_stored(&client, &room, &stored);
    assert_as_stored(&receiver, &room, &stored);
    let stored_seqs: BTreeSet<u64> = stored.iter().map(|(seq, ..)| *seq).collect();
    assert_eq!(acks, stored_seqs, "the acks name the stored seqs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_ack() {
    let scenario = Scenario::load("duplicate-ack");
    let messages = scenario.num("messages");
    let progress = Progress::new();
    let stack = Stack::start(1).await.expect("the stack starts");
    let g0 = &stack.gateways[0];
    let options = ProxyOptions {
        duplicate_text_frames: true,
        ..ProxyOptions::default()
    };
    let proxy = TcpProxy::start(g0.addr, options).await.expect("a proxy");
    let room = scenario.room();
    let client = Recorder::start("client", vec![proxy.ws("client")], &scenario, &progress);
    let receiver = Recorder::start("receiver", vec![g0.ws("receiver")], &scenario, &progress);
    client.join(&room, None).await;
    receiver.join(&room, None).await;
    let acks = client
        .send_in_turn(&room, messages, "dup", async |_, _| {})
        .await;
    assert!(
        dense(&acks),
        "each send resolves once with its seq: {acks:?}"
    );
    let id = ClientMsgId::parse(format!(
        "again-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ))
    .expect("a valid id");
    let first = client
        .send_with_id(&room, "said twice", Some(id.clone()))
        .await;
    let second = client
        .send_with_id(&room, "said twice", Some(id.clone()))
        .await;
    assert_eq!(second, first, "a repeated id is acked with the first seq");
    let total = messages + 1;
    client.receive(&room, total as usize).await;
    receiver.receive(&room, total as usize).await;
    let stored = history(&stack, &room, 0).await;
    assert_eq!(
        stored.len() as u64,
        total,
        "the repeated send is stored once"
    );
    assert_as_stored(&client, &room, &stored);
    assert_as_stored(&receiver, &room, &stored);
    assert!(
        proxy.duplicated() >= 2 * total,
        "the proxy duplicated frames ({})",
        proxy.duplicated()
    );
    // Every message and ack came twice; each second copy is dropped by the session.
    let stats = client
        .wait_stats("dropping the second copy of every message and ack", |s| {
            // An ack per send, the repeated one included: total + 1.
            s.duplicates_dropped >= total && s.stray_acks > total
        })
        .await;
    assert_eq!(stats.gaps_resynced, 0, "{stats:?}");
    assert_eq!(
        client.count(|e| matches!(e, Event::Acked { .. })) as u64,
        total + 1,
        "one ack event per send"
    );
    assert_eq!(
        client.count(|e| matches!(e, Event::Joined { .. })),
        1,
        "one joined event for one join"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry() {
    let scenario = Scenario::load("token-expiry");
    let (ttl, before, after) = (
        Duration::from_secs(scenario.num("tokenTtlSecs")),
        scenario.num("messagesBefore"),
        scenario.num("messagesAfter"),
    );
    let progress = Progress::new();
    let mut stack = Stack::start(0).await.expect("the stack starts");
    let issuer = Arc::new(TokenIssuer::new());
    let mut flags = issuer.gateway_flags();
    flags.extend(["--ping-interval-ms", "200", "--idle-timeout-ms", "10000"].map(String::from));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    stack
        .add_gateway(&flags)
        .await
        .expect("a gateway with tokens");
    let url = ws_url(&stack.gateways[0]);
    let room = scenario.room();
    let refreshed = Arc::new(AtomicUsize::new(0));
    let old_expiry;
    let client = {
        let (issuer, refreshed, room) = (Arc::clone(&issuer), Arc::clone(&refreshed), room.clone());
        let token = issuer.mint("carol", &[room.as_str()], ttl);
        old_expiry = unix_now() + ttl.as_secs();
        Recorder::start_configured(
            "client",
            vec![url.clone()],
            &scenario,
            &progress,
            move |s| {
                s.set_token(Some(token));
                s.set_token_source(move || {
                    refreshed.fetch_add(1, Ordering::SeqCst);
                    let token = issuer.mint("carol", &[room.as_str()], Duration::from_secs(3600));
                    async move { Ok::<_, std::io::Error>(token) }
                });
            },
        )
    };
    let stubborn_token = issuer.mint("stu", &[room.as_str()], ttl);
    let stubborn =
        Recorder::start_configured("stubborn", vec![url.clone()], &scenario, &progress, |s| {
            s.set_token(Some(stubborn_token));
        });
    let sender_token = issuer.mint("sam", &[room.as_str()], Duration::from_secs(3600));
    let sender =
        Recorder::start_configured("sender", vec![url.clone()], &scenario, &progress, |s| {
            s.set_token(Some(sender_token));
        });
    client.join(&room, None).await;
    stubborn.join(&room, None).await;
    sender.join(&room, None).await;
    sender
        .send_in_turn(&room, before, "before", async |_, _| {})
        .await;
    progress
        .until(
            "the gateway to close client with 4003 when its token expires",
            || client.position(disconnected_with(Some(4003))).is_some(),
        )
        .await;
    sender
        .send_in_turn(&room, after, "after", async |_, _| {})
        .await;
    client.receive(&room, (before + after) as usize).await;
    assert_as_stored(&client, &room, &history(&stack, &room, 0).await);
    assert!(
        refreshed.load(Ordering::SeqCst) >= 1,
        "the token source gave a fresh token"
    );
    assert_eq!(client.url().await, Some(url), "client is connected again");
    // On the fresh token: once the old one is past its expiry second (a gateway then refuses it
    // at the handshake, and closes a connection that still uses it), the client still has a
    // round trip on its connection, without another 4003 or a refused handshake.
    progress
        .until("the old token to be past its expiry", || {
            unix_now() > old_expiry
        })
        .await;
    let id = client.send_now(&room, "on the fresh token", None).await;
    let ended = |e: &Event| {
        matches!(
            e,
            Event::ConnectFailed { .. } | Event::TokenRefreshFailed { .. }
        ) || disconnected_with(Some(4003))(e)
    };
    progress
        .until(
            "the client's send to be acked, or its connection to end",
            || client.acked(&id, 0).is_some() || client.count(ended) > 1,
        )
        .await;
    assert_eq!(client.count(ended), 1, "only the first token expired");
    assert!(
        client.acked(&id, 0).is_some(),
        "the send on the fresh token is acked"
    );

    progress
        .until("stubborn to stop after 4003", || {
            stubborn.with(|seen| !seen.stops.is_empty())
        })
        .await;
    stubborn.with(|seen| {
        assert!(
            matches!(seen.stops[..], [ClientError::TokenExpired]),
            "stubborn says why it stopped: {:?}",
            seen.stops
        );
    });
    assert_eq!(
        stubborn.stats().await.connections,
        1,
        "stubborn did not reconnect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_expired() {
    let scenario = Scenario::load("history-expired");
    let (stored_count, deleted, after) = (
        scenario.num("stored"),
        scenario.nums("deleted"),
        scenario.num("after"),
    );
    let progress = Progress::new();
    let stack = Stack::start(1).await.expect("the stack starts");
    let g0 = &stack.gateways[0];
    let room = scenario.room();
    let sender = Recorder::start("sender", vec![g0.ws("sender")], &scenario, &progress);
    sender.join(&room, None).await;
    sender
        .send_in_turn(&room, stored_count, "old", async |_, _| {})
        .await;
    // Once the sender has them, the gateway's head is the writer's: nothing old is in flight.
    sender.receive(&room, stored_count as usize).await;
    delete_stored(&stack.table, &room, &deleted).await;

    let client = Recorder::start("client", vec![g0.ws("client")], &scenario, &progress);
    let joined = client.join(&room, Some(Seq(0))).await;
    assert_eq!(
        joined,
        (Seq(stored_count), false),
        "joined live at the head"
    );
    client.with(|seen| {
        let expired: Vec<(&RoomId, Seq, &str)> = seen
            .events
            .iter()
            .filter_map(|e| match e {
                Event::HistoryExpired {
                    room,
                    since,
                    message,
                } => Some((room, *since, message.as_str())),
                _ => None,
            })
            .collect();
        assert!(
            matches!(expired[..], [(r, Seq(0), message)] if *r == room && message.contains("no longer stored")),
            "{expired:?}"
        );
    });
    sender
        .send_in_turn(&room, after, "new", async |_, _| {})
        .await;
    client.receive(&room, after as usize).await;
    // The writer answers 410 for history older than what it holds: read after the deletion.
    let stored = history(&stack, &room, stored_count).await;
    assert_as_stored(&client, &room, &stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync() {
    let scenario = Scenario::load("resync");
    let (lost, before, after) = (
        scenario.num("lostSeq"),
        scenario.num("messagesBefore"),
        scenario.num("messagesAfter"),
    );
    let progress = Progress::new();
    let mut stack = Stack::start(0).await.expect("the stack starts");
    let room = scenario.room();
    let plan = FaultPlan {
        duplicate: 0.0,
        reorder: 0.0,
        drop: 0.0,
        seed: 1,
    };
    let ingress = FaultyIngress::start(plan).await.expect("an SNS ingress");
    let ruled = room.clone();
    ingress.always_drop(Box::new(move |r, seq| r == ruled.as_str() && seq == lost));
    // Lost from the bus and from the store: the gateway can never fill the hole. Only that seq
    // is deleted: a busy publisher may pack later seqs into the same dropped notification, and
    // deleting the room's newest items would take the writer's head back (retention never
    // does), leaving no hole to find.
    let (table, gone) = (stack.table.clone(), room.clone());
    ingress.on_rule_drop(Box::new(move || {
        let (table, gone) = (table.clone(), gone.clone());
        Box::pin(async move { delete_stored(&table, &gone, &[lost]).await })
    }));
    stack
        .add_gateway_with(&["--public-url", &ingress.url], |g| {
            ingress.forward_to(format!("{}/sns", g.http()));
        })
        .await
        .expect("gateway-0 behind the ingress");
    stack.add_gateway(&[]).await.expect("gateway-1");
    let (g0, g1) = (&stack.gateways[0], &stack.gateways[1]);
    let client = Recorder::start(
        "client",
        vec![g0.ws("client"), g1.ws("client")],
        &scenario,
        &progress,
    );
    let sender = Recorder::start("sender", vec![g1.ws("sender")], &scenario, &progress);
    client.join(&room, None).await;
    sender.join(&room, None).await;
    sender
        .send_in_turn(&room, before, "before", async |_, _| {})
        .await;
    let rejoined_live =
        |e: &Event| matches!(e, Event::Joined { resumed: false, seq, .. } if seq.0 > 0);
    progress
        .until(
            "client to be closed with 4002, told of the lost history and re-joined live",
            || {
                client.position(disconnected_with(Some(4002))).is_some()
                    && client.position(rejoined_live).is_some()
            },
        )
        .await;
    let rejoined_at = client.with(|seen| {
        seen.events.iter().find_map(|e| match e {
            Event::Joined {
                resumed: false,
                seq,
                ..
            } if seq.0 > 0 => Some(seq.0),
            _ => None,
        })
    });
    let rejoined_at = rejoined_at.expect("found above");
    sender
        .send_in_turn(&room, after, "after", async |_, _| {})
        .await;
    let head = before + after;
    progress
        .until(format!("client to receive up to seq {head}"), || {
            client.seqs(&room).last() == Some(&head)
        })
        .await;
    let expired: Vec<Seq> = client.with(|seen| {
        seen.events
            .iter()
            .filter_map(|e| match e {
                Event::HistoryExpired { since, .. } => Some(*since),
                _ => None,
            })
            .collect()
    });
    let [since] = expired[..] else {
        panic!("one HistoryExpired: {expired:?}");
    };
    assert!(since.0 < lost, "resumed from before the lost seq ({since})");
    let seqs = client.seqs(&room);
    let (older, newer): (Vec<u64>, Vec<u64>) = seqs.iter().partition(|s| **s <= since.0);
    assert_eq!(
        older,
        (1..=older.len() as u64).collect::<Vec<_>>(),
        "before the hole: 1, 2, … once each"
    );
    assert_eq!(
        newer,
        (rejoined_at + 1..=head).collect::<Vec<_>>(),
        "after the re-join: every seq after the joined seq once, in order"
    );
    assert!(
        ingress.stats().dropped_by_rule.load(Ordering::Relaxed) > 0,
        "the notification was dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_codes() {
    let scenario = Scenario::load("resume-codes");
    let (codes, per_round, terminal) = (
        scenario.nums("codes"),
        scenario.num("messagesPerRound"),
        u16::try_from(scenario.num("terminalCode")).expect("a close code"),
    );
    let progress = Progress::new();
    let stack = Stack::start(1).await.expect("the stack starts");
    let g0 = &stack.gateways[0];
    let proxy = TcpProxy::start(g0.addr, ProxyOptions::default())
        .await
        .expect("a proxy");
    let room = scenario.room();
    let client = Recorder::start("client", vec![proxy.ws("client")], &scenario, &progress);
    let sender = Recorder::start("sender", vec![g0.ws("sender")], &scenario, &progress);
    client.join(&room, None).await;
    sender.join(&room, None).await;
    let mut sent = 0;
    for code in codes {
        let code = u16::try_from(code).expect("a close code");
        sender
            .send_in_turn(&room, per_round, &format!("before {code}"), async |_, _| {})
            .await;
        sent += per_round as usize;
        client.receive(&room, sent).await;
        let is_joined = |e: &Event| matches!(e, Event::Joined { .. });
        let (connections, joins) = (
            client.count(|e| matches!(e, Event::Connected { .. })),
            client.count(is_joined),
        );
        proxy.close_with(code);
        progress
            .until(
                format!("client to reconnect and re-join after {code}"),
                || {
                    client.count(|e| matches!(e, Event::Connected { .. })) > connections
                        && client.count(is_joined) > joins
                },
            )
            .await;
        assert!(
            client.position(disconnected_with(Some(code))).is_some(),
            "client saw {code}"
        );
    }
    sender
        .send_in_turn(&room, per_round, "last round", async |_, _| {})
        .await;
    sent += per_round as usize;
    client.receive(&room, sent).await;
    assert_as_stored(&client, &room, &history(&stack, &room, 0).await);

    proxy.close_with(terminal);
    progress
        .until(format!("client to stop after {terminal}"), || {
            client.with(|seen| !seen.stops.is_empty())
        })
        .await;
    // Asked again, it says the same and stays away, while a message goes round.
    let connections = proxy.connections();
    client.command(Command::PollAgain);
    progress
        .until("client to answer once more", || {
            client.with(|seen| seen.stops.len() >= 2)
        })
        .await;
    sender
        .send_in_turn(&room, 1, "after the stop", async |_, _| {})
        .await;
    sender.receive(&room, sent + 1).await;
    client.with(|seen| {
        assert!(
            seen.stops
                .iter()
                .all(|e| matches!(e, ClientError::Closed { code, .. } if *code == terminal)),
            "client is disconnected with an error naming {terminal}: {:?}",
            seen.stops
        );
    });
    assert_eq!(
        proxy.connections(),
        connections,
        "no reconnect after {terminal}"
    );
    assert_eq!(client.url().await, None);
}

#[tokio::test]
async fn scrollback() {
    let scenario = Scenario::load("scrollback");
    let messages = scenario.num("messages");
    let limit = PageLimit::new(u32::try_from(scenario.num("limit")).expect("a limit"))
        .expect("a page limit");
    let progress = Progress::new();
    let stack = Stack::start(1).await.expect("the stack starts");
    let g0 = &stack.gateways[0];
    let proxy = TcpProxy::start(g0.addr, ProxyOptions::default())
        .await
        .expect("a proxy");
    let room = scenario.room();
    let sender = Recorder::start("sender", vec![g0.ws("sender")], &scenario, &progress);
    sender.join(&room, None).await;
    sender
        .send_in_turn(&room, messages, "scroll", async |_, _| {})
        .await;
    let stored = history(&stack, &room, 0).await;
    assert_eq!(stored.len() as u64, messages);

    let reader = Recorder::start("reader", vec![proxy.ws("reader")], &scenario, &progress);
    let newest = reader.ask_history(&room, None, limit).await;
    let mut pages = vec![(None, reader.page(&newest).await)];

    // The next request is held by the proxy, then its connection cut: the client asks again.
    progress
        .until("reader to be connected", || {
            reader.count(|e| matches!(e, Event::Connected { .. })) == 1
        })
        .await;
    proxy.pause();
    let before = Seq(pages[0].1[0].0);
    let held = reader.ask_history(&room, Some(before), limit).await;
    proxy.cut();
    proxy.resume();
    pages.push((Some(before), reader.page(&held).await));
    assert!(
        reader.count(|e| matches!(e, Event::Connected { .. })) >= 2,
        "the held request was answered on a new connection"
    );

    while let Some(first) = pages.last().and_then(|(_, page)| page.first()) {
        let before = Seq(first.0);
        let id = reader.ask_history(&room, Some(before), limit).await;
        pages.push((Some(before), reader.page(&id).await));
    }
    for (before, page) in &pages {
        let seqs: Vec<u64> = page.iter().map(|m| m.0).collect();
        assert!(
            seqs.len() <= limit.get() as usize,
            "at most {limit:?}: {seqs:?}"
        );
        let end = before.map_or(messages, |b| b.0 - 1);
        let expected: Vec<u64> = (end + 1 - seqs.len() as u64..=end).collect();
        assert_eq!(seqs, expected, "consecutive, ending below {before:?}");
    }
    let all: Vec<(u64, String, String)> = pages
        .iter()
        .rev()
        .flat_map(|(_, page)| {
            page.iter()
                .map(|(seq, id, _, body)| (*seq, id.clone(), body.clone()))
        })
        .collect();
    assert_eq!(all, stored, "the pages together are what the writer stored");
    assert!(
        pages
            .iter()
            .flat_map(|(_, page)| page)
            .all(|(_, _, sender, _)| sender == "sender"),
        "each message names its sender"
    );
    assert_eq!(
        reader.count(|e| matches!(e, Event::Message(_))),
        0,
        "no message events"
    );
    assert_eq!(
        reader.count(|e| matches!(e, Event::Joined { .. })),
        0,
        "joins nothing"
    );
}
