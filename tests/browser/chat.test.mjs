// The chat page as a person uses it: two windows on two gateways, in real headless Chromium
// (Debian's /usr/bin/chromium, driven by playwright-core; no browser download). Run by
// scripts/browser-test against the stack of scripts/dev.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { chromium } from "playwright-core";

const A = process.env.CHORUS_PAGE_A ?? "http://127.0.0.1:8081/";
const B = process.env.CHORUS_PAGE_B ?? "http://127.0.0.1:8082/";
const gatewayAPid = Number(process.env.CHORUS_GATEWAY_A_PID);
const jwtSecret = process.env.CHORUS_JWT_SECRET;
const chatBin = process.env.CHORUS_CHAT_BIN ?? "target/debug/chorus-chat";
const writerBin = process.env.CHORUS_WRITER_BIN ?? "target/debug/chorus-writer";
const writerUrl = process.env.CHORUS_WRITER_URL ?? "http://127.0.0.1:8080";
const serviceKey = process.env.CHORUS_SERVICE_KEY;
const artifacts = process.env.CHORUS_ARTIFACTS ?? "artifacts";
const room = `browser-${Date.now()}`;
const WAIT = { timeout: 15000 };

async function open(browser, url) {
  // Phone-sized, as many evaluators will try it.
  const context = await browser.newContext({ viewport: { width: 390, height: 720 } });
  const page = await context.newPage();
  page.on("pageerror", (error) => { console.error(`[${url}] page error: ${error}`); });
  page.on("console", (message) => console.error(`[${url}] console: ${message.text()}`));
  await page.goto(url);
  return page;
}

async function join(page, name, token = "") {
  await page.fill("#room", room);
  await page.fill("#name", name);
  await page.fill("#token", token);
  await page.click("#join-button");
  await page.waitForSelector('#status[data-state="live"]', WAIT);
}

/** A client token as an auth service would issue it (signed with the dev stack's secret). */
function mintToken(sub, rooms) {
  return execFileSync(chatBin, ["mint-token", "--secret-file", jwtSecret, "--sub", sub,
    "--rooms", rooms.join(",")], { encoding: "utf8" }).trim();
}

/** Posts `count` messages to the room as a backend would (the writer's publish API). */
async function publish(count) {
  assert.ok(serviceKey, "CHORUS_SERVICE_KEY must name the dev stack's service key");
  const token = execFileSync(writerBin, ["mint-token", "--service-key-file", serviceKey, "--sub", "browser-test",
    "--rooms", room, "--senders", "bot", "--ttl", "10m"], { encoding: "utf8" }).trim();
  for (let i = 1; i <= count; i++) {
    const res = await fetch(`${writerUrl}/v1/rooms/${room}/messages`, {
      method: "POST",
      headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
      body: JSON.stringify({ id: `bot-${i}`, sender: "bot", body: `bot ${i}` }),
    });
    assert.equal(res.status, 201, `publish ${i}: ${await res.text()}`);
  }
}

async function say(page, text) {
  await page.fill("#text", text);
  await page.press("#text", "Enter");
}

async function sees(page, text) {
  await page.waitForSelector(`#messages li:has-text(${JSON.stringify(text)})`, WAIT);
}

/** [seq, text] of every message on the page, in screen order. */
async function transcript(page) {
  return page.$$eval("#messages li", (items) =>
    items.map((li) => [Number(li.dataset.seq), li.children[1].textContent]));
}

test("two windows on two gateways chat, and a drained gateway's window resumes elsewhere", async () => {
  assert.ok(gatewayAPid > 0, "CHORUS_GATEWAY_A_PID must name gateway A's process");
  mkdirSync(artifacts, { recursive: true });
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"],
  });
  try {
    const john = await open(browser, A);
    const lucy = await open(browser, B);
    assert.equal(await john.textContent("#gateway"), "gateway-a");
    assert.equal(await lucy.textContent("#gateway"), "gateway-b");
    assert.ok(jwtSecret, "CHORUS_JWT_SECRET must name the dev stack's token secret");
    // John uses a dev name; Lucy signs in with a token (sent as a subprotocol), whose sub
    // names her, whatever the name field says.
    await join(john, "john");
    await join(lucy, "", mintToken("lucy", [room]));

    await say(john, "Hello world");
    await sees(lucy, "Hello world");
    await say(lucy, "Hi John");
    await sees(john, "Hi John");
    const sender = await john.textContent('#messages li:has-text("Hi John") .who');
    assert.equal(sender, "lucy", "the sender of a token user's message is the token's sub");
    await john.screenshot({ path: `${artifacts}/browser-john-gateway-a.png` });
    await lucy.screenshot({ path: `${artifacts}/browser-lucy-gateway-b.png` });

    // Gateway A drains: John's window is told, reconnects to B and resumes.
    process.kill(gatewayAPid, "SIGTERM");
    await john.waitForSelector('#status:not([data-state="live"])', WAIT);
    await john.waitForSelector('#status[data-state="live"]', WAIT);
    assert.equal(await john.textContent("#gateway"), new URL(B).host, "John's window says where it moved");
    await say(lucy, "after the drain");
    await sees(john, "after the drain");
    await say(john, "John is back");
    await sees(lucy, "John is back");

    const expected = [[1, "Hello world"], [2, "Hi John"], [3, "after the drain"], [4, "John is back"]];
    assert.deepEqual(await transcript(john), expected, "John sees every message once, in order");
    assert.deepEqual(await transcript(lucy), expected, "Lucy sees every message once, in order");
    await john.screenshot({ path: `${artifacts}/browser-john-after-drain.png` });
    await lucy.screenshot({ path: `${artifacts}/browser-lucy-after-drain.png` });

    // A window that joins later shows the newest page of what was said before (scrollback),
    // and "Load earlier messages" pages back to seq 1: each message once, in order.
    const BOT = 60;
    await publish(BOT);
    await sees(lucy, `bot ${BOT}`);
    const all = [...expected, ...Array.from({ length: BOT }, (_, i) => [expected.length + 1 + i, `bot ${i + 1}`])];
    const ann = await open(browser, B);
    await join(ann, "ann");
    await ann.waitForSelector(`#messages li[data-seq="${all.length}"]`, WAIT);
    await ann.waitForSelector("#earlier:not([hidden])", WAIT);
    assert.deepEqual(await transcript(ann), all.slice(-50), "the newest page first");
    await ann.click("#earlier");
    await ann.waitForSelector('#messages li[data-seq="1"]', WAIT);
    assert.deepEqual(await transcript(ann), all, "then every earlier message once, in order");
    await ann.waitForSelector("#earlier[hidden]", { ...WAIT, state: "attached" });
    await say(lucy, "welcome Ann");
    await sees(ann, "welcome Ann");
    assert.deepEqual(await transcript(ann), [...all, [all.length + 1, "welcome Ann"]]);
    await ann.screenshot({ path: `${artifacts}/browser-ann-scrollback.png` });

    // A token that does not allow the room: the page says so.
    const mallory = await open(browser, B);
    await mallory.fill("#room", room);
    await mallory.fill("#token", mintToken("mallory", ["elsewhere"]));
    await mallory.click("#join-button");
    await mallory.waitForSelector('#error:has-text("does not allow this room")', WAIT);
  } finally {
    await browser.close();
  }
});
