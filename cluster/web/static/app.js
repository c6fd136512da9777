// The shardex trading terminal. Prices, balances and positions come from the API; the browser
// only displays them (live unrealized PnL is computed here for display, never settled).

import { ApiError, call, callOnce } from "./js/api.js";
import { createCandleChart } from "./js/chart.js";
import { byId, h, setText } from "./js/dom.js";
import * as fmt from "./js/format.js";
import { LiveSocket, socketUrl } from "./js/live.js";

const INTERVALS = ["1m", "5m", "15m", "1h", "4h", "1d"];
const STORE = {
  key: "shardex.apiKey",
  accountId: "shardex.accountId",
  asset: "shardex.asset",
  interval: "shardex.interval",
  levels: "shardex.levels",   // "hidden" when the trader hid the chart's levels
};
const KLINE_LIMIT = 500;
const HISTORY_PAGE = 50;
const HISTORY_MAX = 500;
const PRICE_POLL_MS = 1000;      // GET /prices while the socket is down
// no newer price for this long: the quote is marked stale (measured on this page's clock from
// the arrival of the newest price, so a client clock that is off does not mark it)
const STALE_QUOTE_MS = 10000;
const KLINE_POLL_EVERY = 5;      // ... and the newest candles every 5th time
const STATE_POLL_MS = 2000;      // GET /state while the account stream is unavailable
const STATE_REFRESH_MS = 5000;   // ... and while it is live (equity moves with prices)
const EVENT_DEBOUNCE_MS = 150;

const app = {
  key: null,
  keyShown: false, // the key whole, not its ends
  accountId: null,
  assets: [],
  assetByName: new Map(),
  asset: null,
  interval: "1m",
  prices: {},                // asset -> {bid, ask, ts, source}
  equity: null,              // the server's equity (decimal string) of the last state read
  free: null,                // the free balance (decimal string) of the last state read
  positions: [],
  positionRows: new Map(),   // positionId -> {position, markCell, pnlCell}
  orders: [],
  closedLimit: HISTORY_PAGE,
  orderHistoryLimit: HISTORY_PAGE,
  accountStream: "off",      // off | live | down
  keyRefused: false,         // the API answered 401 to this key: no more polling with it
  lastAccountRefresh: 0,
  idsSignature: "",
  chart: null,
  live: null,
  socketWasOpen: false,
};

// ------------------------------------------------------------------ storage
function stored(name) {
  try { return window.localStorage.getItem(name); } catch { return null; }
}
function store(name, value) {
  try {
    if (value === null || value === undefined) window.localStorage.removeItem(name);
    else window.localStorage.setItem(name, value);
  } catch { /* storage unavailable: the key lives for this page only */ }
}

// ------------------------------------------------------------------ banners
let lastError = { text: "", count: 0 };

function errorShown(err) {
  const code = err instanceof ApiError ? err.code : "ERROR";
  let message = err && err.message ? err.message : String(err);
  if (err instanceof ApiError && err.retryAfter) message += ` (retry after ${err.retryAfter} s)`;
  return { code, message };
}

function errorText({ code, message }) {
  return `${code}\n${message}`;
}

// ``background``: the error of a refresh nobody asked for, named by what it reads ("account",
// "candles"). It does not replace the error of something the user did (that one says what to
// check), and it goes once that same refresh succeeds (dismissBackground): another one's
// success says nothing of it.
function showError(err, background = null) {
  const banner = byId("error-banner");
  if (background && !banner.hidden && banner.dataset.source === "action") return;
  const shown = errorShown(err);
  const { code, message } = shown;
  const textKey = errorText(shown);
  lastError = !banner.hidden && lastError.text === textKey
    ? { text: textKey, count: lastError.count + 1 }
    : { text: textKey, count: 1 };
  setText(byId("error-code"), code);
  setText(byId("error-message"), message);
  setText(byId("error-count"), lastError.count > 1 ? `×${lastError.count}` : "");
  banner.dataset.code = code;
  banner.dataset.source = background || "action";
  banner.hidden = false;
  // what the trader did next failed: the notice of what came before is no longer the news; a
  // refresh failing says nothing of it (and goes by itself), so the notice stays beside it
  if (!background) byId("notice").hidden = true;
}

function localError(code, message) {
  return new ApiError(0, code, message);
}

function dismissError() {
  byId("error-banner").hidden = true;
  lastError = { text: "", count: 0 };
}

// The background refresh ``source`` worked: its error, if the banner still shows it, is over.
function dismissBackground(source) {
  const banner = byId("error-banner");
  if (!banner.hidden && banner.dataset.source === source) dismissError();
}

// The error ``err`` is over (what failed worked since): gone, if the banner still shows it.
function dismissErrorOf(err) {
  if (!byId("error-banner").hidden && lastError.text === errorText(errorShown(err))) dismissError();
}

let noticeTimer = null;
const NOTICE_LINES = 4;
let noticeLines = []; // what the notice shows, newest first: {message, warning}
// What the user just did succeeded: an error still shown is about an earlier attempt. What
// the engine did on its own (``engine``) says nothing of it: the error stays, above, and the
// notice still shown stays below it (one tick can fill, expire or close several at once: each
// is news, where the last replaced the others). ``warning``: a refusal or a loss the trader
// did not ask for, shown in the warning's colour.
function showNotice(message, engine = false, warning = false) {
  if (!engine) dismissError();
  const shown = !byId("notice").hidden;
  const line = { message, warning };
  noticeLines = engine && shown ? [line, ...noticeLines].slice(0, NOTICE_LINES) : [line];
  setText(byId("notice-text"), noticeLines.map((l) => l.message).join("\n"));
  byId("notice").dataset.tone = noticeLines.some((l) => l.warning) ? "warning" : "";
  byId("notice").hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { byId("notice").hidden = true; }, 8000);
}

// Trading actions being sent again now: their notice says the outcome is not known yet.
let resending = 0;

// A trading action, at most once (callOnce). While its outcome is unknown it is sent again and
// the notice says so; a background refresh failing meanwhile (the same outage, as a rule) does
// not replace that notice with an error: the action's own answer comes next, then a refresh.
async function trade(method, path, body) {
  let counted = false;
  const onRetry = (err, attempt, waitMs) => {
    if (!counted) resending += 1;
    counted = true;
    showNotice(`No answer on the outcome yet (${err.code}: ${err.message}). Sending the same request again in ${waitMs / 1000} s (attempt ${attempt + 1}); it happens at most once.`);
  };
  try {
    return await callOnce(method, path, { key: app.key, body, onRetry });
  } finally {
    if (counted) resending -= 1;
  }
}

// A trading button's click handler that ignores the further clicks of a double (or triple)
// click: a button is disabled only while its request runs, and a platform that answers within
// a double-click's interval had it enabled again for the second click, a second trade.
function singleClick(handler) {
  return (event) => {
    if (event.detail > 1) return;
    handler(event);
  };
}

// ------------------------------------------------------------------ market
function selectedAsset() {
  return app.assetByName.get(app.asset) || null;
}

async function loadAssets() {
  let failed = null; // the error shown: it goes once the list loads
  for (;;) {
    try {
      const data = await call("GET", "assets");
      const list = Array.isArray(data && data.assets) ? data.assets : [];
      if (list.length) {
        if (failed) dismissErrorOf(failed);
        return list;
      }
      failed = localError("UNKNOWN_ASSET", "the server lists no tradable asset");
      showError(failed);
    } catch (err) {
      failed = err;
      showError(err);
    }
    await new Promise((resolve) => setTimeout(resolve, 3000));
  }
}

function fillAssetSelect() {
  const select = byId("asset-select");
  select.replaceChildren(...app.assets.map((a) => h("option", { value: a.name, text: a.name })));
  select.value = app.asset;
}

function applyAsset() {
  const asset = selectedAsset();
  if (app.ticketAsset !== undefined && app.ticketAsset !== app.asset) {
    // prices typed for another asset: an order at them would fill at once or never
    for (const id of ["ticket-trigger", "ticket-tp", "ticket-sl"]) byId(id).value = "";
  }
  app.ticketAsset = app.asset;
  setText(byId("ticket-asset"), app.asset || "");
  const leverage = byId("ticket-leverage");
  if (asset && Number.isInteger(asset.maxLeverage)) {
    leverage.max = String(asset.maxLeverage);
    setText(byId("ticket-leverage-max"), `(1–${asset.maxLeverage})`);
  }
  if (app.chart && asset) app.chart.setPriceStep(asset.priceStep);
  renderQuote();
  renderEstimate();
  renderChartLines();
  subscribeMarket();
  loadKlines();
}

