// The conformance scenarios of clients/conformance/scenarios.json, run for the TypeScript client
// against the real local stack (see harness.mjs). Each scenario's params come from the JSON; a
// runner below implements its steps and checks its expectations: every message once, in order,
// equal to what the writer stored.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import WebSocket from "ws";
import { ChorusClient } from "../dist/index.js";
import { Stack, TcpProxy, SnsIngress, progress } from "./harness.mjs";

const SUITE = JSON.parse(readFileSync(new URL("../../conformance/scenarios.json", import.meta.url), "utf8"));

// Node 20 has no global WebSocket: the tests use the ws package, unless CHORUS_TEST_WEBSOCKET=global
// (Node ≥ 22) asks for the platform's.
const WebSocketImpl = process.env.CHORUS_TEST_WEBSOCKET === "global" ? globalThis.WebSocket : WebSocket;
assert.ok(WebSocketImpl, "no WebSocket constructor: unset CHORUS_TEST_WEBSOCKET or use Node ≥ 22");

let roomCounter = 0;
function roomName(id) {
  roomCounter += 1;
  return `${id}-${Date.now().toString(36)}-${roomCounter}`;
}

/** A client and everything it reported, in order. Every event counts as progress. */
class Recorder {
  constructor(name, urls, options = {}) {
    this.name = name;
    this.events = [];
    this.client = new ChorusClient({
      urls,
      user: options.token === undefined ? name : undefined,
      WebSocket: WebSocketImpl,
      reconnect: SUITE.defaults.backoff,
      requestTimeoutMs: SUITE.defaults.requestTimeoutMs,
      ...options,
    });
    for (const event of ["message", "state", "joined", "left", "historyExpired", "error"]) {
      this.client.on(event, (payload) => {
        this.events.push({ event, payload });
        progress.bump();
      });
    }
    this.client.connect();
  }

  messages(room) {
    return this.events.filter((e) => e.event === "message" && e.payload.room === room).map((e) => e.payload);
  }

  seqs(room) {
    return this.messages(room).map((m) => m.seq);
  }

  of(event) {
    return this.events.filter((e) => e.event === event).map((e) => e.payload);
  }

  /** Waits until this client has received `count` messages of `room`. */
  receive(room, count) {
    return progress.until(() => this.messages(room).length >= count, `${this.name} to receive ${count} messages of ${room} (has ${this.messages(room).length})`);
  }

  join(room, options) {
    return progress.settle(this.client.join(room, options), `${this.name} to join ${room}`);
  }

  send(room, body, options) {
    return progress.settle(this.client.send(room, body, options), `the ack of ${this.name}'s ${JSON.stringify(body)}`);
  }

  close() {
    this.client.close();
  }
}

/** Sends `count` messages one after another; `onAck(n, ack)` after each. */
async function sendInTurn(recorder, room, count, prefix, onAck = () => {}) {
  const acks = [];
  for (let i = 1; i <= count; i++) {
    const ack = await recorder.send(room, `${prefix} ${i}`);
    acks.push(ack);
    await onAck(i, ack);
  }
  return acks;
}

/** The client got exactly what the writer stored for the room: each message once, in order. */
function assertAsStored(recorder, room, stored) {
  assert.deepEqual(
    recorder.messages(room).map((m) => [m.seq, m.id, m.body]),
    stored.map((m) => [m.seq, m.id, m.body]),
    `${recorder.name} got every stored message of ${room} once, in order`,
  );
}

function assertEachIdStoredOnce(stored) {
  const ids = stored.map((m) => `${m.sender}/${m.id}`);
  assert.equal(new Set(ids).size, ids.length, `each client message id is stored once: ${ids}`);
  assert.deepEqual(stored.map((m) => m.seq), stored.map((_, i) => i + 1), "seqs are dense from 1");
}

/**
 * A way to gateway-1 that holds the receiver's reconnection (a paused proxy) until the room has
 * moved on without it: only a resume with `since` then gets what it missed.
 */
async function heldGate(gateway, defer) {
  const gate = await TcpProxy.start(gateway.addr);
  gate.pause();
  defer(() => gate.close());
  return gate;
}

/** Opens the gate once the sender (on gateway-1) has received `awayFor` messages after the fault. */
async function openGateWhenAhead(gate, sender, room, acked, p) {
  if (acked === p.faultAfterAcks + p.awayFor) {
    await sender.receive(room, acked);
    gate.resume();
  }
}

