// The client's rules on a scripted socket, for what a correct gateway never does (holes,
// out-of-order frames) and for limits that need no stack (the bounded send queue, validation).
import { test } from "node:test";
import assert from "node:assert/strict";
import { ChorusClient } from "../dist/index.js";

/** A WebSocket whose gateway side the test plays. */
class ScriptedSocket {
  static instances = [];
  readyState = 0;
  onopen = null;
  onmessage = null;
  onclose = null;
  onerror = null;
  sent = [];

  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    ScriptedSocket.instances.push(this);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close() {
    this.readyState = 3;
  }
  // The gateway's side:
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  frame(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  closeWith(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
}

function client(options = {}) {
  ScriptedSocket.instances = [];
  const c = new ChorusClient({
    urls: ["ws://a.test/ws", "ws://b.test/ws"],
    user: "tester",
    WebSocket: ScriptedSocket,
    reconnect: { initialDelayMs: 1, maxDelayMs: 4 },
    ...options,
  });
  const seen = [];
  c.on("message", (m) => seen.push(m.seq));
  return { c, seen };
}

const message = (room, seq) => ({ type: "message", room, seq, id: `m${seq}`, sender: "x", body: `b${seq}`, ts: "2026-11-29T10:00:00.000Z" });
const socket = (n) => ScriptedSocket.instances[n];
const nextSocket = async (n) => {
  for (let i = 0; i < 1000 && !ScriptedSocket.instances[n]; i++) await new Promise((r) => setTimeout(r, 1));
  assert.ok(ScriptedSocket.instances[n], `connection attempt ${n} was made`);
  return ScriptedSocket.instances[n];
};

test("a duplicate is dropped and a hole is never delivered: the room is re-joined from its position", async () => {
  const { c, seen } = client();
  c.connect();
  const joined = c.join("lobby");
  const ws = socket(0);
  ws.open();
  assert.deepEqual(ws.sent, [{ type: "join", room: "lobby" }]);
  ws.frame({ type: "joined", room: "lobby", seq: 4 });
  assert.deepEqual(await joined, { room: "lobby", seq: 4, resumed: false });
  ws.frame(message("lobby", 5));
  ws.frame(message("lobby", 5)); // duplicate
  ws.frame(message("lobby", 7)); // hole at 6
  ws.frame(message("lobby", 8));
  assert.deepEqual(seen, [5]);
  assert.deepEqual(ws.sent.at(-1), { type: "join", room: "lobby", since: 5 }, "re-joined from the position");
  ws.frame(message("lobby", 6)); // the replay
  ws.frame(message("lobby", 7));
  ws.frame({ type: "joined", room: "lobby", seq: 7 });
  ws.frame(message("lobby", 8));
  assert.deepEqual(seen, [5, 6, 7, 8]);
  assert.equal(c.stats.duplicatesDropped, 1);
  assert.equal(c.stats.gapsResynced, 1);
  c.close();
});

test("the resume position is the highest of the last message and the latest joined seq", async () => {
  const { c } = client();
  c.connect();
  void c.join("quiet");
  void c.join("busy");
  let ws = socket(0);
  ws.open();
  ws.frame({ type: "joined", room: "quiet", seq: 9 }); // no message yet: the joined seq counts
  ws.frame({ type: "joined", room: "busy", seq: 2 });
  ws.frame(message("busy", 3));
  ws.closeWith(4000, "draining");
  ws = await nextSocket(1);
  assert.equal(ws.url, "ws://b.test/ws?user=tester", "the next gateway");
  ws.open();
  assert.deepEqual(ws.sent, [{ type: "join", room: "quiet", since: 9 }], "one join in flight at a time");
  ws.frame({ type: "joined", room: "quiet", seq: 9 });
  assert.deepEqual(ws.sent.at(-1), { type: "join", room: "busy", since: 3 });
  c.close();
});

test("an unacked send goes again with the same id after a reconnect, once its room is joined", async () => {
  const { c } = client();
  c.connect();
  void c.join("lobby");
  let ws = socket(0);
  ws.open();
  ws.frame({ type: "joined", room: "lobby", seq: 0 });
  const acked = c.send("lobby", "hello", { id: "hello-1" });
  assert.deepEqual(ws.sent.at(-1), { type: "send", room: "lobby", id: "hello-1", body: "hello" });
  ws.closeWith(1006);
  ws = await nextSocket(1);
  ws.open();
  assert.deepEqual(ws.sent, [{ type: "join", room: "lobby", since: 0 }], "no send before the join is answered");
  ws.frame({ type: "joined", room: "lobby", seq: 1 });
  assert.deepEqual(ws.sent.at(-1), { type: "send", room: "lobby", id: "hello-1", body: "hello" });
  ws.frame({ type: "ack", id: "hello-1", room: "lobby", seq: 1 });
  ws.frame({ type: "ack", id: "hello-1", room: "lobby", seq: 1 }); // again: answers nothing
  assert.deepEqual(await acked, { id: "hello-1", room: "lobby", seq: 1 });
  assert.equal(c.stats.strayAcks, 1);
  assert.equal(c.stats.sendRetries, 1);
  c.close();
});

test("the send queue is bounded: one more send is refused with queue_full, the others stay", async () => {
  const { c } = client({ maxPendingSends: 3 });
  void c.join("lobby").catch(() => {});
  const waiting = [1, 2, 3].map((i) => c.send("lobby", `m${i}`));
  for (const p of waiting) p.catch(() => {});
  await assert.rejects(c.send("lobby", "one too many"), (e) => e.code === "queue_full" && /3 sends are waiting/.test(e.message));
  assert.equal(c.pendingSends, 3);
  c.close();
  for (const p of waiting) await assert.rejects(p, (e) => e.code === "closed");
  assert.equal(c.pendingSends, 0);
});

test("bad input is refused before anything is sent", async () => {
  const { c } = client();
  await assert.rejects(c.join("no spaces"), (e) => e.code === "invalid");
  await assert.rejects(c.send("lobby", "hi"), (e) => e.code === "not_joined");
  void c.join("lobby").catch(() => {});
  await assert.rejects(c.send("lobby", ""), (e) => e.code === "invalid");
  await assert.rejects(c.send("lobby", "é".repeat(8193)), (e) => e.code === "invalid" && /16386 bytes/.test(e.message));
  await assert.rejects(c.send("lobby", "hi", { id: "no/slash" }), (e) => e.code === "invalid");
  assert.throws(() => new ChorusClient({ urls: [], WebSocket: ScriptedSocket }), /at least one gateway URL/);
  c.close();
});

test("a token travels as a subprotocol, never in the URL; 4003 asks getToken for a fresh one", async () => {
  const tokens = ["fresh.token.1"];
  const { c } = client({ token: "first.token.0", getToken: async () => tokens.shift() });
  c.connect();
  let ws = socket(0);
  assert.equal(ws.url, "ws://a.test/ws");
  assert.deepEqual(ws.protocols, ["chorus.v1", "bearer.first.token.0"]);
  ws.open();
  ws.closeWith(4003, "token expired");
  ws = await nextSocket(1);
  assert.deepEqual(ws.protocols, ["chorus.v1", "bearer.fresh.token.1"]);
  c.close();
});

test("the backoff grows while attempts fail, stays jittered and capped, and starts over once joined", async () => {
  const { c } = client({ reconnect: { initialDelayMs: 8, maxDelayMs: 32 } });
  const delays = [];
  c.on("state", (s) => s.delayMs !== undefined && delays.push(s.delayMs));
  c.connect();
  void c.join("lobby").catch(() => {});
  for (let n = 0; n < 5; n++) (await nextSocket(n)).closeWith(1006);
  // Failure n waits within [d/2, d], d = min(32, 8·2^(n-1)).
  const ceilings = [8, 16, 32, 32, 32];
  delays.forEach((ms, i) => assert.ok(ms >= ceilings[i] / 2 && ms <= ceilings[i], `failure ${i + 1}: ${ms} ms`));
  const ws = await nextSocket(5);
  ws.open();
  ws.frame({ type: "joined", room: "lobby", seq: 0 });
  ws.closeWith(4000);
  assert.ok(delays[5] >= 4 && delays[5] <= 8, `after a healthy connection the backoff starts over: ${delays[5]} ms`);
  c.close();
});

test("4500 and above stop the client; it says why and rejects what waited", async () => {
  const { c } = client();
  const errors = [];
  c.on("error", (e) => errors.push([e.code, e.closeCode]));
  c.connect();
  const joined = c.join("lobby");
  socket(0).open();
  socket(0).closeWith(4500, "protocol violation");
  await assert.rejects(joined, (e) => e.code === "disconnected");
  assert.equal(c.state, "disconnected");
  assert.deepEqual(errors, [["disconnected", 4500]]);
  // Absence has no signal: wait five backoff ceilings (4 ms each); a reconnect would be due by then.
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(ScriptedSocket.instances.length, 1, "no reconnect");
});

test("history asks with an id, resolves with the page, retries when unavailable and after a reconnect", async () => {
  const { c } = client({ idPrefix: "t" });
  c.connect();
  await nextSocket(0);
  socket(0).open();
  const first = c.history("lobby", { limit: 2 });
  const request = socket(0).sent.at(-1);
  assert.deepEqual(request, { type: "history", room: "lobby", id: "t-h1", limit: 2 });
  socket(0).frame({ type: "history", room: "lobby", id: "t-h1", messages: [message("lobby", 7), message("lobby", 8)] });
  assert.deepEqual((await first).map((m) => m.seq), [7, 8]);

  // unavailable: asked again after a backoff, same id.
  const second = c.history("lobby", { before: 7, limit: 2 });
  assert.deepEqual(socket(0).sent.at(-1), { type: "history", room: "lobby", id: "t-h2", before: 7, limit: 2 });
  socket(0).frame({ type: "error", code: "unavailable", message: "try again", ref: "t-h2", room: "lobby" });
  for (let i = 0; i < 1000 && socket(0).sent.filter((f) => f.id === "t-h2").length < 2; i++) await new Promise((r) => setTimeout(r, 1));
  assert.equal(socket(0).sent.filter((f) => f.id === "t-h2").length, 2, "asked again");

  // The connection drops before the answer: asked again on the next one.
  socket(0).closeWith(4000);
  await nextSocket(1);
  socket(1).open();
  for (let i = 0; i < 1000 && !socket(1).sent.some((f) => f.id === "t-h2"); i++) await new Promise((r) => setTimeout(r, 1));
  assert.deepEqual(socket(1).sent.find((f) => f.id === "t-h2"), { type: "history", room: "lobby", id: "t-h2", before: 7, limit: 2 });
  socket(1).frame({ type: "history", room: "lobby", id: "t-h2", messages: [message("lobby", 5), message("lobby", 6)] });
  // A duplicated answer is ignored.
  socket(1).frame({ type: "history", room: "lobby", id: "t-h2", messages: [] });
  assert.deepEqual((await second).map((m) => m.seq), [5, 6]);

  // Refused for good: rejected with the gateway's code.
  const third = c.history("admin");
  socket(1).frame({ type: "error", code: "forbidden", message: "your token does not allow room admin", ref: "t-h3", room: "admin" });
  await assert.rejects(third, (e) => e.code === "forbidden" && e.room === "admin" && e.ref === "t-h3");
  c.close();
});

test("history refuses bad arguments and more than 16 waiting requests, before sending anything", async () => {
  const { c } = client();
  for (const [room, options] of [
    ["no spaces", {}],
    ["lobby", { before: 0 }],
    ["lobby", { before: 1.5 }],
    ["lobby", { limit: 0 }],
    ["lobby", { limit: 101 }],
  ]) {
    await assert.rejects(c.history(room, options), (e) => e.code === "invalid", JSON.stringify([room, options]));
  }
  const waiting = Array.from({ length: 16 }, () => c.history("lobby"));
  await assert.rejects(c.history("lobby"), (e) => e.code === "queue_full");
  c.close();
  for (const request of waiting) await assert.rejects(request, (e) => e.code === "closed");
});