function subscribeMarket() {
  if (!app.live) return;
  const streams = app.assets.map((a) => `bookTicker.${a.name}`);
  if (app.asset) streams.push(`kline.${app.interval}.${app.asset}`);
  app.live.setStreams(streams);
}

// Candles: the REST history first, then the live stream. Frames that arrive before the history
// are kept and drawn after it; a newer selection makes older answers moot. A history that
// failed to load is asked again every KLINE_RETRY_MS (the live candles drawn meanwhile).
const klines = { generation: 0, ready: false, pending: [], retryTimer: null, error: null,
                 drawn: null }; // drawn: the asset and interval whose candles the chart shows
const KLINE_RETRY_MS = 3000;

async function loadKlines(retry = false) {
  const generation = ++klines.generation;
  clearTimeout(klines.retryTimer);
  klines.ready = false;
  klines.pending = [];
  if (!app.chart || !app.asset) return;
  const { asset, interval } = app;
  try {
    const data = await call("GET", "klines", { query: { asset, interval, limit: KLINE_LIMIT } });
    if (generation !== klines.generation) return;
    app.chart.setKlines(Array.isArray(data && data.klines) ? data.klines : []);
    klines.drawn = `${asset} ${interval}`;
    if (klines.error) dismissBackground("candles");
    klines.error = null;
  } catch (err) {
    if (generation !== klines.generation) return;
    if (klines.drawn !== `${asset} ${interval}`) { // another selection's candles: gone
      app.chart.setKlines([]);
      klines.drawn = `${asset} ${interval}`;
    }
    if (!retry) {
      showError(err, "candles");
      klines.error = err;
    }
    klines.retryTimer = setTimeout(() => {
      if (generation === klines.generation) loadKlines(true);
    }, KLINE_RETRY_MS);
  }
  klines.ready = true;
  for (const kline of klines.pending) app.chart.update(kline);
  klines.pending = [];
}

// Older candles, a page (KLINE_LIMIT) at a time, while the view comes near the oldest drawn: the
// page before it, until an answer brings none older. A page that failed is asked again after
// KLINE_RETRY_MS. ``generation`` is the loadKlines whose candles they extend.
const olderKlines = { generation: null, loading: false, done: false };

async function loadOlderKlines(oldestS) {
  const generation = klines.generation;
  if (!klines.ready || !app.asset) return;
  if (olderKlines.generation !== generation) {
    Object.assign(olderKlines, { generation, loading: false, done: false });
  }
  if (olderKlines.loading || olderKlines.done) return;
  if (!(oldestS > 0)) {
    olderKlines.done = true;
    return;
  }
  olderKlines.loading = true;
  const { asset, interval } = app;
  try {
    const data = await call("GET", "klines", {
      query: { asset, interval, endTime: oldestS - 1, limit: KLINE_LIMIT } });
    if (generation !== klines.generation) return;
    olderKlines.loading = false;
    const older = Array.isArray(data && data.klines) ? data.klines : [];
    if (!app.chart.prependKlines(older)) olderKlines.done = true;
  } catch {
    if (generation !== klines.generation) return;
    setTimeout(() => {
      if (generation !== klines.generation) return;
      olderKlines.loading = false;
      loadOlderKlines(oldestS);
    }, KLINE_RETRY_MS);
  }
}

async function pollNewestKlines() {
  if (!app.chart || !app.asset || !klines.ready) return;
  const generation = klines.generation;
  try {
    const data = await call("GET", "klines", { query: { asset: app.asset, interval: app.interval, limit: 2 } });
    if (generation !== klines.generation) return;
    for (const kline of (data && data.klines) || []) app.chart.update(kline);
  } catch { /* the socket status already says the market data is degraded */ }
}

function onKline(kline) {
  if (!app.chart) return;
  if (klines.ready) app.chart.update(kline);
  else klines.pending.push(kline);
}

// Whether time ``a`` is before ``b``: the API's times (ISO 8601 UTC to the microsecond, one
// width) sort as text, finer than Date.parse's milliseconds.
function earlier(a, b) {
  if (typeof a === "string" && typeof b === "string" && a.length === b.length) return a < b;
  return Date.parse(a) < Date.parse(b);
}

function applyQuote(asset, quote) {
  if (!quote || !fmt.isDecimal(quote.bid) || !fmt.isDecimal(quote.ask)) return;
  const before = app.prices[asset];
  // a poll answered after a newer streamed price (or a frame after a newer poll) is older news
  if (before && earlier(quote.ts, before.ts)) return;
  // a poll of the same price is not a newer one: it keeps the time the price first came
  const receivedAt = before && before.ts === quote.ts ? before.receivedAt : Date.now();
  app.prices[asset] = { bid: quote.bid, ask: quote.ask, ts: quote.ts, source: quote.source,
                        receivedAt };
  if (asset === app.asset) {
    renderQuote();
    renderEstimate();
  }
  renderPnl();
}

function renderQuote() {
  const quote = app.prices[app.asset];
  setText(byId("bid"), quote ? quote.bid : "—");
  setText(byId("ask"), quote ? quote.ask : "—");
  const spread = quote ? Number(quote.ask) - Number(quote.bid) : NaN;
  const asset = selectedAsset();
  setText(byId("spread"), Number.isFinite(spread) ? spread.toFixed(fmt.decimalsOf(asset ? asset.priceStep : "0.01")) : "—");
  const idleMs = quote ? Date.now() - quote.receivedAt : 0;
  const stale = idleMs >= STALE_QUOTE_MS;
  byId("quote").classList.toggle("stale", stale);
  const source = quote && quote.source ? `source: ${quote.source}` : "";
  // about as long as the source it replaces: the marking moves nothing on the page
  const node = byId("quote-source");
  setText(node, stale ? `no price for ${Math.floor(idleMs / 1000)} s` : source);
  node.title = stale ? source : "";
}

let pricePollBusy = false;
let pricePollCount = 0;
async function pollPrices() {
  if (!app.live || app.live.isOpen() || pricePollBusy) return;
  pricePollBusy = true;
  pricePollCount += 1;
  try {
    const data = await call("GET", "prices");
    for (const [asset, quote] of Object.entries(data || {})) applyQuote(asset, quote);
    if (!app.live.isOpen()) setSocketStatus(app.live.state, null, true);
  } catch {
    if (!app.live.isOpen()) setSocketStatus("offline", null, false);
  } finally {
    pricePollBusy = false;
  }
  if (pricePollCount % KLINE_POLL_EVERY === 0) pollNewestKlines();
}

function setSocketStatus(state, detail, pricesPolled = false) {
  const node = byId("ws-status");
  node.dataset.state = state;
  let label;
  if (state === "open") label = "live";
  else if (state === "connecting") label = "connecting…";
  else if (state === "offline") label = "offline — retrying";
  else label = pricesPolled ? "reconnecting — prices polled every second" : "reconnecting…";
  setText(node, label);
  // a narrow screen cuts the label short: its whole text stays a hover away
  node.title = detail && detail.reason ? `${label} (closed: ${detail.code} ${detail.reason})` : label;
}

// ------------------------------------------------------------------ live frames
function onFrame(frame) {
  if (!frame || typeof frame !== "object") return;
  if (frame.error) {
    onSocketError(frame.error);
    return;
  }
  if (typeof frame.stream !== "string") return;
  const data = frame.data && typeof frame.data === "object" ? frame.data : {};
  const stream = frame.stream;
  if (stream === "account") {
    onAccountEvent(data);
  } else if (stream.startsWith("bookTicker.")) {
    applyQuote(stream.slice("bookTicker.".length), data);
  } else if (stream.startsWith("kline.")) {
    const [, interval, asset] = stream.split(".");
    if (interval === app.interval && asset === app.asset) onKline(data);
  }
}

function onSocketError(error) {
  const code = typeof error.code === "string" ? error.code : "ERROR";
  const message = typeof error.message === "string" ? error.message : "the live stream refused a request";
  if (app.key && (code === "UNAUTHORIZED" || code === "SERVICE_UNAVAILABLE"
                  || code === "RATE_LIMITED" || /account|auth/i.test(message))) {
    // the account panel says the page polls instead; REST answers show a bad key's error, a
    // stream the server could not start now is subscribed again (LiveSocket.retryAccount),
    // and a key whose every live connection is taken (other tabs) is polled as well
    setAccountStream("down");
    byId("account-stream").title = message;
    return;
  }
  showError(new ApiError(0, code, message));
}

