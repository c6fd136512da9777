// The REST client: JSON in and out, the API's error shape turned into ApiError.

export class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

// Relative to the page, so the terminal also works behind a path prefix.
const BASE = new URL("api/v1/", document.baseURI);

export function apiUrl(path, query) {
  const url = new URL(path, BASE);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, String(value));
  }
  return url;
}

// A request unanswered this long is given up (aborted): a network that hangs, or a server that
// stopped answering, must not hold the page's later requests back. A trading action is given
// longer, as the trader waits for its answer anyway.
export const REQUEST_TIMEOUT_MS = 10_000;
export const TRADE_TIMEOUT_MS = 20_000;

export async function call(method, path, { key = null, body, query, timeoutMs = REQUEST_TIMEOUT_MS } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (key) headers.Authorization = `Bearer ${key}`;
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeoutMs);
  let response;
  let raw;
  try {
    response = await fetch(apiUrl(path, query), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
      signal: abort.signal,
    });
    raw = await response.text();
  } catch (err) {
    if (abort.signal.aborted) {
      throw new ApiError(0, "TIMEOUT", `no answer within ${timeoutMs / 1000} s (the request was given up)`);
    }
    throw new ApiError(0, "NETWORK_ERROR", `the server did not answer (${err && err.message ? err.message : err})`);
  } finally {
    clearTimeout(timer);
  }
  let data = null;
  if (raw) {
    try { data = JSON.parse(raw); } catch { data = null; }
  }
  if (!response.ok) {
    const error = data && typeof data === "object" ? data.error : null;
    const code = error && typeof error.code === "string" ? error.code : `HTTP_${response.status}`;
    const message = error && typeof error.message === "string"
      ? error.message
      : `${response.status} ${response.statusText || "error"}`.trim();
    throw new ApiError(response.status, code, message, response.headers.get("Retry-After"));
  }
  return data;
}

// How long a trading action is sent again while its outcome is unknown: a restarting ledger or
// shard answers again within about a second; a whole platform restarting, within ~15 s.
const RESEND_FOR_MS = 20_000;

// A clientOrderId of the page's own (web- and 24 hex digits). getRandomValues, not randomUUID:
// the terminal is also served over plain http from hosts other than localhost.
function newClientOrderId() {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return `web-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

// An answer that says nothing of whether the request happened: none at all (the connection
// dropped, maybe after the API acted), a proxy's 502/504, or 503 SERVICE_UNAVAILABLE (a
// component restarting, or an earlier attempt with this clientOrderId still in progress).
// PRICE_UNAVAILABLE is an answer: nothing happened, and nothing says when prices come back.
function outcomeUnknown(err) {
  return err instanceof ApiError && (err.status === 0 || err.status === 502 || err.status === 504
    || (err.status === 503 && err.code !== "PRICE_UNAVAILABLE"));
}

// A trading action that must happen at most once. It carries a clientOrderId of its own and,
// while its outcome is unknown, is sent again with that same id after Retry-After (1-5 s):
// the API answers a repeat with the first attempt's answer, or runs it once. onRetry(err,
// attempt, waitMs) is told before each resend. After RESEND_FOR_MS the last error is thrown.
// An attempt that timed out is not sent again: the API may still be running it (a repeat
// would wait for it just as long); its error says the outcome is unknown.
export async function callOnce(method, path, { key = null, body, query, onRetry } = {}) {
  const clientOrderId = newClientOrderId();
  const request = method === "DELETE"
    ? { key, query: { ...query, clientOrderId } }
    : { key, query, body: { ...body, clientOrderId } };
  const until = Date.now() + RESEND_FOR_MS;
  for (let attempt = 1; ; attempt += 1) {
    try {
      return await call(method, path, { ...request, timeoutMs: TRADE_TIMEOUT_MS });
    } catch (err) {
      if (err instanceof ApiError && err.code === "TIMEOUT") {
        err.message = `no answer within ${TRADE_TIMEOUT_MS / 1000} s, so the outcome is unknown: it may have been taken. Not sent again (clientOrderId ${clientOrderId}); check your positions and orders, read again now.`;
        throw err;
      }
      if (!outcomeUnknown(err)) throw err;
      const waitMs = 1000 * Math.min(5, Math.max(1, Number(err.retryAfter) || 1));
      if (Date.now() + waitMs > until) {
        err.message += ` (sent ${attempt} times as clientOrderId ${clientOrderId}: it happened at most once; check your positions and orders)`;
        throw err;
      }
      if (onRetry) onRetry(err, attempt, waitMs);
      await new Promise((resolve) => { setTimeout(resolve, waitMs); });
    }
  }
}
