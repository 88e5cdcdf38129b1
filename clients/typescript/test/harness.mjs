// The real local stack for the client's conformance tests, mirroring tests/e2e/src/lib.rs: the
// workspace's binaries (built by `cargo build --workspace --bins`) against the AWS emulator named
// by AWS_ENDPOINT_URL, each stack with a table and topic of its own, every service on an
// ephemeral loopback port read back from its JSON log. Plus the faults the scenarios need: a TCP
// proxy in front of a gateway (delay, pause, cut, duplicate frames, close with a code) and an SNS
// ingress that drops chosen notifications.
//
// Every wait ends on progress: it fails when nothing happened for `IDLE_MS` (CHORUS_TEST_IDLE_MS,
// 30 s), saying what it awaited, never after a fixed total time.
import { spawn, execFile } from "node:child_process";
import { createWriteStream, mkdirSync, writeFileSync } from "node:fs";
import { createServer as createHttpServer } from "node:http";
import { createServer as createTcpServer, connect as tcpConnect } from "node:net";
import { createHmac, randomBytes, randomUUID } from "node:crypto";
import { createInterface } from "node:readline";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
const BIN_DIR = process.env.CHORUS_BIN_DIR ?? join(ROOT, "target/debug");
const LOG_DIR = process.env.CHORUS_TEST_LOGS ?? join(ROOT, "target/client-test-logs");
export const IDLE_MS = Number(process.env.CHORUS_TEST_IDLE_MS ?? 30000);

function endpoint() {
  const url = process.env.AWS_ENDPOINT_URL;
  if (!url) throw new Error("AWS_ENDPOINT_URL is not set: the client tests need the AWS emulator; run ./scripts/client-test");
  return url;
}

// ---- progress -----------------------------------------------------------------------------------