let eventTimer = null;
// What the engine did on its own (a tick filled, expired or refused an order, or closed a
// position at its TP, SL or liquidation): told as it happens, not only drawn in a table.
// ``opened``: for an orderFilled, its position's positionOpened (the fill's price and size).
function engineNotice(data, opened = null) {
  switch (data.event) {
    case "orderFilled":
      return opened
        ? `Order ${data.orderId} filled at ${opened.entryPrice}: ${data.orderType} ${data.type} ${opened.quantity} ${data.asset} (position ${data.positionId}).`
        : `Order ${data.orderId} filled: ${data.orderType} ${data.type} ${data.asset} (position ${data.positionId}).`;
    case "orderRejected":
      return `Order ${data.orderId} (${data.orderType} ${data.type} ${data.asset}) was not filled: ${rejectedBecause(data.rejectReason)}; its margin is free again.`;
    case "orderExpired":
      return `Order ${data.orderId} (${data.orderType} ${data.type} ${data.asset}) expired.`;
    case "positionClosed": {
      if (data.closeReason === "manual") return null; // the user's own close says so itself
      const insuredNote = insuredWords(data);
      return `Position ${data.positionId} (${data.type} ${data.quantity} ${data.asset}) closed by ${closeReasonText(data.closeReason)} at ${data.exitPrice}: PnL ${fmt.signedMoney(data.realizedPnl)} USD, paid out ${fmt.money(data.payout)} USD${insuredNote ? ` (${insuredNote})` : ""}.`;
    }
    default:
      return null;
  }
}

// Why a fill was refused, in words (the code after them): the fill is a market open at the
// tick's price, with every rule of one (README, Trading rules).
const REJECTED_BECAUSE = {
  INVALID_TRIGGER: "its take-profit or stop-loss lay on the wrong side of the fill price",
  WOULD_LIQUIDATE: "its liquidation price was already crossed at the fill price",
  INVALID_REQUEST: "at the fill price its size was under one quantity step or above the largest position",
};

function rejectedBecause(code) {
  const words = REJECTED_BECAUSE[code];
  return words ? `${words} (${code})` : code || "refused";
}

// A close reason as a trader writes it: take-profit, stop-loss, liquidation, manual.
function closeReasonText(reason) {
  return String(reason).replace("_", "-");
}

// A fill is told with its price and size, which its position's positionOpened carries (the
// engine sends it right after the orderFilled): the fill waits for it, at most FILL_WAIT_MS (a
// fill sent again, whose position was told before, comes without one).
const FILL_WAIT_MS = 1000;
const fillsWaiting = new Map(); // positionId -> {fill, timer}

function tellEngine(data, opened = null) {
  const told = engineNotice(data, opened);
  if (told) {
    showNotice(told, true, data.event === "orderRejected"
               || (data.event === "positionClosed" && data.closeReason === "liquidation"));
  }
}

function onAccountEvent(data) {
  if (!app.key) return;
  const position = data.positionId === undefined || data.positionId === null ? null
    : String(data.positionId);
  if (data.event === "orderFilled" && position !== null) {
    const key = app.key;
    const timer = setTimeout(() => {
      fillsWaiting.delete(position);
      if (app.key === key) tellEngine(data);
    }, FILL_WAIT_MS);
    fillsWaiting.set(position, { fill: data, timer });
  } else if (data.event === "positionOpened" && fillsWaiting.has(position)) {
    const { fill, timer } = fillsWaiting.get(position);
    clearTimeout(timer);
    fillsWaiting.delete(position);
    tellEngine(fill, data);
  } else {
    tellEngine(data);
  }
  setAccountStream("live");
  if (Number.isSafeInteger(data.seq)) byId("account-stream").dataset.seq = String(data.seq);
  clearTimeout(eventTimer);
  eventTimer = setTimeout(() => requestRefresh(true), data.event === "snapshot" ? 0 : EVENT_DEBOUNCE_MS);
}

function onSocketState(state, detail) {
  setSocketStatus(state, detail, false);
  if (state !== "open" && app.key) setAccountStream("down");
  if (state === "open") {
    if (app.socketWasOpen) loadKlines(); // candles missed while the socket was away
    app.socketWasOpen = true;
  }
}

function onAccountSubscribed() {
  setAccountStream("live");
  requestRefresh(true); // whatever happened while the stream was away
}

function setAccountStream(state) {
  app.accountStream = app.key ? state : "off";
  const node = byId("account-stream");
  node.dataset.state = app.accountStream;
  if (app.accountStream !== "down") node.title = "";
  // a refused key is not polled: the panel says so whatever the live connection does
  setText(node, app.key && app.keyRefused ? "this key was refused: log out or use another key"
    : app.accountStream === "live" ? "live"
      : app.accountStream === "down" ? "polling every 2 s" : "—");
}

// ------------------------------------------------------------------ account
// ``kept``: the key is stored already (another tab of this browser stored it).
function setKey(key, accountId, kept = false) {
  app.key = key;
  app.accountId = accountId || null;
  app.keyRefused = false;
  app.keyShown = false;
  if (!kept) {
    store(STORE.key, key);
    store(STORE.accountId, app.accountId);
  }
  app.closedLimit = HISTORY_PAGE;
  app.orderHistoryLimit = HISTORY_PAGE;
  app.idsSignature = "";
  renderAccount();
  if (!key) clearAccountData();
  setAccountStream(key ? (app.live && app.live.isOpen() ? "live" : "down") : "off");
  if (app.live) app.live.setKey(key);
}

function renderAccount() {
  const loggedIn = Boolean(app.key);
  byId("logged-out").hidden = loggedIn;
  byId("logged-in").hidden = !loggedIn;
  setText(byId("api-key"), !app.key ? "" : app.keyShown ? app.key : maskedKey(app.key));
  const toggle = byId("show-key");
  setText(toggle, app.keyShown ? "Hide key" : "Show key");
  toggle.setAttribute("aria-pressed", String(Boolean(app.keyShown)));
  setText(byId("account-id"), app.accountId || "");
  for (const id of ["submit-long", "submit-short"]) byId(id).disabled = !loggedIn;
  setText(byId("ticket-hint"), loggedIn ? "" : "Create an account or use an API key to trade.");
}

// The key is shown whole only when asked (or just made): a screen shared, or seen over a
// shoulder, would otherwise give away the account. Its ends tell which key is kept.
function maskedKey(key) {
  return key.length >= 12 ? `${key.slice(0, 4)}…${key.slice(-4)}` : "•".repeat(8);
}

function showKey(shown) {
  app.keyShown = shown;
  renderAccount();
}

function clearAccountData() {
  for (const id of ["balance-free", "balance-margin", "balance-equity", "upnl-total"]) setText(byId(id), "—");
  app.equity = null;
  app.free = null;
  renderFunds();
  renderPositions([]);
  renderOrders([]);
  renderClosed([]);
  renderOrderHistory([]);
  byId("positions-note").hidden = true;
}

async function createAccount() {
  const button = byId("create-account");
  button.disabled = true;
  try {
    const account = await call("POST", "accounts", { body: {} });
    if (!account || typeof account.apiKey !== "string") throw localError("ERROR", "the server answered without an API key");
    setKey(account.apiKey, account.accountId);
    showKey(true); // a new key is shown once, to be copied
    const balance = typeof account.balance === "string" || typeof account.balance === "number"
      ? ` with ${fmt.money(account.balance)} USD` : "";
    showNotice(`Account ${account.accountId} created${balance}. Copy your API key: it is the only way back into this account.`);
    requestRefresh(true);
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
  }
}

async function useKey(event) {
  event.preventDefault();
  const input = byId("key-input");
  const key = input.value.trim();
  if (!key) return;
  // an API key is visible ASCII: a key with anything else (an invisible character copied
  // along) cannot even be sent in a header, which would read as a server that did not answer
  if (/[^\x21-\x7e]/.test(key)) {
    showError(localError("UNAUTHORIZED", "not an API key: it holds a space or a character no key has (copied along with it?)"));
    return;
  }
  const button = byId("use-key");
  button.disabled = true;
  try {
    const state = await call("GET", "state", { key });
    input.value = "";
    setKey(key, state && state.accountId);
    renderState(state);
    requestRefresh(true);
    showNotice("Logged in with the key.");  // and an older notice (logged out) is gone
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
  }
}

// Another tab of this browser logged out, or in with another key: this one follows. The key
// is kept once per browser (a reload here would read the other tab's); a tab left trading with
// a key its trader logged out of elsewhere kept the account open on a shared machine.
function followOtherTab(event) {
  if (event.storageArea !== window.localStorage) return;
  if (event.key !== STORE.key && event.key !== null) return; // null: the storage was cleared
  const key = stored(STORE.key);
  if (key === app.key) return;
  // the account id stored with it may not have reached this tab yet: the state read says it
  setKey(key, key ? stored(STORE.accountId) : null, true);
  clearAccountData(); // the other account's, until the state read of this one
  if (key) {
    requestRefresh(true);
    showNotice("Another tab of this browser logged in with another key: this tab uses it too.");
  } else {
    showNotice("Logged out in another tab of this browser: the API key is no longer kept in it.");
  }
}

