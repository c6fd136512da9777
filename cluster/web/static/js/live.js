// The /ws connection: public streams (bookTicker, kline) and, with a key, the private
// `account` stream. Reconnects with exponential backoff, and at once when a connection gone
// silent does not answer a ping; subscribes again after every (re)connect; the account stream
// resumes after the newest event seen (`since`), so the server replays what was missed, or
// sends a snapshot when it no longer keeps it.

export function socketUrl() {
  const url = new URL("ws", document.baseURI);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.toString();
}

const MIN_DELAY_MS = 500;
const MAX_DELAY_MS = 30000;
const STABLE_MS = 10000; // a connection open this long resets the backoff
// a change of streams is sent once the wanted set has been still this long: flipping through
// assets or intervals sends one UNSUBSCRIBE/SUBSCRIBE pair, not one per step (the server
// closes a connection that sends more than 10 frames a second)
const SETTLE_MS = 150;
// the server ended (or could not start) the account stream and says to subscribe again
// (SERVICE_UNAVAILABLE: its ledger restarting): AUTH and SUBSCRIBE again after this, doubling
// up to MAX_DELAY_MS, reset by an account frame
const ACCOUNT_RETRY_MS = 1000;
// Nothing at all from the server for SILENT_MS: the connection may be half-open (a network that
// dropped without a word tells neither end, and the browser keeps it open for good). The
// server's pings are the protocol's, which a page never sees, so the page sends a PING, and
// when nothing at all comes within ANSWER_MS (its PONG or any frame), it drops the connection
// and connects again.
const SILENT_MS = 15000;
const ANSWER_MS = 5000;
// A handshake with no answer this long is given up and tried again (backing off): a browser
// waits for one with no limit of its own, and the quote would stay on polling for good.
const CONNECT_MS = 10000;
const PING = { method: "PING" };

export class LiveSocket {
  // handlers: onFrame(frame), onState(state, detail), onAccountSubscribed()
  constructor(url, handlers) {
    this.url = url;
    this.handlers = handlers;
    this.ws = null;
    this.streams = new Set();    // wanted
    this.subscribed = new Set(); // asked of the server on this connection
    this.settleTimer = null;
    this.key = null;
    this.accountSeq = null; // seq of the newest account event seen (for `since`)
    this.accountRetry = 0;
    this.accountTimer = null;
    this.attempt = 0;
    this.timer = null;
    this.openedAt = 0;
    this.state = "closed";
    this.heardAt = 0;  // when the server last sent anything
    this.pingedAt = 0; // when a ping went unanswered since
    this.connectingAt = 0; // when the handshake now waiting began
  }

  start() {
    if (!this.ws && !this.timer) this.connect();
    if (!this.watchdog) this.watchdog = setInterval(() => this.checkSilence(), 1000);
  }

  checkSilence() {
    const now = Date.now();
    if (this.state === "connecting" && this.ws && now - this.connectingAt >= CONNECT_MS) {
      const ws = this.ws;
      this.ws = null; // its close event, when it comes, is of a socket given up
      try { ws.close(); } catch { /* already closing */ }
      this.scheduleReconnect();
      return;
    }
    if (!this.isOpen()) return;
    if (this.pingedAt && now - this.pingedAt >= ANSWER_MS) {
      this.reconnect();
    } else if (!this.pingedAt && now - this.heardAt >= SILENT_MS && this.send(PING)) {
      this.pingedAt = now;
    }
  }

  isOpen() {
    return this.state === "open";
  }

  connect() {
    clearTimeout(this.timer);
    this.timer = null;
    clearTimeout(this.accountTimer); // a new connection authenticates when it opens
    this.accountTimer = null;
    this.accountRetry = 0;
    this.setState("connecting");
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    this.connectingAt = Date.now();
    ws.onopen = () => {
      if (ws !== this.ws) return;
      this.openedAt = this.heardAt = Date.now();
      this.pingedAt = 0;
      this.setState("open");
      this.subscribed = new Set(this.streams);
      if (this.streams.size) this.send({ method: "SUBSCRIBE", params: [...this.streams] });
      if (this.key) this.authenticate();
    };
    ws.onmessage = (event) => {
      if (ws !== this.ws) return;
      this.attempt = 0;
      this.heardAt = Date.now();
      this.pingedAt = 0;
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; }
      if (frame && frame.method === "PONG") return;
      if (frame && frame.stream === "account") {
        this.accountRetry = 0;
        if (frame.data && Number.isSafeInteger(frame.data.seq)) this.accountSeq = frame.data.seq;
      }
      // only the account stream (or the AUTH before it) answers SERVICE_UNAVAILABLE
      if (frame && frame.error && frame.error.code === "SERVICE_UNAVAILABLE") this.retryAccount();
      this.handlers.onFrame(frame);
    };
    ws.onclose = (event) => {
      if (ws !== this.ws) return;
      this.ws = null;
      if (this.openedAt && Date.now() - this.openedAt >= STABLE_MS) this.attempt = 0;
      this.openedAt = 0;
      this.scheduleReconnect(event);
    };
    ws.onerror = () => { /* a close event follows */ };
  }

  scheduleReconnect(event) {
    const ceiling = Math.min(MAX_DELAY_MS, MIN_DELAY_MS * 2 ** this.attempt);
    this.attempt += 1;
    const delay = Math.round(ceiling / 2 + Math.random() * ceiling / 2);
    this.setState("waiting", { delay, code: event ? event.code : null, reason: event ? event.reason : "" });
    this.timer = setTimeout(() => this.connect(), delay);
  }

  // Drop the connection (if any) and connect again at once.
  reconnect() {
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      try { ws.close(1000); } catch { /* already closing */ }
    }
    this.attempt = 0;
    this.connect();
  }

  send(frame) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  authenticate() {
    this.send({ method: "AUTH", params: [this.key] });
    const request = { method: "SUBSCRIBE", params: ["account"] };
    if (this.accountSeq !== null) request.since = this.accountSeq;
    if (this.send(request)) this.handlers.onAccountSubscribed();
  }

  retryAccount() {
    if (!this.key || this.accountTimer) return;
    const ws = this.ws;
    const delay = Math.min(MAX_DELAY_MS, ACCOUNT_RETRY_MS * 2 ** this.accountRetry);
    this.accountRetry += 1;
    this.accountTimer = setTimeout(() => {
      this.accountTimer = null;
      if (ws === this.ws && this.key && this.isOpen()) this.authenticate();
    }, delay);
  }

  // The public streams wanted now; the difference is subscribed and unsubscribed once they
  // have settled (SETTLE_MS).
  setStreams(names) {
    this.streams = new Set(names);
    clearTimeout(this.settleTimer);
    this.settleTimer = setTimeout(() => this.sendStreams(), SETTLE_MS);
  }

  sendStreams() {
    this.settleTimer = null;
    if (!this.isOpen()) return; // the next open subscribes what is wanted then
    const removed = [...this.subscribed].filter((name) => !this.streams.has(name));
    const added = [...this.streams].filter((name) => !this.subscribed.has(name));
    if (removed.length) this.send({ method: "UNSUBSCRIBE", params: removed });
    if (added.length) this.send({ method: "SUBSCRIBE", params: added });
    this.subscribed = new Set(this.streams);
  }

  // A connection cannot drop its AUTH: another key (or none) needs a new connection.
  setKey(key) {
    if (key === this.key) return;
    const had = this.key;
    this.key = key;
    this.accountSeq = null;
    if (had) this.reconnect();
    else if (key && this.isOpen()) this.authenticate();
  }

  setState(state, detail = null) {
    this.state = state;
    this.handlers.onState(state, detail);
  }
}
