// chorus-client: a client for Chorus gateways (WebSocket subprotocol `chorus.v1`) that keeps the
// gateway's promise, "every message once and in order", across reconnects, drains and crashes.
//
// What it does for the app (the README's "Client library" section says the same in short):
// - Position per room. It keeps, for every room the app is in, the highest of the last message
//   seq delivered and the latest `joined` seq. After any reconnect it re-joins each room with
//   `since` = that position, so the gateway replays exactly what was missed.
// - Once and in order, checked. A message is delivered to the app only if it is the next seq of
//   its room; a seq already delivered is dropped, and a seq beyond a hole makes the client re-join
//   the room from its position (the hole is replayed) instead of delivering out of order.
// - Reconnects. A close with a resume code (4000–4499) or a dropped connection reconnects to the
//   next URL after a jittered exponential backoff. 4003 (token expired) first asks `getToken` for a
//   fresh token. 4500–4999 stop: the app must change something and call `connect()` again.
// - Sends until acked. `send` returns a promise of the ack; an unacked send is sent again, with
//   the same id, once its room is joined on the next connection (the writer stores an id once).
//   `unavailable` and `rate_limited` answers retry it after a backoff. At most `maxPendingSends`
//   sends wait at once; more are refused with the error code `queue_full`.
// - History that is gone. A resume whose messages are no longer stored is answered with
//   `history_expired`: the client emits `historyExpired` and re-joins the room live (without
//   `since`); what was missed is reported, never skipped silently.
// - A silent connection. A connection on which a request waits and nothing at all is heard for
//   `requestTimeoutMs` is treated as dropped (browsers cannot see WebSocket pings).
//
// The gateway serves the compiled form of this file to its chat page at `/chorus.js`
// (crates/gateway/static/chorus.js); `scripts/client-test` checks that it matches this source.
// It has no imports: it runs as is in browsers and in Node ≥ 22 (global WebSocket), or with any
// WHATWG-style WebSocket constructor given as the `WebSocket` option (e.g. the `ws` package).
/** Subprotocol of the protocol this client speaks. */
export const SUBPROTOCOL = "chorus.v1";
/** Largest message body the gateway accepts, in UTF-8 bytes. */
export const MAX_BODY_BYTES = 16 * 1024;
/**
 * Close codes of the gateway. 4000–4499: reconnect and resume (the client does it on its own);
 * 4500–4999: do not reconnect without changing something.
 */
export const CloseCode = {
    SERVER_RESTARTING: 4000,
    SLOW_CONSUMER: 4001,
    RESYNC: 4002,
    TOKEN_EXPIRED: 4003,
    GATEWAY_FULL: 4004,
    IDLE_TIMEOUT: 4005,
    PROTOCOL_VIOLATION: 4500,
};
/** Whether a close code means "reconnect and resume". */
export function shouldResume(code) {
    return code >= 4000 && code < 4500;
}
/** Most messages one {@link ChorusClient.history} page holds. */
export const MAX_HISTORY_LIMIT = 100;
/** Most {@link ChorusClient.history} requests waiting for their answer at once. */
export const MAX_PENDING_HISTORY = 16;
/** Why something failed. `code` is a gateway error code or one of this client's own. */
export class ChorusError extends Error {
    /**
     * A gateway error code (`bad_frame`, `not_joined`, `forbidden`, `limit_exceeded`, …) or one
     * of: `invalid` (refused before sending), `queue_full`, `closed` (the client was closed),
     * `disconnected` (the gateway closed the connection for good), `token_expired` (4003 and no
     * `getToken`), `token_refresh_failed`, `connect_failed`.
     */
    code;
    /** The room concerned, if any. */
    room;
    /** The client message id of the send concerned, if any. */
    ref;
    /** The close code, for `disconnected` and `token_expired`. */
    closeCode;
    constructor(code, message, details = {}) {
        super(message);
        this.name = "ChorusError";
        this.code = code;
        this.room = details.room;
        this.ref = details.ref;
        this.closeCode = details.closeCode;
    }
}
const ROOM = /^[A-Za-z0-9_.:-]{1,128}$/;
const MSG_ID = /^[A-Za-z0-9_.:-]{1,64}$/;
const USER = /^[A-Za-z0-9_.:@-]{1,64}$/;
const OPEN = 1;
/**
 * A connection to Chorus that stays in its rooms across reconnects. Create it, add handlers with
 * {@link ChorusClient.on}, call {@link ChorusClient.connect}, then `join` and `send`.
 */