// The key is the only way back into the account (nothing else names it), and logging out
// forgets it in every tab of this browser: asked first, not done on one click.
const LOGOUT_QUESTION = "Log out? This browser forgets the API key, in every tab: keep a copy "
  + "first, as it is the only way back into this account and its positions.";

function logout() {
  if (!window.confirm(LOGOUT_QUESTION)) return;
  setKey(null, null);
  showNotice("Logged out: the API key is no longer kept in this browser.");
}

async function copyKey() {
  if (!app.key) return;
  try {
    await navigator.clipboard.writeText(app.key);
    showNotice("API key copied.");
  } catch {
    showKey(true); // the whole key, to be selected
    const range = document.createRange();
    range.selectNodeContents(byId("api-key"));
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    showNotice("Select-all done: copy the key with your keyboard.");
  }
}

// Account refreshes are coalesced: one runs at a time, and what was asked meanwhile runs after.
let refreshRunning = false;
let refreshWanted = null;

function requestRefresh(history) {
  if (!app.key) return;
  refreshWanted = { history: Boolean(history) || Boolean(refreshWanted && refreshWanted.history) };
  if (!refreshRunning) runRefresh();
}

async function runRefresh() {
  refreshRunning = true;
  try {
    while (refreshWanted) {
      const wanted = refreshWanted;
      refreshWanted = null;
      await refreshAccount(wanted.history);
    }
  } finally {
    refreshRunning = false;
  }
}

async function refreshAccount(withHistory) {
  const key = app.key;
  if (!key) return;
  app.lastAccountRefresh = Date.now();
  const [stateResult, ordersResult] = await Promise.allSettled([
    call("GET", "state", { key }),
    call("GET", "orders", { key }),
  ]);
  if (key !== app.key) return;
  let failure = null;
  if (stateResult.status === "fulfilled") renderState(stateResult.value);
  else failure = stateResult.reason;
  app.keyRefused = failure instanceof ApiError && failure.status === 401;
  if (app.keyRefused) {
    setAccountStream("down");
    showError(failure);
    return;
  }
  if (ordersResult.status === "fulfilled") renderOrders(listOf(ordersResult.value, "orders"));
  else failure = failure || ordersResult.reason;

  // Positions or orders that came or went mean history to show, whoever ended them, and so
  // does a position whose quantity went down (a partial close, from another tab or device).
  const signature = `${app.positions.map((p) => `${p.positionId}:${p.quantity}`).join(",")}|${app.orders.map((o) => o.orderId).join(",")}`;
  const changed = signature !== app.idsSignature;
  app.idsSignature = signature;
  if (withHistory || changed) failure = (await refreshHistory(key)) || failure;
  if (failure && !resending) showError(failure, "account");
  else if (!failure) dismissBackground("account");
}

async function refreshHistory(key) {
  const [closed, ended] = await Promise.allSettled([
    call("GET", "positions/history", { key, query: { limit: app.closedLimit } }),
    call("GET", "orders/history", { key, query: { limit: app.orderHistoryLimit } }),
  ]);
  if (key !== app.key) return null;
  if (closed.status === "fulfilled") renderClosed(listOf(closed.value, "positions"));
  if (ended.status === "fulfilled") renderOrderHistory(listOf(ended.value, "orders"));
  return closed.status === "rejected" ? closed.reason : ended.status === "rejected" ? ended.reason : null;
}

function listOf(data, name) {
  return data && Array.isArray(data[name]) ? data[name] : [];
}

function renderState(state) {
  if (!state || typeof state !== "object") return;
  if (state.accountId && state.accountId !== app.accountId) {
    app.accountId = String(state.accountId);
    store(STORE.accountId, app.accountId);
    setText(byId("account-id"), app.accountId);
  }
  const balances = state.balances || {};
  setText(byId("balance-free"), fmt.money(balances.free));
  setText(byId("balance-margin"), fmt.money(balances.margin));
  app.equity = balances.equity ?? null;
  app.free = balances.free ?? null;
  renderFunds();
  renderPositions(Array.isArray(state.positions) ? state.positions : []);
  const notes = [];
  if (state.morePositions) notes.push("Showing the oldest positions only: the account has more.");
  if (Array.isArray(state.unavailable) && state.unavailable.length) {
    notes.push(`Temporarily missing (recovering): ${state.unavailable.join(", ")}.`);
  }
  const note = byId("positions-note");
  setText(note, notes.join(" "));
  note.hidden = notes.length === 0;
}

// ------------------------------------------------------------------ rows that moved
// A row's Close, Cancel, margin and TP/SL buttons are refused for a moment after the row came
// or moved on the page (a row above it came or went: a close by TP/SL or liquidation, a fill,
// an editor opened): a click aimed at one row's Close would otherwise land on the row that
// took its place. The row is marked (data-moved) meanwhile.
const ROW_MOVED_GUARD_MS = 700;
const rowPlaces = new Map(); // "position 7" / "order 9" -> {row, top, scrollY, lefts, movedAt (ms), timer}
const ROWS = 'tr[data-testid="position-row"], tr[data-testid="order-row"]';
let seenScrollY = 0; // the window's scroll as its scroll events told it (px)

// A row by what it shows (an order's row is made anew when the orders change).
function rowKey(row) {
  return row.dataset.positionId !== undefined ? `position ${row.dataset.positionId}` : `order ${row.dataset.orderId}`;
}

// Where a pointer finds a row: its top in the window (px), and where its buttons' cells start
// in its table (a wider column elsewhere moves them sideways: "+" to where "−" was).
function rowPlace(row) {
  const cells = [...row.cells].slice(-2);
  return { top: row.getBoundingClientRect().top, scrollY: window.scrollY, lefts: cells.map((c) => c.offsetLeft).join(" ") };
}

// Marks every row whose place changed since it was last seen: in the window, less what the
// trader scrolled meanwhile (a page grown shorter pulls the scroll back: every row moves on
// screen and none on the page), or sideways.
function noteRowPlaces() {
  const now = performance.now();
  const seen = new Set();
  for (const row of document.querySelectorAll(ROWS)) {
    const key = rowKey(row);
    seen.add(key);
    const found = rowPlace(row);
    let place = rowPlaces.get(key);
    const scrolled = place ? seenScrollY - place.scrollY : 0; // by the trader, since
    if (place && Math.abs(place.top - scrolled - found.top) < 1 && place.lefts === found.lefts) {
      if (place.row !== row && row.dataset.moved === undefined && place.timer !== null) row.dataset.moved = "";
      Object.assign(place, { row, top: found.top, scrollY: found.scrollY });
      continue;
    }
    if (!place) rowPlaces.set(key, place = { timer: null });
    Object.assign(place, found, { row, movedAt: now });
    row.dataset.moved = "";
    clearTimeout(place.timer);
    place.timer = setTimeout(() => { delete place.row.dataset.moved; place.timer = null; }, ROW_MOVED_GUARD_MS);
  }
  for (const [key, place] of rowPlaces) {
    if (!seen.has(key)) { clearTimeout(place.timer); rowPlaces.delete(key); }
  }
  seenScrollY = window.scrollY;
}

// The ticket's lines (a trigger the quote crosses, a margin above the balance) come and go with
// the price and what is typed, and its fields with the order type: ``column`` (the ticket and
// the account, above the tables on a phone, beside them where the tallest sets the tables'
// top) keeps the tallest height it had at this window's width, so the tables move when it
// first grows that tall, not each time a line comes and goes (63 px, every row at once).
function keepTallest(column) {
  let tallest = 0;
  new ResizeObserver(() => {
    const height = column.getBoundingClientRect().height;
    if (height > tallest) {
      tallest = height;
      column.style.minHeight = `${tallest}px`;
    }
  }).observe(column);
  let width = window.innerWidth;
  window.addEventListener("resize", () => {
    if (window.innerWidth === width) return;  // a phone's bar coming and going: the same lines
    width = window.innerWidth;
    tallest = 0;
    column.style.minHeight = "";
  });
}

// ``handler`` of a button of ``row``, unless the row came or moved within the guard's time.
function unlessMoved(row, handler) {
  return (event) => {
    const place = rowPlaces.get(rowKey(row));
    if (place && performance.now() - place.movedAt < ROW_MOVED_GUARD_MS) {
      showError(localError("ROW_MOVED", "the row moved just before the click (a row above it "
        + "came or went): nothing was sent. Check it is the one meant and click again."));
      return;
    }
    handler(event);
  };
}