/** Runs `body` with a fresh stack, closing clients and stopping the stack whatever happens. */
async function withStack(options, body) {
  const stack = await Stack.start(options);
  const cleanups = [];
  try {
    await body(stack, (cleanup) => cleanups.push(cleanup));
  } finally {
    for (const cleanup of cleanups.reverse()) await cleanup();
    await stack.stop();
  }
}

const RUNNERS = {
  async drain(p) {
    await withStack({ gateways: 2 }, async (stack, defer) => {
      const [g0, g1] = stack.gateways;
      const room = roomName("drain");
      const gate = await heldGate(g1, defer);
      const receiver = new Recorder("receiver", [g0.ws(), gate.ws()]);
      const sender = new Recorder("sender", [g1.ws()]);
      defer(() => receiver.close());
      defer(() => sender.close());
      await receiver.join(room);
      await sender.join(room);
      let drained;
      await sendInTurn(sender, room, p.messages, "drain", async (n) => {
        if (n === p.faultAfterAcks) drained = g0.terminate();
        await openGateWhenAhead(gate, sender, room, n, p);
      });
      await progress.settle(drained, "gateway-0 to finish draining");
      await receiver.receive(room, p.messages);
      const stored = await stack.history(room);
      assert.equal(stored.length, p.messages);
      assertAsStored(receiver, room, stored);
      assert.ok(
        receiver.of("state").some((s) => s.state === "connecting" && s.code === 4000),
        "the receiver was closed with 4000 and reconnected",
      );
      assert.equal(receiver.client.url, gate.ws(), "the receiver moved to gateway-1");
    });
  },

  async kill(p) {
    await withStack({ gateways: 2 }, async (stack, defer) => {
      const [g0, g1] = stack.gateways;
      const room = roomName("kill");
      const gate = await heldGate(g1, defer);
      const receiver = new Recorder("receiver", [g0.ws(), gate.ws()]);
      const sender = new Recorder("sender", [g1.ws()]);
      defer(() => receiver.close());
      defer(() => sender.close());
      await receiver.join(room);
      await sender.join(room);
      let janitor;
      await sendInTurn(sender, room, p.messages, "kill", async (n) => {
        if (n === p.faultAfterAcks) {
          await g0.kill();
          // Its subscription is dead: the janitor removes it, as an operator's timer would.
          janitor = stack.pruneSubscriptions();
        }
        await openGateWhenAhead(gate, sender, room, n, p);
      });
      await progress.settle(janitor, "the janitor to remove the dead subscription");
      await receiver.receive(room, p.messages);
      const stored = await stack.history(room);
      assert.equal(stored.length, p.messages);
      assertAsStored(receiver, room, stored);
      assert.ok(
        receiver.of("state").some((s) => s.state === "connecting" && s.code === 1006),
        "the receiver saw its connection drop (1006) and reconnected",
      );
      assert.equal(receiver.client.url, gate.ws());
    });
  },

  async "slow-network"(p) {
    await withStack({ gateways: 2 }, async (stack, defer) => {
      const [g0, g1] = stack.gateways;
      const proxy = await TcpProxy.start(g0.addr, { delayMs: p.delayMs });
      defer(() => proxy.close());
      const room = roomName("slow");
      const client = new Recorder("client", [proxy.ws(), g1.ws()], { requestTimeoutMs: p.requestTimeoutMs });
      const other = new Recorder("other", [g1.ws()]);
      defer(() => client.close());
      defer(() => other.close());
      await client.join(room);
      await other.join(room);
      await Promise.all([
        sendInTurn(client, room, p.messagesPerClient, "client", (n) => {
          if (n === p.pauseAfterAcks) proxy.pause();
        }),
        sendInTurn(other, room, p.messagesPerClient, "other"),
      ]);
      const total = 2 * p.messagesPerClient;
      await client.receive(room, total);
      await other.receive(room, total);
      const stored = await stack.history(room);
      assert.equal(stored.length, total);
      assertEachIdStoredOnce(stored);
      assertAsStored(client, room, stored);
      assertAsStored(other, room, stored);
      assert.equal(client.client.url, g1.ws(), "the client left the silent connection for gateway-1");
      assert.ok(client.client.stats.sendRetries >= 1, "the send that met the silence was sent again");
    });
  },

  async "reconnect-mid-send"(p) {
    await withStack({ gateways: 2 }, async (stack, defer) => {
      const [g0, g1] = stack.gateways;
      const proxy = await TcpProxy.start(g0.addr);
      defer(() => proxy.close());
      const room = roomName("midsend");
      const client = new Recorder("client", [proxy.ws(), g1.ws()]);
      const receiver = new Recorder("receiver", [g1.ws()]);
      defer(() => client.close());
      defer(() => receiver.close());
      await client.join(room);
      await receiver.join(room);
      let acked = 0;
      const sends = [];
      for (let i = 1; i <= p.messages; i++) {
        sends.push(
          client.client.send(room, `burst ${i}`).then((ack) => {
            acked += 1;
            if (acked === p.cutAfterAcks) proxy.cut();
            return ack;
          }),
        );
      }
      const acks = await progress.settle(Promise.all(sends), `acks of all ${p.messages} sends`);
      assert.equal(new Set(acks.map((a) => a.seq)).size, p.messages, "every ack has its own seq");
      assert.ok(client.client.stats.sendRetries >= 1, "unacked sends were sent again after the cut");
      await client.receive(room, p.messages);
      await receiver.receive(room, p.messages);
      const stored = await stack.history(room);
      assert.equal(stored.length, p.messages, "each send stored once");
      assertEachIdStoredOnce(stored);
      assertAsStored(client, room, stored);
      assertAsStored(receiver, room, stored);
      assert.deepEqual(
        acks.map((a) => a.seq).sort((a, b) => a - b),
        stored.map((m) => m.seq),
        "the acks name the stored seqs",
      );
    });
  },

  async "duplicate-ack"(p) {
    await withStack({ gateways: 1 }, async (stack, defer) => {
      const [g0] = stack.gateways;
      const proxy = await TcpProxy.start(g0.addr, { duplicateServerFrames: true });
      defer(() => proxy.close());
      const room = roomName("dup");
      const client = new Recorder("client", [proxy.ws()]);
      const receiver = new Recorder("receiver", [g0.ws()]);
      defer(() => client.close());
      defer(() => receiver.close());
      await client.join(room);
      await receiver.join(room);
      const acks = await sendInTurn(client, room, p.messages, "dup");
      assert.deepEqual(acks.map((a) => a.seq), acks.map((_, i) => i + 1));
      const id = `again-${Date.now()}`;
      const first = await client.send(room, "said twice", { id });
      const second = await client.send(room, "said twice", { id });
      assert.equal(second.seq, first.seq, "a repeated id is acked with the first seq");
      const total = p.messages + 1;
      await client.receive(room, total);
      await receiver.receive(room, total);
      const stored = await stack.history(room);
      assert.equal(stored.length, total, "the repeated send is stored once");
      assertAsStored(client, room, stored);
      assertAsStored(receiver, room, stored);
      const stats = client.client.stats;
      assert.ok(proxy.duplicated >= 2 * total, `the proxy duplicated frames (${proxy.duplicated})`);
      assert.ok(stats.duplicatesDropped >= total, `duplicate messages were dropped (${stats.duplicatesDropped})`);
      assert.ok(stats.strayAcks >= total, `duplicate acks answered nothing (${stats.strayAcks})`);
      assert.equal(client.of("joined").length, 1, "one joined event for one join");
    });
  },

  async "token-expiry"(p) {
    await withStack({ gateways: 0 }, async (stack, defer) => {
      const g0 = await stack.addGateway([...stack.jwtFlags(), "--ping-interval-ms", "200", "--idle-timeout-ms", "10000"]);
      const room = roomName("token");
      let refreshed = 0;
      const client = new Recorder("client", [g0.ws()], {
        token: stack.mintToken("carol", [room], p.tokenTtlSecs),
        getToken: async () => {
          refreshed += 1;
          return stack.mintToken("carol", [room], 3600);
        },
      });
      const stubborn = new Recorder("stubborn", [g0.ws()], { token: stack.mintToken("stu", [room], p.tokenTtlSecs) });
      const sender = new Recorder("sender", [g0.ws()], { token: stack.mintToken("sam", [room], 3600) });
      defer(() => client.close());
      defer(() => stubborn.close());
      defer(() => sender.close());
      await client.join(room);
      await stubborn.join(room);
      await sender.join(room);
      await sendInTurn(sender, room, p.messagesBefore, "before");
      await progress.until(
        () => client.of("state").some((s) => s.code === 4003),
        "the gateway to close client with 4003 when its token expires",
      );
      await sendInTurn(sender, room, p.messagesAfter, "after");
      const total = p.messagesBefore + p.messagesAfter;
      await client.receive(room, total);
      const stored = await stack.history(room);
      assertAsStored(client, room, stored);
      assert.ok(refreshed >= 1, "getToken gave a fresh token");
      assert.equal(client.client.state, "connected");
      await progress.until(() => stubborn.client.state === "disconnected", "stubborn to stop after 4003");
      assert.deepEqual(
        stubborn.of("error").map((e) => [e.code, e.closeCode]),
        [["token_expired", 4003]],
        "stubborn says why it stopped",
      );
      assert.equal(stubborn.client.stats.connections, 1, "stubborn did not reconnect");
    });
  },

  async "history-expired"(p) {
    await withStack({ gateways: 1 }, async (stack, defer) => {
      const [g0] = stack.gateways;
      const room = roomName("expired");
      const sender = new Recorder("sender", [g0.ws()]);
      defer(() => sender.close());
      await sender.join(room);
      await sendInTurn(sender, room, p.stored, "old");
      // Once the sender has them, the gateway's head is the writer's: nothing old is in flight.
      await sender.receive(room, p.stored);
      await stack.deleteStored(room, p.deleted);
      const client = new Recorder("client", [g0.ws()]);
      defer(() => client.close());
      const joined = await client.join(room, { since: 0 });
      assert.deepEqual(joined, { room, seq: p.stored, resumed: false }, "joined live at the head");
      const expired = client.of("historyExpired");
      assert.equal(expired.length, 1);
      assert.equal(expired[0].room, room);
      assert.equal(expired[0].since, 0);
      assert.match(expired[0].message, /no longer stored/);
      await sendInTurn(sender, room, p.after, "new");
      await client.receive(room, p.after);
      // The writer answers 410 for history older than what it holds: read after the deletion.
      const stored = await stack.history(room, p.stored);
      assertAsStored(client, room, stored);
    });
  },

  async resync(p) {
    await withStack({ gateways: 0 }, async (stack, defer) => {
      const ingress = await SnsIngress.start();
      defer(() => ingress.close());
      const room = roomName("resync");
      ingress.drop = (events) => events.some((e) => e.room === room && e.seq === p.lostSeq);
      // Lost from the bus and from the store: the gateway can never fill the hole. Only that seq
      // is deleted: a busy publisher may pack later seqs into the same dropped notification, and
      // deleting the room's newest items would take the writer's head back (retention never
      // does), leaving no hole to find.
      ingress.onDrop = () => stack.deleteStored(room, [p.lostSeq]);
      const g0 = await stack.addGateway(["--public-url", ingress.url]);
      ingress.target = g0.http;
      const g1 = await stack.addGateway();
      const client = new Recorder("client", [g0.ws(), g1.ws()]);
      const sender = new Recorder("sender", [g1.ws()]);
      defer(() => client.close());
      defer(() => sender.close());
      await client.join(room);
      await sender.join(room);
      await sendInTurn(sender, room, p.messagesBefore, "before");
      await progress.until(
        () => client.of("state").some((s) => s.code === 4002) && client.of("joined").some((j) => !j.resumed && j.seq > 0),
        "client to be closed with 4002, told of the lost history and re-joined live",
      );
      const rejoinedAt = client.of("joined").find((j) => !j.resumed && j.seq > 0).seq;
      await sendInTurn(sender, room, p.messagesAfter, "after");
      const head = p.messagesBefore + p.messagesAfter;
      await progress.until(
        () => client.seqs(room).at(-1) === head,
        `client to receive up to seq ${head} (has ${client.seqs(room)})`,
      );
      const expired = client.of("historyExpired");
      assert.equal(expired.length, 1, "one historyExpired");
      const seqs = client.seqs(room);
      const before = seqs.filter((s) => s <= expired[0].since);
      const after = seqs.filter((s) => s > expired[0].since);
      assert.ok(expired[0].since < p.lostSeq, `resumed from before the lost seq (${expired[0].since})`);
      assert.deepEqual(before, before.map((_, i) => i + 1), "before the hole: 1, 2, … once each");
      assert.deepEqual(
        after,
        Array.from({ length: head - rejoinedAt }, (_, i) => rejoinedAt + 1 + i),
        "after the re-join: every seq after the joined seq once, in order",
      );
      assert.ok(ingress.dropped.some((e) => e.seq === p.lostSeq), "the notification was dropped");
    });
  },

  async "resume-codes"(p) {
    await withStack({ gateways: 1 }, async (stack, defer) => {
      const [g0] = stack.gateways;
      const proxy = await TcpProxy.start(g0.addr);
      defer(() => proxy.close());
      const room = roomName("codes");
      const client = new Recorder("client", [proxy.ws()]);
      const sender = new Recorder("sender", [g0.ws()]);
      defer(() => client.close());
      defer(() => sender.close());
      await client.join(room);
      await sender.join(room);
      let sent = 0;
      for (const code of p.codes) {
        await sendInTurn(sender, room, p.messagesPerRound, `before ${code}`);
        sent += p.messagesPerRound;
        await client.receive(room, sent);
        const connections = client.client.stats.connections;
        proxy.closeWith(code);
        await progress.until(
          () => client.client.stats.connections > connections && client.of("joined").length > connections,
          `client to reconnect and re-join after ${code}`,
        );
        assert.ok(client.of("state").some((s) => s.code === code), `client saw ${code}`);
      }
      await sendInTurn(sender, room, p.messagesPerRound, "last round");
      sent += p.messagesPerRound;
      await client.receive(room, sent);
      assertAsStored(client, room, await stack.history(room));

      proxy.closeWith(p.terminalCode);
      await progress.until(() => client.client.state === "disconnected", `client to stop after ${p.terminalCode}`);
      assert.deepEqual(client.of("error").map((e) => [e.code, e.closeCode]), [["disconnected", p.terminalCode]]);
      // Something happens after the stop (a message goes round), and the client stays away.
      const connections = proxy.connections;
      await sendInTurn(sender, room, 1, "after the stop");
      await sender.receive(room, sent + 1);
      assert.equal(proxy.connections, connections, "no reconnect after a 4500");
      assert.equal(client.client.state, "disconnected");
    });
  },

  async scrollback(p) {
    await withStack({ gateways: 1 }, async (stack, defer) => {
      const [g0] = stack.gateways;
      const proxy = await TcpProxy.start(g0.addr);
      defer(() => proxy.close());
      const room = roomName("scrollback");
      const sender = new Recorder("sender", [g0.ws()]);
      defer(() => sender.close());
      await sender.join(room);
      await sendInTurn(sender, room, p.messages, "scroll");
      const stored = await stack.history(room);
      assert.equal(stored.length, p.messages);

      const reader = new Recorder("reader", [proxy.ws()]);
      defer(() => reader.close());
      await progress.until(() => reader.client.state === "connected", "reader to connect");
      const ask = (before, what) =>
        progress.settle(reader.client.history(room, before === undefined ? { limit: p.limit } : { before, limit: p.limit }), what);
      const pages = [{ before: undefined, messages: await ask(undefined, "the newest page") }];

      // The next request is held by the proxy, then its connection cut: the client asks again.
      proxy.pause();
      const before = pages[0].messages[0].seq;
      const held = reader.client.history(room, { before, limit: p.limit });
      proxy.cut();
      proxy.resume();
      pages.push({ before, messages: await progress.settle(held, "the page asked for before the cut") });
      assert.ok(reader.client.stats.connections >= 2, "the held request was answered on a new connection");

      while (pages.at(-1).messages.length > 0) {
        const before = pages.at(-1).messages[0].seq;
        pages.push({ before, messages: await ask(before, `the page before ${before}`) });
      }
      for (const page of pages) {
        const seqs = page.messages.map((m) => m.seq);
        assert.ok(seqs.length <= p.limit, `at most ${p.limit} messages: ${seqs}`);
        const end = page.before === undefined ? p.messages : page.before - 1;
        if (seqs.length > 0) {
          assert.deepEqual(seqs, Array.from({ length: seqs.length }, (_, i) => end - seqs.length + 1 + i), "consecutive, ending below before");
        }
      }
      const all = pages.reverse().flatMap((page) => page.messages);
      assert.deepEqual(
        all.map((m) => [m.seq, m.id, m.sender, m.body]),
        stored.map((m) => [m.seq, m.id, m.sender, m.body]),
        "the pages together are what the writer stored",
      );
      assert.deepEqual(reader.of("message"), [], "scrollback delivers no message events");
      assert.deepEqual(reader.of("joined"), [], "scrollback joins nothing");
    });
  },
};

for (const scenario of SUITE.scenarios) {
  test(`${scenario.id}: ${scenario.title}`, async () => {
    const runner = RUNNERS[scenario.id];
    assert.ok(runner, `no runner for scenario ${scenario.id}`);
    await runner(scenario.params);
  });
}

test("every runner has a scenario in the suite", () => {
  const ids = new Set(SUITE.scenarios.map((s) => s.id));
  assert.deepEqual(Object.keys(RUNNERS).filter((id) => !ids.has(id)), []);
});