export class ChorusClient {
    #urls;
    #user;
    #getToken;
    #WebSocket;
    #initialDelayMs;
    #maxDelayMs;
    #maxPendingSends;
    #requestTimeoutMs;
    #connectTimeoutMs;
    #idPrefix;
    #token;
    /** The gateway said the token expired: get a fresh one before connecting. */
    #tokenStale = false;
    #state = "disconnected";
    #socket = null;
    #url = null;
    /** Connection attempts so far (the next goes to `urls[attempts % urls.length]`). */
    #attempts = 0;
    /** Failures since the last healthy connection (drives the backoff). */
    #failures = 0;
    /** Bumped whenever the current attempt or connection is abandoned; stale callbacks compare it. */
    #generation = 0;
    #wanted = false;
    #reconnectTimer;
    #connectTimer;
    #livenessTimer;
    #retryTimer;
    #retryTimerAt = Infinity;
    #lastHeard = 0;
    #rooms = new Map();
    /** Rooms to join on this connection, in order; one join is in flight at a time. */
    #joinQueue = [];
    #joining = null;
    #joinFailures = 0;
    #joinRetryAt = 0;
    /** Leaves in flight on this connection, in the order sent (answers come in that order). */
    #leaves = [];
    /** Sends awaiting their ack, in the order the app made them. */
    #pending = new Map();
    #nextId = 0;
    /** Scrollback requests awaiting their page. */
    #histories = new Map();
    #nextHistoryId = 0;
    #handlers = {
        message: new Set(),
        state: new Set(),
        joined: new Set(),
        left: new Set(),
        historyExpired: new Set(),
        error: new Set(),
    };
    #stats = {
        connections: 0,
        duplicatesDropped: 0,
        gapsResynced: 0,
        strayAcks: 0,
        sendRetries: 0,
    };
    constructor(options) {
        const urls = typeof options.urls === "string" ? [options.urls] : [...options.urls];
        if (urls.length === 0)
            throw new ChorusError("invalid", "give at least one gateway URL");
        if (options.user !== undefined && !USER.test(options.user)) {
            throw new ChorusError("invalid", "a user name is 1–64 of A-Z a-z 0-9 _ . : @ -");
        }
        const WebSocketImpl = options.WebSocket ?? globalThis.WebSocket;
        if (!WebSocketImpl) {
            throw new ChorusError("invalid", "no WebSocket here: pass one as the WebSocket option (Node 20: the ws package; Node ≥ 22 has one)");
        }
        const idPrefix = options.idPrefix ?? randomPrefix();
        if (!MSG_ID.test(`${idPrefix}-${Number.MAX_SAFE_INTEGER}`)) {
            throw new ChorusError("invalid", "idPrefix must leave room for ids of 1–64 of A-Z a-z 0-9 _ . : -");
        }
        this.#urls = urls;
        this.#user = options.user;
        this.#token = options.token;
        this.#getToken = options.getToken;
        this.#WebSocket = WebSocketImpl;
        this.#initialDelayMs = options.reconnect?.initialDelayMs ?? 250;
        this.#maxDelayMs = options.reconnect?.maxDelayMs ?? 8000;
        this.#maxPendingSends = options.maxPendingSends ?? 256;
        this.#requestTimeoutMs = options.requestTimeoutMs ?? 20000;
        this.#connectTimeoutMs = options.connectTimeoutMs ?? 10000;
        this.#idPrefix = idPrefix;
    }
    /** The connection's state. */
    get state() {
        return this.#state;
    }
    /** The gateway URL of the current connection, if connected. */
    get url() {
        return this.#state === "connected" ? this.#url : null;
    }
    /** A snapshot of what the client counted. */
    get stats() {
        return { ...this.#stats };
    }
    /** The position in `room` (max of last message seq and latest `joined` seq), if known. */
    position(room) {
        return this.#rooms.get(room)?.position ?? null;
    }
    /** How many sends wait for their ack. */
    get pendingSends() {
        return this.#pending.size;
    }
    /** Adds a handler; returns a function that removes it. */
    on(event, handler) {
        this.#handlers[event].add(handler);
        return () => this.off(event, handler);
    }
    /** Removes a handler. */
    off(event, handler) {
        this.#handlers[event].delete(handler);
    }
    /**
     * Replaces the token for the next connection (e.g. after the client stopped on 4003 without
     * `getToken`); the current connection, if any, keeps its token until it ends.
     */
    setToken(token) {
        this.#token = token;
        this.#tokenStale = false;
    }
    /** Starts connecting (and reconnecting until {@link ChorusClient.close}). Idempotent. */
    connect() {
        if (this.#wanted)
            return;
        this.#wanted = true;
        this.#failures = 0;
        void this.#open();
    }
    /**
     * Closes the connection for good: waiting `join` and `send` promises are rejected with
     * `closed`; rooms and positions are kept, so a later {@link ChorusClient.connect} resumes.
     */
    close() {
        this.#wanted = false;
        this.#abandon();
        this.#failAll(new ChorusError("closed", "the client was closed"));
        this.#setState("disconnected", {});
    }
    /**
     * Be in `room` from now on, on this connection and every later one. The first join is live
     * (messages from now on), or replays every stored message after `since`; once the room has a
     * position, every (re-)join resumes from it. Resolves on the gateway's `joined`.
     *
     * Rejects with a {@link ChorusError}: `invalid` (bad room name), `forbidden`, `limit_exceeded`
     * or another refusal of the gateway, `closed`, `disconnected`.
     */
    join(room, options = {}) {
        if (!ROOM.test(room)) {
            return Promise.reject(new ChorusError("invalid", "a room name is 1–128 of A-Z a-z 0-9 _ . : -", { room }));
        }
        const since = options.since;
        if (since !== undefined && !(Number.isSafeInteger(since) && since >= 0)) {
            return Promise.reject(new ChorusError("invalid", "since is a seq: an integer ≥ 0", { room }));
        }
        let state = this.#rooms.get(room);
        if (!state) {
            state = { position: null, requested: since, joined: false, resyncing: false, waiters: [] };
            this.#rooms.set(room, state);
        }
        const joined = new Promise((resolve, reject) => state.waiters.push({ resolve, reject }));
        if (state.joined) {
            // Already in: answer with where the client is, without a round trip.
            this.#settleJoin(room, { room, seq: state.position ?? 0, resumed: true });
        }
        else {
            this.#enqueueJoin(room);
            this.#pump();
        }
        return joined;
    }
    /**
     * Leave `room`: no more of its messages, and it is not re-joined on later connections. Its
     * position is forgotten (join with `since` to resume). Unacked sends to it are rejected with
     * `not_joined`. Resolves when the gateway confirms (at once when not connected).
     */
    leave(room) {
        const state = this.#rooms.get(room);
        if (!state)
            return Promise.resolve();
        this.#rooms.delete(room);
        this.#joinQueue = this.#joinQueue.filter((r) => r !== room);
        const error = new ChorusError("not_joined", `left ${room}`, { room });
        for (const waiter of state.waiters)
            waiter.reject(error);
        for (const [id, send] of this.#pending) {
            if (send.room === room) {
                this.#pending.delete(id);
                send.deferred.reject(new ChorusError("not_joined", `left ${room} before the send was acked`, { room, ref: id }));
            }
        }
        return new Promise((resolve) => {
            if (state.joined) {
                if (!this.#sendLeave(room, resolve))
                    resolve();
            }
            else if (this.#joining?.room === room) {
                // The join in flight is answered first; its `joined` then sends the leave.
                this.#afterJoinLeave.set(room, resolve);
            }
            else {
                resolve();
            }
        });
    }
    /** Leaves to send once the join in flight for their room is answered. */
    #afterJoinLeave = new Map();
    /**
     * Sends `body` to `room` (joined, or being joined). Resolves with the ack once the message is
     * durable; until then it is sent again, with the same id, after every reconnect. Give `id` to
     * retry a send made earlier (e.g. before a page reload): it is stored once.
     *
     * Rejects with a {@link ChorusError}: `invalid` (body or id), `not_joined` (join first, or the
     * room was left), `queue_full` (`maxPendingSends` sends wait), a refusal of the gateway
     * (`bad_frame`, `forbidden`, …), `closed`, `disconnected`.
     */
    send(room, body, options = {}) {
        const id = options.id ?? `${this.#idPrefix}-${++this.#nextId}`;
        if (!MSG_ID.test(id)) {
            return Promise.reject(new ChorusError("invalid", "a message id is 1–64 of A-Z a-z 0-9 _ . : -", { room, ref: id }));
        }
        const bytes = utf8Length(body);
        if (bytes < 1 || bytes > MAX_BODY_BYTES) {
            return Promise.reject(new ChorusError("invalid", `a message body is 1 byte to 16 KiB of UTF-8 (this one is ${bytes} bytes)`, { room, ref: id }));
        }
        if (!this.#rooms.has(room)) {
            return Promise.reject(new ChorusError("not_joined", `join ${room} before sending to it`, { room, ref: id }));
        }
        if (this.#pending.has(id)) {
            return Promise.reject(new ChorusError("invalid", `a send with id ${id} is already waiting for its ack`, { room, ref: id }));
        }
        if (this.#pending.size >= this.#maxPendingSends) {
            return Promise.reject(new ChorusError("queue_full", `${this.#maxPendingSends} sends are waiting for their ack: wait for some before sending more`, { room, ref: id }));
        }
        const acked = new Promise((resolve, reject) => {
            this.#pending.set(id, {
                id,
                room,
                body,
                sent: false,
                everSent: false,
                retryAt: 0,
                failures: 0,
                deferred: { resolve, reject },
            });
        });
        this.#pump();
        return acked;
    }
    /**
     * Scrollback ("load earlier messages"): up to `limit` (default 50, at most
     * {@link MAX_HISTORY_LIMIT}) of the room's messages with seq below `before` (the newest ones
     * without it), oldest first and consecutive. Fewer when the room has no more, or when large
     * messages would not fit one frame; an empty array when nothing earlier is stored (seq 1, or
     * past retention). Page on with `before` set to the first message's seq. The room need not be
     * joined; this neither joins it nor changes its position or the `message` events. Sent again
     * after a reconnect until answered.
     *
     * Rejects with a {@link ChorusError}: `invalid` (room, before or limit), `queue_full`
     * ({@link MAX_PENDING_HISTORY} requests wait), `forbidden` (the token does not allow the
     * room) or another refusal of the gateway, `closed`, `disconnected`.
     */
    history(room, options = {}) {
        if (!ROOM.test(room)) {
            return Promise.reject(new ChorusError("invalid", "a room name is 1–128 of A-Z a-z 0-9 _ . : -", { room }));
        }
        const { before, limit = 50 } = options;
        if (before !== undefined && !(Number.isSafeInteger(before) && before >= 1)) {
            return Promise.reject(new ChorusError("invalid", "before is a seq: an integer ≥ 1", { room }));
        }
        if (!(Number.isSafeInteger(limit) && limit >= 1 && limit <= MAX_HISTORY_LIMIT)) {
            return Promise.reject(new ChorusError("invalid", `limit is an integer from 1 to ${MAX_HISTORY_LIMIT}`, { room }));
        }
        if (this.#histories.size >= MAX_PENDING_HISTORY) {
            return Promise.reject(new ChorusError("queue_full", `${MAX_PENDING_HISTORY} history requests are waiting: wait for some first`, { room }));
        }
        const id = `${this.#idPrefix}-h${++this.#nextHistoryId}`;
        const page = new Promise((resolve, reject) => {
            this.#histories.set(id, { id, room, before, limit, sent: false, retryAt: 0, failures: 0, deferred: { resolve, reject } });
        });
        this.#pump();
        return page;
    }
    // ---- connection lifecycle -------------------------------------------------------------------
    async #open() {
        const generation = ++this.#generation;
        const url = this.#urls[this.#attempts % this.#urls.length];
        this.#attempts += 1;
        this.#url = url;
        if (this.#state !== "connecting")
            this.#setState("connecting", { url });
        if (this.#getToken && (this.#tokenStale || (this.#token !== undefined && tokenExpired(this.#token)))) {
            try {
                this.#token = await this.#getToken();
                this.#tokenStale = false;
            }
            catch (cause) {
                if (generation !== this.#generation)
                    return;
                this.#emit("error", new ChorusError("token_refresh_failed", `getToken failed: ${describe(cause)}`));
                this.#retryLater(undefined, "getToken failed");
                return;
            }
            if (generation !== this.#generation)
                return;
        }
        else if (this.#tokenStale) {
            this.#stop(new ChorusError("token_expired", "the token expired (4003) and no getToken option gives a fresh one", {
                closeCode: CloseCode.TOKEN_EXPIRED,
            }), { code: CloseCode.TOKEN_EXPIRED, reason: "token expired" });
            return;
        }
        let socket;
        try {
            const target = new URL(url);
            if (this.#token === undefined && this.#user !== undefined)
                target.searchParams.set("user", this.#user);
            // A token travels as a second subprotocol, never in the URL (which proxies log).
            const protocols = this.#token === undefined ? [SUBPROTOCOL] : [SUBPROTOCOL, `bearer.${this.#token}`];
            socket = new this.#WebSocket(target.href, protocols);
        }
        catch (cause) {
            this.#emit("error", new ChorusError("connect_failed", `cannot connect to ${url}: ${describe(cause)}`));
            this.#retryLater(undefined, describe(cause));
            return;
        }
        this.#socket = socket;
        let opened = false;
        this.#connectTimer = setTimeout(() => {
            if (generation === this.#generation && !opened)
                this.#lost(undefined, "no answer to the connection attempt");
        }, this.#connectTimeoutMs);
        socket.onopen = () => {
            if (generation !== this.#generation)
                return;
            opened = true;
            clearTimeout(this.#connectTimer);
            this.#stats.connections += 1;
            this.#lastHeard = Date.now();
            this.#setState("connected", { url });
            // Every wanted room is (re-)joined on the new connection, from its position.
            this.#joinQueue = [...this.#rooms.keys()];
            if (this.#joinQueue.length === 0)
                this.#failures = 0;
            this.#pump();
        };
        socket.onmessage = (event) => {
            if (generation !== this.#generation)
                return;
            this.#lastHeard = Date.now();
            if (typeof event.data !== "string")
                return;
            let frame;
            try {
                frame = JSON.parse(event.data);
            }
            catch {
                return;
            }
            this.#onFrame(frame);
            this.#pump();
        };
        socket.onclose = (event) => {
            if (generation !== this.#generation)
                return;
            this.#lost(event.code, event.reason || (opened ? "connection closed" : "connection refused or failed"));
        };
        socket.onerror = () => {
            // `close` follows with the details.
        };
    }
    /** The current connection ended (closed with `code`, or dropped when undefined). */
    #lost(code, reason) {
        this.#abandon();
        if (!this.#wanted)
            return;
        if (code !== undefined && code >= 4500 && code < 5000) {
            this.#stop(new ChorusError("disconnected", `the gateway closed the connection for good (${code}): ${reason}`, { closeCode: code }), {
                code,
                reason,
            });
            return;
        }
        if (code === CloseCode.TOKEN_EXPIRED) {
            if (!this.#getToken) {
                this.#tokenStale = true;
                this.#stop(new ChorusError("token_expired", "the token expired (4003) and no getToken option gives a fresh one", { closeCode: code }), { code, reason });
                return;
            }
            this.#tokenStale = true;
        }
        this.#retryLater(code, reason);
    }
    /** Schedules the next connection attempt after the backoff. */
    #retryLater(code, reason) {
        this.#failures += 1;
        const delayMs = this.#delay(this.#failures);
        const change = { reason, delayMs };
        if (code !== undefined)
            change.code = code;
        this.#setState("connecting", change);
        clearTimeout(this.#reconnectTimer);
        this.#reconnectTimer = setTimeout(() => {
            if (this.#wanted)
                void this.#open();
        }, delayMs);
    }
    /** Stops reconnecting: the app must change something and call `connect()` again. */
    #stop(error, change) {
        this.#wanted = false;
        this.#abandon();
        this.#emit("error", error);
        this.#failAll(error);
        this.#setState("disconnected", change);
    }
    /** Detaches from the current socket (closing it) and resets what lived on that connection. */
    #abandon() {
        this.#generation += 1;
        clearTimeout(this.#reconnectTimer);
        clearTimeout(this.#connectTimer);
        clearTimeout(this.#livenessTimer);
        this.#livenessTimer = undefined;
        clearTimeout(this.#retryTimer);
        this.#retryTimer = undefined;
        this.#retryTimerAt = Infinity;
        const socket = this.#socket;
        this.#socket = null;
        if (socket) {
            socket.onopen = socket.onmessage = socket.onclose = null;
            // Not null: some implementations (the ws package) throw an `error` nobody listens to.
            socket.onerror = () => { };
            try {
                socket.close(1000, "bye");
            }
            catch {
                // Closing a socket that never opened may throw in some implementations.
            }
        }
        for (const state of this.#rooms.values()) {
            state.joined = false;
            state.resyncing = false;
        }
        this.#joinQueue = [];
        this.#joining = null;
        this.#joinRetryAt = 0;
        this.#joinFailures = 0;
        // Leaves in flight are done: the connection that had the rooms is gone.
        for (const leave of this.#leaves)
            for (const resolve of leave.waiters)
                resolve();
        this.#leaves = [];
        for (const resolve of this.#afterJoinLeave.values())
            resolve();
        this.#afterJoinLeave.clear();
        for (const send of this.#pending.values()) {
            send.sent = false;
            send.retryAt = 0;
        }
        for (const request of this.#histories.values()) {
            request.sent = false;
            request.retryAt = 0;
        }
    }
    /** Rejects every waiting promise (the client stops). */
    #failAll(error) {
        for (const [room, state] of this.#rooms) {
            const waiters = state.waiters;
            state.waiters = [];
            for (const waiter of waiters)
                waiter.reject(new ChorusError(error.code, error.message, { room, closeCode: error.closeCode }));
        }
        const histories = [...this.#histories.values()];
        this.#histories.clear();
        for (const request of histories) {
            request.deferred.reject(new ChorusError(error.code, error.message, { room: request.room, ref: request.id, closeCode: error.closeCode }));
        }
        const pending = [...this.#pending.values()];
        this.#pending.clear();
        for (const send of pending) {
            send.deferred.reject(new ChorusError(error.code, `${error.message}; send ${send.id} may be retried with the same id`, {
                room: send.room,
                ref: send.id,
                closeCode: error.closeCode,
            }));
        }
    }
    #delay(failures) {
        const ceiling = Math.min(this.#maxDelayMs, this.#initialDelayMs * 2 ** Math.min(failures - 1, 30));
        return Math.round(ceiling * (0.5 + Math.random() * 0.5));
    }
    #setState(state, details) {
        const previous = this.#state;
        if (previous === state && state !== "connecting")
            return;
        this.#state = state;
        this.#emit("state", { state, previous, ...details });
    }
    // ---- what goes out ----------------------------------------------------------------------------
    /** Writes a frame if the socket is open; a socket that is closing reports its end soon. */
    #write(frame) {
        const socket = this.#socket;
        if (!socket || socket.readyState !== OPEN)
            return false;
        try {
            socket.send(JSON.stringify(frame));
            return true;
        }
        catch {
            return false;
        }
    }
    #enqueueJoin(room) {
        if (this.#joining?.room !== room && !this.#joinQueue.includes(room))
            this.#joinQueue.push(room);
    }
    /** Writes what is due: the next join (one in flight, never while its room's leave is), then sends. */
    #pump() {
        const socket = this.#socket;
        if (!socket || socket.readyState !== OPEN || this.#state !== "connected")
            return;
        const now = Date.now();
        // The silence that counts starts when the client starts waiting for an answer.
        if (!this.#awaitingAnswer())
            this.#lastHeard = now;
        if (this.#joining === null && this.#joinRetryAt <= now) {
            const index = this.#joinQueue.findIndex((room) => !this.#leaves.some((l) => l.room === room));
            if (index >= 0) {
                const room = this.#joinQueue.splice(index, 1)[0];
                const state = this.#rooms.get(room);
                if (state) {
                    const since = state.position ?? state.requested;
                    this.#joining = { room, since };
                    this.#write(since === undefined ? { type: "join", room } : { type: "join", room, since });
                }
            }
        }
        for (const send of this.#pending.values()) {
            if (send.sent || send.retryAt > now || !this.#rooms.get(send.room)?.joined)
                continue;
            if (send.everSent)
                this.#stats.sendRetries += 1;
            send.sent = true;
            send.everSent = true;
            this.#write({ type: "send", room: send.room, id: send.id, body: send.body });
        }
        for (const request of this.#histories.values()) {
            if (request.sent || request.retryAt > now)
                continue;
            request.sent = true;
            const frame = { type: "history", room: request.room, id: request.id, limit: request.limit };
            if (request.before !== undefined)
                frame.before = request.before;
            this.#write(frame);
        }
        this.#armTimers(now);
    }
    /** Wakes up for the next retry that is due, and watches for a silent connection. */
    #armTimers(now) {
        let next = this.#joining === null && this.#joinQueue.length > 0 && this.#joinRetryAt > now ? this.#joinRetryAt : Infinity;
        for (const send of this.#pending.values()) {
            if (!send.sent && send.retryAt > now)
                next = Math.min(next, send.retryAt);
        }
        for (const request of this.#histories.values()) {
            if (!request.sent && request.retryAt > now)
                next = Math.min(next, request.retryAt);
        }
        if (next < this.#retryTimerAt) {
            clearTimeout(this.#retryTimer);
            this.#retryTimerAt = next;
            this.#retryTimer = setTimeout(() => {
                this.#retryTimerAt = Infinity;
                this.#retryTimer = undefined;
                this.#pump();
            }, next - now);
        }
        if (this.#livenessTimer === undefined && this.#awaitingAnswer()) {
            this.#livenessTimer = setTimeout(() => this.#checkLiveness(), this.#requestTimeoutMs);
        }
    }
    #awaitingAnswer() {
        if (this.#joining !== null || this.#leaves.length > 0)
            return true;
        for (const send of this.#pending.values())
            if (send.sent)
                return true;
        for (const request of this.#histories.values())
            if (request.sent)
                return true;
        return false;
    }
    #checkLiveness() {
        this.#livenessTimer = undefined;
        if (!this.#socket || !this.#awaitingAnswer())
            return;
        const silentFor = Date.now() - this.#lastHeard;
        if (silentFor >= this.#requestTimeoutMs) {
            this.#lost(undefined, `nothing heard for ${silentFor} ms while a request waited`);
        }
        else {
            this.#livenessTimer = setTimeout(() => this.#checkLiveness(), this.#requestTimeoutMs - silentFor);
        }
    }
    #sendLeave(room, resolve) {
        if (!this.#awaitingAnswer())
            this.#lastHeard = Date.now();
        if (!this.#write({ type: "leave", room }))
            return false;
        this.#leaves.push({ room, waiters: [resolve] });
        return true;
    }
    // ---- what comes in ----------------------------------------------------------------------------
    #onFrame(frame) {
        switch (frame.type) {
            case "message":
                this.#onMessage(frame);
                break;
            case "joined":
                this.#onJoined(frame.room, frame.seq);
                break;
            case "left":
                this.#onLeft(frame.room);
                break;
            case "ack":
                this.#onAck(frame);
                break;
            case "history":
                this.#onHistory(frame);
                break;
            case "error":
                this.#onError(frame);
                break;
            default:
                break;
        }
    }
    #onMessage(m) {
        const state = this.#rooms.get(m.room);
        // Not a room the app is in (left meanwhile), or not joined yet on this connection.
        if (!state || !(state.joined || this.#joining?.room === m.room))
            return;
        const expected = state.position ?? (this.#joining?.room === m.room ? this.#joining.since : undefined);
        if (expected !== undefined) {
            if (m.seq <= expected) {
                this.#stats.duplicatesDropped += 1;
                return;
            }
            if (m.seq !== expected + 1) {
                // A hole: never deliver out of order. Re-join from the position; the gateway replays it.
                if (!state.resyncing) {
                    this.#stats.gapsResynced += 1;
                    state.resyncing = true;
                    if (this.#joining?.room !== m.room) {
                        state.joined = false;
                        this.#joinQueue.unshift(m.room);
                    }
                }
                return;
            }
        }
        state.position = m.seq;
        this.#emit("message", {
            room: m.room,
            seq: m.seq,
            id: m.id,
            sender: m.sender,
            body: m.body,
            ts: m.ts,
        });
    }
    #onJoined(room, seq) {
        let resumed = false;
        if (this.#joining?.room !== room && this.#rooms.get(room)?.joined)
            return; // answers nothing
        if (this.#joining?.room === room) {
            resumed = this.#joining.since !== undefined;
            this.#joining = null;
            this.#joinFailures = 0;
            this.#joinRetryAt = 0;
            this.#failures = 0; // a healthy connection: the backoff starts over
        }
        const state = this.#rooms.get(room);
        const leaveNow = this.#afterJoinLeave.get(room);
        if (leaveNow) {
            // Left while the join was in flight; joined again since, maybe: that join waits for `left`.
            this.#afterJoinLeave.delete(room);
            if (!this.#sendLeave(room, leaveNow))
                leaveNow();
            if (state)
                this.#enqueueJoin(room);
            return;
        }
        if (!state)
            return;
        state.position = Math.max(state.position ?? 0, seq);
        state.joined = true;
        state.resyncing = false;
        const joined = { room, seq: state.position, resumed };
        this.#settleJoin(room, joined);
        this.#emit("joined", joined);
    }
    #settleJoin(room, joined) {
        const state = this.#rooms.get(room);
        if (!state)
            return;
        const waiters = state.waiters;
        state.waiters = [];
        for (const waiter of waiters)
            waiter.resolve(joined);
    }
    #onLeft(room) {
        const index = this.#leaves.findIndex((l) => l.room === room);
        if (index < 0)
            return;
        const [leave] = this.#leaves.splice(index, 1);
        for (const resolve of leave.waiters)
            resolve();
        this.#emit("left", { room });
    }
    #onAck(frame) {
        const send = this.#pending.get(frame.id);
        if (!send) {
            this.#stats.strayAcks += 1;
            return;
        }
        this.#pending.delete(frame.id);
        send.deferred.resolve({ id: frame.id, room: frame.room, seq: frame.seq });
    }
    #onHistory(frame) {
        const request = this.#histories.get(frame.id);
        if (!request)
            return; // answered before (a duplicated frame), or the client was closed
        this.#histories.delete(frame.id);
        request.deferred.resolve(frame.messages.map((m) => ({ room: m.room, seq: m.seq, id: m.id, sender: m.sender, body: m.body, ts: m.ts })));
    }
    #onHistoryError(frame, request) {
        switch (frame.code) {
            case "unavailable":
            case "rate_limited":
                request.failures += 1;
                request.sent = false;
                request.retryAt = Date.now() + this.#delay(request.failures);
                return;
            default:
                this.#histories.delete(request.id);
                request.deferred.reject(new ChorusError(frame.code, frame.message, { room: request.room, ref: request.id }));
        }
    }
    #onError(frame) {
        const ref = frame.ref ?? undefined;
        const request = ref === undefined ? undefined : this.#histories.get(ref);
        if (request) {
            this.#onHistoryError(frame, request);
            return;
        }
        if (ref !== undefined) {
            this.#onSendError(frame, ref);
            return;
        }
        if (frame.code === "not_joined" && this.#leaves.length > 0) {
            // A leave of a room the gateway did not have: done all the same.
            const leave = this.#leaves.shift();
            for (const resolve of leave.waiters)
                resolve();
            return;
        }
        const joining = this.#joining;
        if (joining === null || (frame.room !== undefined && frame.room !== joining.room)) {
            this.#emit("error", new ChorusError(frame.code, frame.message, { room: frame.room }));
            return;
        }
        // Errors without a send id answer the join in flight (answers come in request order).
        this.#joining = null;
        const room = joining.room;
        const state = this.#rooms.get(room);
        const leaveNow = this.#afterJoinLeave.get(room);
        if (leaveNow) {
            // Left while the join was in flight, and the join failed: nothing to leave.
            this.#afterJoinLeave.delete(room);
            leaveNow();
            if (state)
                this.#enqueueJoin(room);
            return;
        }
        if (!state)
            return;
        switch (frame.code) {
            case "unavailable":
            case "rate_limited":
                this.#joinFailures += 1;
                this.#joinRetryAt = Date.now() + this.#delay(this.#joinFailures);
                this.#joinQueue.unshift(room);
                return;
            case "history_expired": {
                // What was missed is gone: say so, then be in the room live from now on.
                this.#emit("historyExpired", { room, since: joining.since ?? 0, message: frame.message });
                state.position = null;
                state.requested = undefined;
                this.#joinQueue.unshift(room);
                return;
            }
            default: {
                // Refused for good (forbidden, limit_exceeded, …): the app is told, the room is dropped.
                const error = new ChorusError(frame.code, frame.message, { room });
                this.#rooms.delete(room);
                const waiters = state.waiters;
                state.waiters = [];
                for (const waiter of waiters)
                    waiter.reject(error);
                for (const [id, send] of this.#pending) {
                    if (send.room === room) {
                        this.#pending.delete(id);
                        send.deferred.reject(new ChorusError(frame.code, `${room} could not be joined: ${frame.message}`, { room, ref: id }));
                    }
                }
                this.#emit("error", error);
            }
        }
    }
    #onSendError(frame, ref) {
        const send = this.#pending.get(ref);
        if (!send)
            return;
        switch (frame.code) {
            case "unavailable":
            case "rate_limited":
                // Not stored: the same id again after a backoff.
                send.failures += 1;
                send.sent = false;
                send.retryAt = Date.now() + this.#delay(send.failures);
                return;
            case "not_joined": {
                // The gateway does not have the room on this connection: re-join it, then send again.
                send.sent = false;
                const state = this.#rooms.get(send.room);
                if (state?.joined) {
                    state.joined = false;
                    this.#enqueueJoin(send.room);
                }
                return;
            }
            default:
                this.#pending.delete(ref);
                send.deferred.reject(new ChorusError(frame.code, frame.message, { room: send.room, ref }));
        }
    }
    #emit(event, payload) {
        for (const handler of [...this.#handlers[event]]) {
            try {
                handler(payload);
            }
            catch (error) {
                // A failing handler must not leave the client half-updated: report it on its own.
                setTimeout(() => {
                    throw error;
                }, 0);
            }
        }
    }
}
function utf8Length(text) {
    let bytes = 0;
    for (let i = 0; i < text.length; i++) {
        const c = text.charCodeAt(i);
        if (c < 0x80)
            bytes += 1;
        else if (c < 0x800)
            bytes += 2;
        else if (c >= 0xd800 && c <= 0xdbff && i + 1 < text.length) {
            bytes += 4;
            i += 1;
        }
        else
            bytes += 3;
    }
    return bytes;
}
function randomPrefix() {
    const bytes = new Uint8Array(6);
    const crypto = globalThis.crypto;
    if (crypto?.getRandomValues)
        crypto.getRandomValues(bytes);
    else
        for (let i = 0; i < bytes.length; i++)
            bytes[i] = Math.floor(Math.random() * 256);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
/** Whether a JWT's `exp` has passed (read, not verified: the gateway verifies). */
function tokenExpired(token) {
    const payload = token.split(".")[1];
    if (!payload)
        return false;
    try {
        const json = atob(payload.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(payload.length / 4) * 4, "="));
        const exp = JSON.parse(json).exp;
        return typeof exp === "number" && exp * 1000 <= Date.now();
    }
    catch {
        return false;
    }
}
function describe(cause) {
    return cause instanceof Error ? cause.message : String(cause);
}