// ------------------------------------------------------------------ tables
function td(value, className) {
  return h("td", { class: className, text: fmt.text(value) });
}

// The message sticks to the visible start of a table that scrolls sideways (narrow screens).
function emptyRow(columns, message) {
  return h("tr", { class: "empty" }, h("td", { colspan: columns }, h("span", { text: message })));
}

// Rows are kept per position and updated in place, so a refresh leaves what is being typed into
// a row's inputs (close quantity, margin amount, TP/SL editor) and its focus alone.
function renderPositions(positions) {
  app.positions = positions;
  const previous = app.positionRows;
  app.positionRows = new Map();
  const nodes = [];
  for (const p of positions) {
    const id = String(p.positionId);
    const entry = previous.get(id) || positionRow(id);
    entry.position = p;
    updatePositionRow(entry);
    app.positionRows.set(id, entry);
    nodes.push(entry.row, entry.editorRow);
  }
  const body = byId("positions-body");
  if (!nodes.length) {
    body.replaceChildren(emptyRow(POSITION_COLUMNS, "No open positions"));
  } else {
    for (const node of [...body.children]) {
      if (!nodes.includes(node)) node.remove();
    }
    // move only what is out of place (a node moved in the document loses its focus)
    let cursor = body.firstChild;
    for (const node of nodes) {
      if (node === cursor) cursor = cursor.nextSibling;
      else body.insertBefore(node, cursor);
    }
  }
  setText(byId("positions-count"), positions.length);
  renderPnl();
  renderChartLines();
  noteRowPlaces();
}

const POSITION_COLUMNS = 14;

// The part of a close's loss past its margin, which the platform's insurance account takes
// (a price that gapped past the liquidation price): the trader lost the margin, not the PnL.
// BigInt micro-dollars; 0n when none.
function insured(c) {
  const pnl = fmt.micros(c.realizedPnl);
  const margin = fmt.micros(c.margin);
  return pnl === null || margin === null || -pnl <= margin ? 0n : -pnl - margin;
}

// What ``insured`` means for the trader, in words; null when none.
function insuredWords(c, past = insured(c)) {
  return past > 0n ? `the loss past the margin, ${fmt.money(fmt.microsText(past))} USD, is the platform's insurance's: this account lost its margin, ${fmt.money(c.margin)} USD` : null;
}

// A closed row's tag of ``insured`` (the words on hover); null when none.
function insuredTag(c) {
  const past = insured(c);
  return past > 0n ? h("span", {
    class: "tag", "data-testid": "insured", text: `insured ${fmt.money(fmt.microsText(past))}`,
    title: insuredWords(c, past),
  }) : null;
}

// The leverage a position is opened with, and once margin was added or removed the one it has
// now beside it (its entry notional over its margin, to a tenth: shown, never settled with).
function leverageText(p) {
  if (p.leverage === undefined) return "—";
  const asset = app.assetByName.get(p.asset);
  const now = Number(p.entryPrice) * Number(p.quantity) / Number(p.margin);
  if (!asset || !fmt.marginChanged(p, String(asset.quantityStep)) || !Number.isFinite(now)) {
    return `${p.leverage}x`;
  }
  return `${now.toFixed(1)}x (opened ${p.leverage}x)`;
}

function positionRow(id) {
  const cell = (field, className = "num") => h("td", { class: className, "data-field": field, text: "—" });
  const cells = {
    asset: cell("asset", ""),
    side: cell("side", ""),
    quantity: cell("quantity"),
    entry: cell("entry"),
    liquidation: cell("liquidation"),
    takeProfit: cell("take-profit"),
    stopLoss: cell("stop-loss"),
    margin: cell("margin"),
    leverage: cell("leverage"),
    opened: cell("opened", ""),
  };
  const markCell = cell("mark");
  const pnlCell = cell("pnl");
  const idAttr = { "data-position-id": id };
  const button = (testid, text, label) => h("button", {
    type: "button", class: "btn btn-small", "data-testid": testid, ...idAttr, text, "aria-label": label,
  });
  const input = (testid, placeholder, label) => h("input", {
    class: "row-input", "data-testid": testid, ...idAttr, inputmode: "decimal", autocomplete: "off",
    spellcheck: "false", placeholder, "aria-label": label,
  });

  const marginInput = input("margin-amount", "USD", "Margin amount to add or remove");
  const addMargin = button("add-margin", "+", "Add margin");
  const removeMargin = button("remove-margin", "−", "Remove margin");
  const closeQuantity = input("close-quantity", "all", "Quantity to close (empty: all)");
  const close = button("close-position", "Close", "Close the position (or the quantity given)");
  const edit = button("edit-triggers", "Edit", "Edit take-profit and stop-loss");
  edit.setAttribute("aria-expanded", "false");

  const tpInput = input("edit-take-profit", "none", "Take-profit (empty: none)");
  const slInput = input("edit-stop-loss", "none", "Stop-loss (empty: none)");
  const save = button("save-triggers", "Save", "Save take-profit and stop-loss");
  save.type = "submit";  // Enter in either field saves too (a form submits on Enter only with one)
  const cancel = button("cancel-edit", "Cancel", "Cancel the edit");
  // the editor names its position: a row that moved under the pointer as Edit was clicked
  // would otherwise leave the TP/SL of another position being typed
  const editorWhat = h("span", { class: "editor-what", "data-testid": "editor-position", ...idAttr });
  const editorForm = h("form", { class: "row-editor", autocomplete: "off", novalidate: true },
    editorWhat,
    h("label", {}, h("span", { text: "Take profit" }), tpInput),
    h("label", {}, h("span", { text: "Stop loss" }), slInput),
    save, cancel);
  const editorRow = h("tr", { class: "editor", "data-testid": "position-editor", ...idAttr, hidden: true },
    h("td", { colspan: POSITION_COLUMNS }, editorForm));

  const row = h("tr", { "data-testid": "position-row", ...idAttr },
    cells.asset, cells.side, cells.quantity, cells.entry, markCell, cells.liquidation,
    cells.takeProfit, cells.stopLoss, cells.margin, cells.leverage, pnlCell, cells.opened,
    h("td", {}, h("div", { class: "row-actions" }, marginInput, addMargin, removeMargin)),
    h("td", {}, h("div", { class: "row-actions" }, closeQuantity, close, edit)));

  const entry = {
    id, row, editorRow, editorWhat, cells, markCell, pnlCell, position: null,
    closeQuantity, close, marginInput, addMargin, removeMargin, edit, tpInput, slInput, save, cancel,
  };
  close.addEventListener("click", singleClick(unlessMoved(row, () => closePosition(entry))));
  addMargin.addEventListener("click", singleClick(unlessMoved(row, () => changeMargin(entry, 1))));
  removeMargin.addEventListener("click", singleClick(unlessMoved(row, () => changeMargin(entry, -1))));
  edit.addEventListener("click", unlessMoved(row, () => setEditing(entry, entry.editorRow.hidden)));
  cancel.addEventListener("click", () => setEditing(entry, false));
  editorForm.addEventListener("submit", (event) => {
    event.preventDefault();
    unlessMoved(row, () => saveTriggers(entry))(event);
  });
  return entry;
}

function updatePositionRow(entry) {
  const p = entry.position;
  const { cells } = entry;
  entry.row.dataset.asset = fmt.text(p.asset);
  entry.row.dataset.side = fmt.text(p.type);
  setText(cells.asset, fmt.text(p.asset));
  setText(cells.side, fmt.text(p.type));
  cells.side.className = fmt.sideClass(p.type);
  cells.side.dataset.what = fmt.text(p.quantity);  // under the side on a narrow screen
  setText(entry.editorWhat, `Position ${entry.id}: ${fmt.text(p.type)} ${fmt.text(p.quantity)} ${fmt.text(p.asset)}`);
  setText(cells.quantity, fmt.text(p.quantity));
  setText(cells.entry, fmt.text(p.entryPrice));
  setText(cells.liquidation, fmt.text(p.liquidationPrice));
  setText(cells.takeProfit, fmt.text(p.takeProfit));
  setText(cells.stopLoss, fmt.text(p.stopLoss));
  setText(cells.margin, fmt.money(p.margin));
  setText(cells.leverage, leverageText(p));
  setText(cells.opened, fmt.time(p.openedAt));
  cells.opened.title = fmt.text(p.openedAt);
  const asset = app.assetByName.get(p.asset);
  const step = asset ? String(asset.quantityStep) : "";
  entry.closeQuantity.dataset.step = step;
  entry.closeQuantity.title = step ? `Quantity to close, a multiple of ${step} (empty: all)` : "Quantity to close (empty: all)";
}