/** Anything that happened (a client event, a log line); waits give up only when this stops. */
class Progress {
  #tick = 0;
  #watchers = new Set();
  bump() {
    this.#tick += 1;
    for (const watcher of [...this.#watchers]) watcher();
  }
  get tick() {
    return this.#tick;
  }
  /**
   * Resolves once `predicate()` holds, checked now and after every bump; rejects when nothing at
   * all happened for `idleMs`, naming `what`.
   */
  until(predicate, what, idleMs = IDLE_MS) {
    return new Promise((resolve, reject) => {
      let timer;
      const arm = () => {
        clearTimeout(timer);
        timer = setTimeout(() => {
          this.#watchers.delete(check);
          reject(new Error(`nothing happened for ${idleMs} ms while waiting for ${what}`));
        }, idleMs);
      };
      const check = () => {
        let done;
        try {
          done = predicate();
        } catch (error) {
          this.#watchers.delete(check);
          clearTimeout(timer);
          reject(error);
          return;
        }
        if (done) {
          this.#watchers.delete(check);
          clearTimeout(timer);
          resolve();
        } else {
          arm();
        }
      };
      this.#watchers.add(check);
      check();
    });
  }
  /** Awaits `promise`, failing if nothing happens for `idleMs` meanwhile. */
  async settle(promise, what, idleMs = IDLE_MS) {
    let done = false;
    let result;
    let failure;
    promise.then(
      (value) => {
        result = value;
        done = true;
        this.bump();
      },
      (error) => {
        failure = error;
        done = true;
        this.bump();
      },
    );
    await this.until(() => done, what, idleMs);
    if (failure) throw failure;
    return result;
  }
}

export const progress = new Progress();

// ---- services -------------------------------------------------------------------------------------

/** A running service process, its address read from its `… listening` log line. */
export class Service {
  constructor(name, child, addr, logPath) {
    this.name = name;
    this.child = child;
    this.addr = addr;
    this.logPath = logPath;
    this.exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  }

  static start(name, bin, args, readyMessage) {
    mkdirSync(LOG_DIR, { recursive: true });
    const logPath = join(LOG_DIR, `${name}-${randomUUID().slice(0, 8)}.log`);
    const log = createWriteStream(logPath);
    const child = spawn(join(BIN_DIR, bin), args, {
      stdio: ["ignore", "ignore", "pipe"],
      env: { ...process.env, CHORUS_LOG_FORMAT: "json", CHORUS_LOG: "info", AWS_EC2_METADATA_DISABLED: "true" },
    });
    return new Promise((resolve, reject) => {
      let ready = false;
      child.once("error", (error) => reject(new Error(`starting ${bin}: ${error.message}`)));
      child.once("exit", (code, signal) => {
        if (!ready) reject(new Error(`${name} exited during start-up (${code ?? signal}); log: ${logPath}`));
      });
      createInterface({ input: child.stderr }).on("line", (line) => {
        log.write(line + "\n");
        progress.bump();
        if (ready) return;
        let entry;
        try {
          entry = JSON.parse(line);
        } catch {
          return;
        }
        const message = entry.message ?? entry.fields?.message;
        const addr = entry.addr ?? entry.fields?.addr;
        if (message === readyMessage && typeof addr === "string") {
          ready = true;
          resolve(new Service(name, child, addr, logPath));
        }
      });
    }).then(
      (service) => service,
      (error) => {
        child.kill("SIGKILL");
        throw error;
      },
    );
  }

  get http() {
    return `http://${this.addr}`;
  }

  ws(path = "/ws") {
    return `ws://${this.addr}${path}`;
  }

  get running() {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** SIGTERM (a drain for a gateway) and wait for the exit. */
  async terminate() {
    if (!this.running) return this.exited;
    this.child.kill("SIGTERM");
    return progress.settle(this.exited, `${this.name} to exit after SIGTERM`);
  }

  /** SIGKILL, as a crash. */
  async kill() {
    if (!this.running) return this.exited;
    this.child.kill("SIGKILL");
    return this.exited;
  }
}

const execFileAsync = promisify(execFile);

async function run(bin, args) {
  const { stdout } = await execFileAsync(join(BIN_DIR, bin), args, {
    env: { ...process.env, CHORUS_LOG: "warn", AWS_EC2_METADATA_DISABLED: "true" },
  });
  return stdout.trim();
}

/** Polls `/readyz` until 200; the gateway logs while it subscribes, which counts as progress. */
async function pollReady(service) {
  for (;;) {
    if (!service.running) throw new Error(`${service.name} exited before it was ready; log: ${service.logPath}`);
    try {
      const res = await fetch(`${service.http}/readyz`);
      if (res.ok) return;
    } catch {
      // not listening yet
    }
    progress.bump();
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** A table and topic of its own, a writer, a publisher poller and gateways. */
export class Stack {
  constructor(table, topicArn, writer, publisher, serviceKeyFile, writerToken) {
    this.table = table;
    this.serviceKeyFile = serviceKeyFile;
    this.writerToken = writerToken;
    this.topicArn = topicArn;
    this.writer = writer;
    this.publisher = publisher;
    this.gateways = [];
    this.jwtSecretFile = null;
    this.jwtSecret = null;
  }

  static async start({ gateways = 2, gatewayArgs = [] } = {}) {
    const table = `client-${randomUUID().replace(/-/g, "").slice(0, 12)}`;
    endpoint();
    await run("chorus-writer", ["create-table", "--table", table]);
    const topicArn = await run("chorus-publisher", ["create-topic", "--name", table]);
    // The writer refuses calls without a service token: a key shared with the gateways, and a
    // token of the test's own for reading history.
    mkdirSync(LOG_DIR, { recursive: true });
    const serviceKeyFile = join(LOG_DIR, `${table}-service-key`);
    writeFileSync(serviceKeyFile, randomBytes(36).toString("base64url"), { mode: 0o600 });
    const writerToken = await run("chorus-writer", [
      "mint-token", "--service-key-file", serviceKeyFile, "--sub", "client-tests", "--rooms", "*", "--senders", "*",
    ]);
    const writer = await Service.start(
      "writer",
      "chorus-writer",
      ["--listen", "127.0.0.1:0", "--table", table, "--service-key-file", serviceKeyFile],
      "writer listening",
    );
    const publisher = await Service.start(
      "publisher",
      "chorus-publisher",
      ["poll", "--table", table, "--topic-arn", topicArn, "--idle-ms", "50", "--metrics-listen", "127.0.0.1:0"],
      "metrics listening",
    );
    const stack = new Stack(table, topicArn, writer, publisher, serviceKeyFile, writerToken);
    for (let i = 0; i < gateways; i++) await stack.addGateway(gatewayArgs);
    return stack;
  }

  /** A secret for client tokens (HS256), written once per stack; give its flags to gateways. */
  jwtFlags() {
    if (!this.jwtSecretFile) {
      this.jwtSecret = randomBytes(36).toString("base64url");
      this.jwtSecretFile = join(LOG_DIR, `${this.table}-jwt-secret`);
      mkdirSync(LOG_DIR, { recursive: true });
      writeFileSync(this.jwtSecretFile, this.jwtSecret, { mode: 0o600 });
    }
    return ["--jwt-secret-file", this.jwtSecretFile, "--jwt-leeway-secs", "0"];
  }

  /** A token as an auth service would issue it, valid for `ttlSecs`. */
  mintToken(sub, rooms, ttlSecs) {
    if (!this.jwtSecret) this.jwtFlags();
    const now = Math.floor(Date.now() / 1000);
    const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
    const unsigned = `${part({ alg: "HS256", typ: "JWT" })}.${part({ sub, rooms, iat: now, exp: now + ttlSecs })}`;
    const signature = createHmac("sha256", this.jwtSecret).update(unsigned).digest("base64url");
    return `${unsigned}.${signature}`;
  }

  /** Starts one more gateway (extra flags appended) and waits until `/readyz` answers. */
  async addGateway(extra = []) {
    const name = `gateway-${this.gateways.length}`;
    const args = [
      "--listen", "127.0.0.1:0",
      "--writer-url", this.writer.http,
      "--writer-key-file", this.serviceKeyFile,
      "--topic-arn", this.topicArn,
      "--gateway-id", name,
      "--sns-cert-mirror", endpoint(),
      "--insecure-dev-users",
      "--drain-timeout-ms", "5000",
      "--gap-timeout-ms", "200",
      // Tests drive clients faster than people type; the rate limits have tests of their own.
      "--sends-per-sec", "10000", "--send-burst", "10000",
      "--joins-per-sec", "10000", "--join-burst", "10000",
      ...extra,
    ];
    const gateway = await Service.start(name, "chorus-gateway", args, "gateway listening");
    await pollReady(gateway);
    this.gateways.push(gateway);
    return gateway;
  }

  /** Removes the subscriptions of gateways that no longer answer (the janitor, after a crash). */
  async pruneSubscriptions() {
    await run("chorus-gateway", ["--topic-arn", this.topicArn, "prune-subscriptions"]);
  }

  /**
   * Every stored message of `room` after seq `from` (0: all), oldest first, from the writer's
   * history API (which answers 410 for a `from` older than what it still stores).
   */
  async history(room, from = 0) {
    const messages = [];
    let after = from;
    for (;;) {
      const res = await fetch(`${this.writer.http}/v1/rooms/${room}/messages?after=${after}&limit=500`, {
        headers: { authorization: `Bearer ${this.writerToken}` },
      });
      if (!res.ok) throw new Error(`history of ${room}: ${res.status} ${await res.text()}`);
      const page = await res.json();
      messages.push(...page.messages);
      if (page.messages.length === 0 || page.messages[page.messages.length - 1].seq >= page.head) return messages;
      after = page.messages[page.messages.length - 1].seq;
    }
  }

  /**
   * Deletes stored messages from the table, as retention would: the test hook for
   * `history_expired` (the emulator does not check request signatures). The writer stores a run
   * of a room's messages in one item keyed by its first seq, so the item holding each seq is found
   * first (the last item starting at or before it) and deleted whole.
   */
  async deleteStored(room, seqs) {
    const call = async (target, body) => {
      const url = process.env.AWS_ENDPOINT_URL_DYNAMODB ?? endpoint();
      const region = process.env.AWS_REGION ?? "us-east-1";
      const date = new Date().toISOString().replace(/[-:]/g, "").replace(/\.\d+/, "");
      const res = await fetch(url, {
        method: "POST",
        headers: {
          "content-type": "application/x-amz-json-1.0",
          "x-amz-target": `DynamoDB_20120810.${target}`,
          "x-amz-date": date,
          authorization: `AWS4-HMAC-SHA256 Credential=test/${date.slice(0, 8)}/${region}/dynamodb/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=${"0".repeat(64)}`,
        },
        body: JSON.stringify({ TableName: this.table, ...body }),
      });
      if (!res.ok) throw new Error(`${target} on ${room}: ${res.status} ${await res.text()}`);
      return res.json();
    };
    for (const seq of seqs) {
      const found = await call("Query", {
        KeyConditionExpression: "room = :room AND seq <= :seq",
        ExpressionAttributeValues: { ":room": { S: room }, ":seq": { N: String(seq) } },
        ScanIndexForward: false,
        Limit: 1,
        ConsistentRead: true,
      });
      const item = found.Items?.[0];
      if (!item || Number(item.last?.N ?? item.seq.N) < seq || Number(item.seq.N) === 0) continue;
      await call("DeleteItem", { Key: { room: { S: room }, seq: { N: item.seq.N } } });
    }
  }

  /** Stops everything: gateways first (they unsubscribe while the emulator runs). */
  async stop() {
    for (const gateway of this.gateways) await gateway.terminate().catch(() => gateway.kill());
    await this.publisher.terminate().catch(() => this.publisher.kill());
    await this.writer.terminate().catch(() => this.writer.kill());
  }
}

// ---- faults ------------------------------------------------------------------------------------------

/**
 * A TCP proxy on loopback in front of a gateway. Chunks go through in order, each after `delayMs`;
 * `pause()` holds everything in both directions (a silent network) until `resume()`; `cut()`
 * drops every connection without a close frame; `closeWith(code)` sends clients a close frame
 * with `code` as if the gateway had; `duplicateServerFrames` repeats every text frame the gateway
 * sends.
 */
export class TcpProxy {
  #server;
  #pairs = new Set();
  delayMs = 0;
  paused = false;
  duplicateServerFrames = false;
  duplicated = 0;
  connections = 0;

  static async start(target, options = {}) {
    const proxy = new TcpProxy();
    Object.assign(proxy, options);
    const [host, port] = target.split(":");
    proxy.#server = createTcpServer((client) => proxy.#accept(client, host, Number(port)));
    await new Promise((resolve) => proxy.#server.listen(0, "127.0.0.1", resolve));
    proxy.addr = `127.0.0.1:${proxy.#server.address().port}`;
    return proxy;
  }

  ws(path = "/ws") {
    return `ws://${this.addr}${path}`;
  }

  #accept(client, host, port) {
    this.connections += 1;
    const upstream = tcpConnect(port, host);
    const pair = {
      client,
      upstream,
      toUpstream: this.#pipe(upstream),
      toClient: this.#pipe(client),
      parser: new ServerFrameSplitter(),
    };
    this.#pairs.add(pair);
    const end = () => {
      this.#pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on("data", (chunk) => pair.toUpstream.push(chunk));
    upstream.on("data", (chunk) => {
      if (!this.duplicateServerFrames) {
        pair.toClient.push(chunk);
        return;
      }
      for (const piece of pair.parser.push(chunk)) {
        pair.toClient.push(piece.bytes);
        if (piece.text) {
          pair.toClient.push(piece.bytes);
          this.duplicated += 1;
        }
      }
    });
    for (const socket of [client, upstream]) {
      socket.on("error", end);
      socket.on("close", end);
    }
  }

  /** An ordered, delayed, pausable one-way pipe into `socket`. */
  #pipe(socket) {
    const queue = [];
    let timer = null;
    const flush = () => {
      timer = null;
      if (this.paused) return;
      const now = Date.now();
      while (queue.length > 0 && queue[0].at <= now) socket.write(queue.shift().chunk);
      if (queue.length > 0) timer = setTimeout(flush, queue[0].at - now);
    };
    return {
      push: (chunk) => {
        queue.push({ chunk, at: Date.now() + this.delayMs });
        if (!timer && !this.paused) timer = setTimeout(flush, this.delayMs);
      },
      kick: () => {
        if (!timer) flush();
      },
    };
  }

  pause() {
    this.paused = true;
  }

  resume() {
    this.paused = false;
    for (const pair of this.#pairs) {
      pair.toUpstream.kick();
      pair.toClient.kick();
    }
  }

  /** Drops every connection at once, without a close frame. */
  cut() {
    for (const pair of [...this.#pairs]) {
      pair.client.destroy();
      pair.upstream.destroy();
    }
  }

  /** Tells every client the gateway closed with `code`, then drops the gateway side. */
  closeWith(code, reason = "injected by the test proxy") {
    const text = Buffer.from(reason);
    const payload = Buffer.alloc(2 + text.length);
    payload.writeUInt16BE(code, 0);
    text.copy(payload, 2);
    const frame = Buffer.concat([Buffer.from([0x88, payload.length]), payload]);
    for (const pair of [...this.#pairs]) {
      this.#pairs.delete(pair);
      pair.upstream.destroy();
      pair.client.end(frame);
    }
  }

  async close() {
    this.cut();
    await new Promise((resolve) => this.#server.close(resolve));
  }
}

/**
 * Splits the gateway → client byte stream into the HTTP upgrade answer and whole WebSocket
 * frames (server frames are not masked), marking unfragmented text frames.
 */
class ServerFrameSplitter {
  #buffer = Buffer.alloc(0);
  #upgraded = false;

  push(chunk) {
    this.#buffer = Buffer.concat([this.#buffer, chunk]);
    const pieces = [];
    if (!this.#upgraded) {
      const end = this.#buffer.indexOf("\r\n\r\n");
      if (end < 0) return pieces;
      pieces.push({ bytes: this.#buffer.subarray(0, end + 4), text: false });
      this.#buffer = this.#buffer.subarray(end + 4);
      this.#upgraded = true;
    }
    for (;;) {
      if (this.#buffer.length < 2) break;
      const first = this.#buffer[0];
      let length = this.#buffer[1] & 0x7f;
      let header = 2;
      if (length === 126) {
        if (this.#buffer.length < 4) break;
        length = this.#buffer.readUInt16BE(2);
        header = 4;
      } else if (length === 127) {
        if (this.#buffer.length < 10) break;
        length = Number(this.#buffer.readBigUInt64BE(2));
        header = 10;
      }
      if (this.#buffer.length < header + length) break;
      pieces.push({ bytes: this.#buffer.subarray(0, header + length), text: first === 0x81 });
      this.#buffer = this.#buffer.subarray(header + length);
    }
    return pieces;
  }
}

/**
 * The SNS ingress of one gateway (its `--public-url`): forwards notifications to the gateway, but
 * drops those for which `drop(events)` says so, after awaiting `onDrop(events)`.
 */
export class SnsIngress {
  target = null;
  dropped = [];
  drop = () => false;
  onDrop = async () => {};

  static async start() {
    const ingress = new SnsIngress();
    ingress.server = createHttpServer((req, res) => ingress.#handle(req, res));
    await new Promise((resolve) => ingress.server.listen(0, "127.0.0.1", resolve));
    ingress.url = `http://127.0.0.1:${ingress.server.address().port}`;
    return ingress;
  }

  async #handle(req, res) {
    const chunks = [];
    for await (const chunk of req) chunks.push(chunk);
    const body = Buffer.concat(chunks);
    try {
      const envelope = JSON.parse(body.toString());
      if (envelope.Type === "Notification") {
        const events = JSON.parse(envelope.Message).events ?? [];
        if (this.drop(events)) {
          await this.onDrop(events);
          this.dropped.push(...events);
          progress.bump();
          res.writeHead(200).end("dropped");
          return;
        }
      }
    } catch {
      // Not ours to judge: the gateway answers.
    }
    if (!this.target) {
      res.writeHead(503).end("no gateway yet");
      return;
    }
    try {
      const answer = await fetch(`${this.target}${req.url}`, {
        method: req.method,
        headers: { "content-type": req.headers["content-type"] ?? "text/plain" },
        body,
      });
      res.writeHead(answer.status).end(Buffer.from(await answer.arrayBuffer()));
    } catch (error) {
      res.writeHead(502).end(String(error));
    }
  }

  async close() {
    await new Promise((resolve) => this.server.close(resolve));
  }
}