function setEditing(entry, editing) {
  if (editing) {
    const p = entry.position;
    entry.tpInput.value = p.takeProfit === null || p.takeProfit === undefined ? "" : String(p.takeProfit);
    entry.slInput.value = p.stopLoss === null || p.stopLoss === undefined ? "" : String(p.stopLoss);
  }
  entry.editorRow.hidden = !editing;
  entry.edit.setAttribute("aria-expanded", String(editing));
  if (editing) entry.tpInput.focus();
}

function renderPnl() {
  let total = 0n; // micro-dollars, as the engine counts them
  let counted = 0;
  let moved = null; // how far the live PnL moved the equity from the server's
  for (const { position, markCell, pnlCell } of app.positionRows.values()) {
    const quote = app.prices[position.asset];
    const live = fmt.livePnl(position, quote); // micro-dollars
    const server = fmt.micros(position.unrealizedPnl);
    if (live !== null && server !== null) {
      moved = (moved ?? 0n) + live - server;
    }
    if (live !== null) {
      const liveText = fmt.microsText(live);
      setText(markCell, position.type === "long" ? quote.bid : quote.ask);
      setText(pnlCell, fmt.signedMoney(liveText));
      pnlCell.className = fmt.pnlClassOf(liveText);
      pnlCell.dataset.source = "live";
      total += live;
      counted += 1;
    } else {
      setText(markCell, "—");
      setText(pnlCell, fmt.signedMoney(position.unrealizedPnl));
      pnlCell.className = fmt.pnlClassOf(position.unrealizedPnl);
      pnlCell.dataset.source = "server";
      if (server !== null) {
        total += server;
        counted += 1;
      }
    }
  }
  const totalNode = byId("upnl-total");
  const totalText = fmt.microsText(total);
  setText(totalNode, counted ? fmt.signedMoney(totalText) : "—");
  totalNode.className = counted ? fmt.pnlClassOf(totalText) : "num";
  // equity moves with the same prices as the PnL beside it, between reads of the state
  const equityNode = byId("balance-equity");
  const equity = fmt.micros(app.equity);
  const live = moved !== null && equity !== null;
  setText(equityNode, fmt.money(live ? fmt.microsText(equity + moved) : app.equity));
  equityNode.dataset.source = live ? "live" : "server";
}

// The levels of the chart's asset: each position's entry, liquidation, take-profit and
// stop-loss, and each pending order's trigger (what would act on the next ticks).
function renderChartLines() {
  if (!app.chart) return;
  const lines = [];
  if (!byId("chart-levels").checked) { // hidden by the trader: the candles alone
    app.chart.setLines(lines);
    return;
  }
  const set = (value) => value !== null && value !== undefined;
  const positions = app.positions.filter((p) => p.asset === app.asset);
  for (const p of positions) {
    const name = `${p.type} ${p.quantity}`;
    // with several positions each level names its own (their levels may lie side by side)
    const of = positions.length > 1 ? ` ${name}` : "";
    lines.push({ price: p.entryPrice, title: name, kind: "entry" });
    if (set(p.liquidationPrice)) lines.push({ price: p.liquidationPrice, title: `liq.${of}`, kind: "liquidation" });
    if (set(p.takeProfit)) lines.push({ price: p.takeProfit, title: `TP${of}`, kind: "takeProfit" });
    if (set(p.stopLoss)) lines.push({ price: p.stopLoss, title: `SL${of}`, kind: "stopLoss" });
  }
  for (const o of app.orders) {
    if (o.asset !== app.asset) continue;
    lines.push({ price: o.triggerPrice, title: `${o.orderType} ${o.type}`, kind: "order" });
  }
  app.chart.setLines(lines);
}

// What each table shows now (as JSON): a refresh that changes nothing leaves its rows as they
// are (no flicker, a row being read or pointed at stays the same element).
const shown = new Map();
function changed(table, data) {
  const text = JSON.stringify(data);
  if (shown.get(table) === text) return false;
  shown.set(table, text);
  return true;
}

// The cells of an order's terms, shared by the open orders and the order history.
function orderTermCells(o) {
  return [
    td(o.asset),
    td(o.type, fmt.sideClass(o.type)),
    td(o.orderType),
    td(o.triggerPrice, "num"),
    td(fmt.money(o.margin), "num"),
    td(o.leverage === undefined ? null : `${o.leverage}x`, "num"),
  ];
}

function renderOrders(orders) {
  app.orders = orders;
  setText(byId("orders-count"), orders.length);
  // the account's margin holds each pending order's too: that part is told apart (a row always
  // there, so nothing below it moves when an order comes or goes)
  const held = orders.reduce((sum, o) => sum + (fmt.micros(o.margin) ?? 0n), 0n);
  setText(byId("balance-orders"), app.key ? fmt.money(fmt.microsText(held)) : "—");
  if (!changed("orders", orders)) return;
  renderChartLines();
  const rows = orders.map((o) => {
    const id = String(o.orderId);
    const cancel = h("button", {
      type: "button",
      class: "btn btn-small",
      "data-testid": "cancel-order",
      "data-order-id": id,
      text: "Cancel",
    });
    const terms = orderTermCells(o);
    terms[1].dataset.what = `${o.orderType} ${o.triggerPrice}`;  // under the side on a narrow screen
    // the size it buys filled at its trigger, as the engine computes it (a limit filled at a
    // better price, or an order the quote already crossed, buys another)
    const asset = app.assetByName.get(o.asset);
    const size = asset ? fmt.estimate(o.margin, o.leverage, o.triggerPrice, String(asset.quantityStep)) : null;
    terms.splice(4, 0, h("td", { class: "num", "data-field": "size", text: size ? size.size : "—" }));
    const row = h("tr", { "data-testid": "order-row", "data-order-id": id, "data-asset": o.asset, "data-side": o.type },
      ...terms,
      td(o.takeProfit, "num"),
      td(o.stopLoss, "num"),
      h("td", { text: o.expiresAt ? fmt.time(o.expiresAt) : "good till cancelled", title: fmt.text(o.expiresAt) }),
      h("td", { text: fmt.time(o.createdAt), title: fmt.text(o.createdAt) }),
      h("td", {}, cancel));
    cancel.addEventListener("click", singleClick(unlessMoved(row, () => cancelOrder(id, cancel))));
    return row;
  });
  byId("orders-body").replaceChildren(...(rows.length ? rows : [emptyRow(12, "No open orders")]));
  noteRowPlaces();
}

function renderClosed(closed) {
  app.closedShown = closed;
  if (!changed("closed", [closed, app.closedLimit])) return;
  const rows = closed.map((c) => h("tr", {
    "data-testid": "closed-row",
    "data-position-id": String(c.positionId),
    "data-close-id": c.closeId === undefined || c.closeId === null ? null : String(c.closeId),
    "data-close-reason": c.closeReason,
    "data-partial": c.partial === true ? "true" : null,
  },
    h("td", { text: fmt.time(c.closedAt), title: fmt.text(c.closedAt) }),
    td(c.asset),
    td(c.type, fmt.sideClass(c.type)),
    h("td", { class: "num", "data-field": "quantity" },
      fmt.text(c.quantity),
      c.partial === true ? h("span", { class: "tag", "data-testid": "partial-close", text: "partial" }) : null),
    td(c.entryPrice, "num"),
    td(c.exitPrice, "num"),
    h("td", { class: fmt.pnlClassOf(c.realizedPnl), "data-field": "realized-pnl", text: fmt.signedMoney(c.realizedPnl) },
      insuredTag(c)),
    td(fmt.money(c.payout), "num"),
    td(fmt.money(c.margin), "num"),
    td(leverageText(c), "num"),
    td(closeReasonText(c.closeReason)),
    h("td", { text: fmt.time(c.openedAt), title: fmt.text(c.openedAt) })));
  byId("closed-body").replaceChildren(...(rows.length ? rows : [emptyRow(12, "No closed positions yet")]));
  byId("closed-more").hidden = closed.length < app.closedLimit || app.closedLimit >= HISTORY_MAX;
}

// The price each filled order's fill opened its position at (the order tells its trigger,
// not its fill): the position's entry, from the open positions or the closed ones shown; null
// for one closed past those, and for an order not filled.
function fillPrices(orders) {
  const entries = new Map();
  for (const p of [...(app.closedShown || []), ...app.positions]) entries.set(String(p.positionId), p.entryPrice);
  return orders.map((o) => (o.status === "filled" && entries.get(String(o.positionId))) || null);
}

function renderOrderHistory(orders) {
  const fills = fillPrices(orders);
  if (!changed("order-history", [orders, app.orderHistoryLimit, fills])) return;
  const rows = orders.map((o, i) => h("tr", {
    "data-testid": "order-history-row",
    "data-order-id": String(o.orderId),
    "data-status": o.status,
  },
    h("td", { text: fmt.time(o.updatedAt), title: fmt.text(o.updatedAt) }),
    ...orderTermCells(o),
    td(o.takeProfit, "num"),
    td(o.stopLoss, "num"),
    td(o.status),
    h("td", {
      class: "num", "data-field": "fill-price", text: fmt.text(fills[i]),
      title: o.status === "filled" && fills[i] === null ? "its position closed before the closed positions shown" : null,
    }),
    td(o.positionId),
    td(o.rejectReason ? rejectedBecause(o.rejectReason) : null, "reason"),
    h("td", { text: fmt.time(o.createdAt), title: fmt.text(o.createdAt) })));
  byId("order-history-body").replaceChildren(...(rows.length ? rows : [emptyRow(14, "No ended orders yet")]));
  byId("order-history-more").hidden = orders.length < app.orderHistoryLimit || app.orderHistoryLimit >= HISTORY_MAX;
}

function selectTab(which) {
  const closed = which === "closed";
  byId("tab-closed").setAttribute("aria-selected", String(closed));
  byId("tab-order-history").setAttribute("aria-selected", String(!closed));
  byId("panel-closed").hidden = !closed;
  byId("panel-order-history").hidden = closed;
}

// ------------------------------------------------------------------ trading
function field(id) {
  return byId(id).value.trim();
}

function leverageValue() {
  const value = field("ticket-leverage");
  // a whole number goes as a number, so the API can say it is out of range; anything else as
  // typed: the API names the problem
  return /^-?\d+$/.test(value) ? Number(value) : value;
}

function slippage() {
  const bps = field("ticket-slippage");
  if (!bps) return null;
  // a whole number goes as a number (a negative one too), so the API names its range
  return /^-?\d+$/.test(bps) ? Number(bps) : bps;
}

function renderTicketKind() {
  const kind = byId("ticket-kind").value;
  for (const node of document.querySelectorAll(".pending-only")) node.hidden = kind === "market";
  for (const node of document.querySelectorAll(".market-only")) node.hidden = kind !== "market";
  renderEstimate();
}

// A pending order whose trigger the quote crosses already fills at the next price, as a market
// order would: said below the buttons (a line above them would move them as prices move).
function renderCrossed() {
  const kind = byId("ticket-kind").value;
  const trigger = field("ticket-trigger");
  const quote = app.prices[app.asset];
  const sides = ["long", "short"].filter((side) => fmt.crossed(kind, side, trigger, quote));
  const node = byId("ticket-crossed");
  setText(node, sides.map((side) => {
    const [name, price] = side === "long" ? ["ask", quote.ask] : ["bid", quote.bid];
    const where = (kind === "limit") === (side === "long") ? "at or below" : "at or above";
    return `The ${name} ${price} is ${where} the trigger already: a ${kind} ${side} fills at `
      + "the next price, as a market order would.";
  }).join(" "));
  node.hidden = sides.length === 0;
}

// A margin above the free balance, which the API refuses (INSUFFICIENT_BALANCE), is said
// before the click, below the buttons as a crossed trigger is. The engine decides: the balance
// shown may be a moment old.
function renderFunds() {
  const node = byId("ticket-funds");
  const margin = fmt.micros(field("ticket-margin"));
  const free = app.key ? fmt.micros(app.free) : null;
  const over = typeof margin === "bigint" && typeof free === "bigint" && margin > free;
  setText(node, over ? `The margin is more than the free balance, ${fmt.money(app.free)} USD: `
    + "the platform refuses it." : "");
  node.hidden = !over;
}

// The ticket's estimate, each side at the price it would fill at now (fmt.fillPrice): its
// size and notional, and its liquidation price.
function renderEstimate() {
  renderCrossed();
  renderFunds();
  const node = byId("ticket-estimate");
  const liquidation = byId("ticket-liquidation");
  const asset = selectedAsset();
  const margin = Number(field("ticket-margin"));
  const leverage = Number(field("ticket-leverage"));
  const kind = byId("ticket-kind").value;
  const quote = app.prices[app.asset];
  const trigger = field("ticket-trigger");
  const fills = { long: fmt.fillPrice(kind, "long", trigger, quote),
                  short: fmt.fillPrice(kind, "short", trigger, quote) };
  const sized = (side) => (asset && fills[side]
    ? fmt.estimate(field("ticket-margin"), field("ticket-leverage"), fills[side], asset.quantityStep)
    : null);
  const long = sized("long");
  const short = sized("short");
  if (!long || !short || !(margin * leverage <= Number.MAX_SAFE_INTEGER)
      || leverage > (asset.maxLeverage || Infinity)) {
    setText(node, ""); // the API will refuse it: no estimate of an order that cannot be
    setText(liquidation, "");
    return;
  }
  const bought = (e) => /[1-9]/.test(e.size);
  if (!bought(long) && !bought(short)) {
    // the API refuses a market order of it; a pending one fills only at a lower price
    setText(node, `buys less than one step (${asset.quantityStep} ${asset.name}) at this price`);
    setText(liquidation, "");
    return;
  }
  let size = `≈ ${long.size} ${asset.name}`;
  if (!bought(long)) size = `≈ ${short.size} ${asset.name} short (a long buys less than one step)`;
  else if (!bought(short)) size = `≈ ${long.size} ${asset.name} long (a short buys less than one step)`;
  else if (long.size !== short.size) size = `≈ ${long.size} ${asset.name} long · ${short.size} short`;
  setText(node, `${size} · notional ≈ ${fmt.money(long.notional)} USD (estimate)`);
  const at = (side) => fmt.liquidationEstimate(
    field("ticket-margin"), field("ticket-leverage"), fills[side], side, asset);
  const longLiq = at("long");
  const shortLiq = at("short");
  // a side no position comes of has none ("—")
  const told = (price) => (price === "none" ? "none" : price ? `≈ ${price}` : "—");
  setText(liquidation, longLiq || shortLiq
    ? `liq. price ${told(longLiq)} long · ${told(shortLiq)} short` : "");
}

async function submitTicket(side, button) {
  if (!app.key) {
    showError(localError("UNAUTHORIZED", "create an account or use an API key first"));
    return;
  }
  if (!app.asset) return;
  if (byId("ticket-leverage").validity.badInput) { // the browser reads it as empty
    showError(localError("INVALID_REQUEST", "Leverage: not a whole number"));
    return;
  }
  const kind = byId("ticket-kind").value;
  const body = { asset: app.asset, type: side };
  const margin = field("ticket-margin");
  if (margin) body.margin = margin;
  if (field("ticket-leverage")) body.leverage = leverageValue();
  const tp = field("ticket-tp");
  const sl = field("ticket-sl");
  if (tp) body.takeProfit = tp;
  if (sl) body.stopLoss = sl;
  let path;
  if (kind === "market") {
    path = "positions/open";
    const bps = slippage();
    const quote = app.prices[app.asset];
    if (bps !== null) {
      if (!quote) {
        showError(localError("PRICE_UNAVAILABLE", "no live price to check the slippage against yet"));
        return;
      }
      body.currentPrice = side === "long" ? quote.ask : quote.bid;
      body.maxSlippageBps = bps;
    }
  } else {
    path = "orders";
    body.orderType = kind;
    const trigger = field("ticket-trigger");
    if (trigger) body.triggerPrice = trigger;
    const expiry = field("ticket-expiry");
    if (expiry) {
      const when = new Date(expiry);
      if (Number.isNaN(when.getTime())) {
        showError(localError("INVALID_REQUEST", "expiresAt: not a date and time"));
        return;
      }
      body.expiresAt = when.toISOString();
    }
  }
  const buttons = [byId("submit-long"), byId("submit-short")];
  for (const b of buttons) b.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    const result = await trade("POST", path, body);
    // the prices and the expiry were this order's: the next starts from none (a long's TP
    // left in the ticket refused the short that followed; an expiry went on to the next order)
    for (const id of ["ticket-trigger", "ticket-tp", "ticket-sl", "ticket-expiry"]) {
      byId(id).value = "";
      byId(id).dispatchEvent(new Event("input"));
    }
    if (kind === "market") {
      showNotice(`Opened ${result.type} ${result.quantity} ${result.asset} at ${result.entryPrice} (position ${result.positionId}).`);
    } else {
      showNotice(`Placed ${result.orderType} ${result.type} ${result.asset} at ${result.triggerPrice} (order ${result.orderId}).`);
    }
  } catch (err) {
    showError(err);
  } finally {
    button.removeAttribute("aria-busy");
    for (const b of buttons) b.disabled = !app.key;
    requestRefresh(true);
  }
}

async function closePosition(entry) {
  if (!app.key) return;
  const position = entry.position;
  const button = entry.close;
  const quantity = entry.closeQuantity.value.trim();
  const body = { positionId: String(position.positionId) };
  if (quantity) body.quantity = quantity;
  // the ticket's bound, while the ticket shows it (a limit or stop ticket hides the field) for
  // the row's asset (a bound in basis points was typed with that asset's prices in view)
  const bps = byId("ticket-kind").value === "market" && position.asset === app.asset
    ? slippage() : null;
  if (bps !== null) {
    const quote = app.prices[position.asset];
    if (!quote) { // as the ticket's open: a bound is kept, or nothing is sent
      showError(localError("PRICE_UNAVAILABLE", "no live price to check the slippage against yet"));
      return;
    }
    body.currentPrice = position.type === "long" ? quote.bid : quote.ask;
    body.maxSlippageBps = bps;
  }
  button.disabled = true;
  try {
    const closed = await trade("POST", "positions/close", body);
    const what = closed.partial ? "Closed part of position" : "Closed";
    showNotice(`${what} ${closed.type} ${closed.quantity} ${closed.asset} at ${closed.exitPrice}: PnL ${fmt.signedMoney(closed.realizedPnl)} USD, paid out ${fmt.money(closed.payout)} USD.`);
    entry.closeQuantity.value = "";
  } catch (err) {
    // the bound came from the ticket's field, which the row does not show
    const bound = bps !== null && err instanceof ApiError
      && (err.code === "PRICE_MOVED" || /maxSlippageBps/.test(err.message));
    showError(bound ? new ApiError(err.status, err.code, `${err.message} (the ticket's Max `
      + `slippage, ${bps} bps, bounds a close too: clear it to close at any price)`) : err);
  } finally {
    button.disabled = false;
  }
  requestRefresh(true);
}

async function saveTriggers(entry) {
  if (!app.key || entry.save.disabled) return;
  const takeProfit = entry.tpInput.value.trim();
  const stopLoss = entry.slInput.value.trim();
  const body = {
    positionId: String(entry.position.positionId),
    takeProfit: takeProfit || null, // empty: remove the level
    stopLoss: stopLoss || null,
  };
  entry.save.disabled = true;
  try {
    const p = await trade("POST", "positions/modify", body);
    showNotice(`Position ${p.positionId} (${p.type} ${p.quantity} ${p.asset}): take-profit ${fmt.text(p.takeProfit)}, stop-loss ${fmt.text(p.stopLoss)}.`);
    entry.position = p;
    updatePositionRow(entry);
    setEditing(entry, false);
  } catch (err) {
    showError(err);
  } finally {
    entry.save.disabled = false;
  }
  requestRefresh(false);
}

async function changeMargin(entry, sign) {
  if (!app.key) return;
  const typed = entry.marginInput.value.trim();
  if (!typed || /^[+-]/.test(typed)) {
    showError(localError("INVALID_REQUEST", "amount: type an amount without a sign, then + adds it and − removes it"));
    return;
  }
  const body = { positionId: String(entry.position.positionId), amount: sign < 0 ? `-${typed}` : typed };
  const buttons = [entry.addMargin, entry.removeMargin];
  for (const b of buttons) b.disabled = true;
  try {
    const p = await trade("POST", "positions/margin", body);
    showNotice(`Position ${p.positionId} (${p.type} ${p.quantity} ${p.asset}): margin ${fmt.money(p.margin)} USD, liquidation price ${fmt.text(p.liquidationPrice)}.`);
    entry.marginInput.value = "";
    entry.position = p;
    updatePositionRow(entry);
  } catch (err) {
    showError(err);
  } finally {
    for (const b of buttons) b.disabled = false;
  }
  requestRefresh(false);
}

async function cancelOrder(orderId, button) {
  if (!app.key) return;
  button.disabled = true;
  try {
    const order = await trade("DELETE", `orders/${encodeURIComponent(orderId)}`);
    showNotice(`Cancelled order ${order.orderId} (${order.orderType} ${order.type} ${order.asset} at ${order.triggerPrice}): its margin ${fmt.money(order.margin)} USD is free again.`);
  } catch (err) {
    showError(err);
    button.disabled = false;
  }
  requestRefresh(true);
}

// ------------------------------------------------------------------ start
function accountTimer() {
  if (!app.key || app.keyRefused) return;
  const every = app.accountStream === "live" ? STATE_REFRESH_MS : STATE_POLL_MS;
  if (Date.now() - app.lastAccountRefresh >= every) requestRefresh(false);
}

function bindUi() {
  // A wheel over a focused number field changes its value in a browser: the page scrolls
  // instead, so that scrolling past the ticket never changes the leverage unseen.
  for (const input of document.querySelectorAll('input[type="number"]')) {
    input.addEventListener("wheel", () => {
      if (document.activeElement === input) input.blur();
    }, { passive: true });
  }
  byId("error-dismiss").addEventListener("click", dismissError);
  byId("notice-dismiss").addEventListener("click", () => { byId("notice").hidden = true; });
  byId("create-account").addEventListener("click", createAccount);
  byId("key-form").addEventListener("submit", useKey);
  byId("logout").addEventListener("click", logout);
  window.addEventListener("storage", followOtherTab);
  byId("copy-key").addEventListener("click", copyKey);
  byId("show-key").addEventListener("click", () => showKey(!app.keyShown));
  byId("asset-select").addEventListener("change", (event) => {
    app.asset = event.target.value;
    store(STORE.asset, app.asset);
    applyAsset();
  });
  byId("interval-select").addEventListener("change", (event) => {
    app.interval = event.target.value;
    store(STORE.interval, app.interval);
    subscribeMarket();
    loadKlines();
  });
  byId("chart-levels").addEventListener("change", (event) => {
    store(STORE.levels, event.target.checked ? null : "hidden");
    renderChartLines();
  });
  byId("ticket").addEventListener("submit", (event) => event.preventDefault());
  byId("ticket-kind").addEventListener("change", renderTicketKind);
  for (const id of ["ticket-margin", "ticket-leverage", "ticket-trigger"]) {
    byId(id).addEventListener("input", renderEstimate);
  }
  byId("submit-long").addEventListener("click", singleClick((event) => submitTicket("long", event.currentTarget)));
  byId("submit-short").addEventListener("click", singleClick((event) => submitTicket("short", event.currentTarget)));
  byId("tab-closed").addEventListener("click", () => selectTab("closed"));
  byId("tab-order-history").addEventListener("click", () => selectTab("orders"));
  byId("closed-more").addEventListener("click", () => {
    app.closedLimit = Math.min(HISTORY_MAX, app.closedLimit + HISTORY_PAGE);
    requestRefresh(true);
  });
  byId("order-history-more").addEventListener("click", () => {
    app.orderHistoryLimit = Math.min(HISTORY_MAX, app.orderHistoryLimit + HISTORY_PAGE);
    requestRefresh(true);
  });
  keepTallest(document.querySelector("aside.side"));
  seenScrollY = window.scrollY;
  window.addEventListener("scroll", () => { seenScrollY = window.scrollY; }, { passive: true });
  // a panel whose size changes (a ticket's line, a row's editor, the window) moves the rows
  // below it
  const resized = new ResizeObserver(noteRowPlaces);
  for (const panel of document.querySelectorAll("main.layout > *")) resized.observe(panel);
}

async function start() {
  bindUi();
  renderTicketKind();
  const savedInterval = stored(STORE.interval);
  app.interval = INTERVALS.includes(savedInterval) ? savedInterval : "1m";
  byId("interval-select").value = app.interval;
  byId("chart-levels").checked = stored(STORE.levels) !== "hidden";

  app.live = new LiveSocket(socketUrl(), { onFrame, onState: onSocketState, onAccountSubscribed });
  setKey(stored(STORE.key), stored(STORE.accountId));
  clearAccountData();
  app.live.start();
  setInterval(pollPrices, PRICE_POLL_MS);
  setInterval(renderQuote, 1000); // a quote that stops moving is marked stale
  setInterval(accountTimer, 1000);
  requestRefresh(true);

  try {
    app.chart = createCandleChart(byId("chart"));
    if (app.chart) app.chart.onOlderWanted(loadOlderKlines);
  } catch (err) {
    showError(localError("ERROR", `the chart could not start: ${err && err.message ? err.message : err}`));
  }

  app.assets = (await loadAssets()).filter((a) => a && typeof a.name === "string");
  app.assetByName = new Map(app.assets.map((a) => [a.name, a]));
  const savedAsset = stored(STORE.asset);
  app.asset = app.assetByName.has(savedAsset) ? savedAsset : app.assets[0].name;
  fillAssetSelect();
  applyAsset();
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
