// Display formatting. Amounts stay the decimal strings the API gives; what the page computes
// from them (live unrealized PnL and equity, the ticket's estimate) is exact decimal
// arithmetic (BigInt), as the engine's.

const DASH = "—";
const DECIMAL = /^(-?)(\d+)(?:\.(\d+))?$/;

export function text(value) {
  return value === undefined || value === null || value === "" ? DASH : String(value);
}

// A money string with its trailing zeros cut down to two decimals ("10000.000000" -> "10000.00",
// "12.345600" -> "12.3456"): a string operation, exact.
export function money(value) {
  if (value === undefined || value === null || value === "") return DASH;
  const s = String(value);
  const m = DECIMAL.exec(s);
  if (!m) return s;
  const frac = (m[3] || "").replace(/0+$/, "").padEnd(2, "0");
  return `${m[1]}${m[2]}.${frac}`;
}

// Signed money: "+12.50" / "-3.10" (a string operation as well).
export function signedMoney(value) {
  const s = money(value);
  if (s === DASH || s.startsWith("-") || /^0\.0+$/.test(s)) return s;
  return `+${s}`;
}

// "2026-01-02T03:04:05.123456Z" -> "2026-01-02 03:04:05" (UTC).
export function time(iso) {
  if (!iso) return DASH;
  const s = String(iso);
  const m = /^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})/.exec(s);
  return m ? `${m[1]} ${m[2]}` : s;
}

// An ISO-8601 time in unix seconds (UTC when it names no offset); null when unreadable.
export function isoToSeconds(iso) {
  if (typeof iso !== "string") return null;
  const zoned = /(Z|[+-]\d{2}:?\d{2})$/i.test(iso) ? iso : `${iso}Z`;
  const ms = Date.parse(zoned);
  return Number.isFinite(ms) ? Math.floor(ms / 1000) : null;
}

// Decimals of a step: "0.01" -> 2, "1" -> 0, "0.00001" -> 5.
export function decimalsOf(step) {
  const m = DECIMAL.exec(String(step ?? ""));
  if (!m) return 2;
  return (m[3] || "").replace(/0+$/, "").length;
}

// A price as the chart labels it: at the step's decimals, or one decimal more for a candle's
// mid half way between two steps (SOL 141.405 for bid 141.40, ask 141.41), as the API gives
// it; at the step alone the newest candle's close read as the ask, or the bid. Any other price
// between steps (the crosshair's) is shown at the step, a price the asset can have.
export function chartPrice(price, step) {
  const decimals = decimalsOf(step);
  const fine = Number(price).toFixed(decimals + 1);
  return fine.endsWith("5") ? fine : Number(price).toFixed(decimals);
}

export function isDecimal(value) {
  return typeof value === "string" && DECIMAL.test(value);
}

// A decimal string as [BigInt, decimals] with its sign: "-12.50" -> [-1250n, 2]; null for
// anything else.
function signedUnits(value) {
  const m = DECIMAL.exec(String(value ?? "").trim());
  if (!m) return null;
  const frac = m[3] || "";
  const n = BigInt(m[2] + frac);
  return [m[1] ? -n : n, frac.length];
}

// A positive decimal string as [units, decimals] (BigInt, Number): "12.50" -> [1250n, 2];
// null for anything else.
function units(value) {
  const u = signedUnits(value);
  return u && u[0] > 0n ? u : null;
}

// BigInt ``n`` at ``decimals`` as a decimal string: (1250n, 2) -> "12.50".
function unitsText(n, decimals) {
  const digits = n.toString().padStart(decimals + 1, "0");
  return decimals ? `${digits.slice(0, -decimals)}.${digits.slice(-decimals)}` : digits;
}

// A whole number above zero written in decimal digits (a leverage) as a BigInt; else null.
function positiveWhole(value) {
  const text = String(value ?? "").trim();
  return /^\d+$/.test(text) && BigInt(text) > 0n ? BigInt(text) : null;
}

// The ticket's estimate of an order of ``margin`` at ``leverage`` filled at ``price`` (a
// decimal string): {size, notional} as decimal strings, size = floor(margin * leverage /
// price) on the quantity step, as the engine computes it. Exact (BigInt): in binary floats
// 29 / 100 * 100 is 28.999..., a step short. null unless margin, price and step are positive
// decimals and leverage a positive whole number.
export function estimate(margin, leverage, price, quantityStep) {
  const m = units(margin);
  const step = units(quantityStep);
  const p = units(price);
  const lev = positiveWhole(leverage);
  if (!m || !step || !p || !lev) return null;
  // steps = floor((m / 10^md) * lev / ((p / 10^pd) * (step / 10^sd)))
  const steps = (m[0] * lev * 10n ** BigInt(p[1] + step[1])) / (10n ** BigInt(m[1]) * p[0] * step[0]);
  return { size: unitsText(steps * step[0], step[1]), notional: unitsText(m[0] * lev, m[1]) };
}

// Whether a position's margin is other than the margin it opened with (added to, or some
// removed), from its own fields: an open's quantity is floor(margin * leverage / entry) on the
// quantity step, so until the margin changes margin * leverage - entry * quantity lies in
// [0, entry * step) (a part closed releases its share of the margin, rounded to a micro-dollar:
// leverage micro-dollars either way). The leverage entry * quantity / margin alone is below the
// one opened with by that rounding: 4.95 for 5x when 0.70 SOL of 0.707 is bought. null when a
// field is missing or not a decimal.
export function marginChanged(position, quantityStep) {
  const m = units(position.margin);
  const e = units(position.entryPrice);
  const q = units(position.quantity);
  const step = units(quantityStep);
  const lev = positiveWhole(position.leverage);
  if (!m || !e || !q || !step || !lev) return null;
  const scale = Math.max(m[1], e[1] + q[1], e[1] + step[1]);
  const at = (n, d) => n * 10n ** BigInt(scale - d);
  const gap = at(m[0] * lev, m[1]) - at(e[0] * q[0], e[1] + q[1]);
  const slack = at(lev, 6);
  return gap < -slack || gap >= at(e[0] * step[0], e[1] + step[1]) + slack;
}

// The liquidation price an open of ``margin`` at ``leverage`` filled at ``price`` (a decimal
// string) would get, as the engine computes it: quantity floored to the step, maintenance
// margin at ``asset.maintenanceMarginRate``, the price (long entry - (margin - mm) / quantity,
// short entry + ...) floored (long, at least 0) or ceiled (short) to the price step. Exact
// (BigInt). "none" for a long no positive price liquidates (the API's null); null when no
// such position opens: a price off the step, a margin with more than 6 decimals, under one
// quantity step, or a margin not above the maintenance margin.
export function liquidationEstimate(margin, leverage, price, side, asset) {
  const m = units(margin);
  const p = units(price);
  const rate = signedUnits(asset.maintenanceMarginRate ?? "0");
  const pd = decimalsOf(asset.priceStep);
  const qd = decimalsOf(asset.quantityStep);
  const lev = positiveWhole(leverage);
  if (!m || !p || !lev || !rate || rate[0] < 0n || rate[1] > 6 || m[1] > 6 || p[1] > pd) {
    return null;
  }
  const million = 1000000n;
  const marginMicros = toMicros(m[0], m[1]); // exact: at most 6 decimals
  const entry = p[0] * 10n ** BigInt(pd - p[1]); // in price steps
  const ppm = toMicros(rate[0], rate[1]); // the rate in millionths, exact as well
  const scale = 10n ** BigInt(pd + qd);
  const qty = (marginMicros * lev * scale) / (million * entry); // in quantity steps
  const numerator = marginMicros * scale - ppm * entry * qty;
  if (qty < 1n || numerator <= 0n) return null;
  const divisor = million * qty;
  const distance = numerator / divisor + (numerator % divisor ? 1n : 0n); // ceil, both > 0
  if (side === "long" && entry <= distance) return "none";
  return unitsText(side === "long" ? entry - distance : entry + distance, pd);
}

// The price an order of ``kind`` ("market", "limit", "stop") on ``side`` would fill at on a
// tick of ``quote`` ({bid, ask}, decimal strings): a long at the ask, a short at the bid; a
// pending order at its ``trigger`` unless that quote already crosses it (a limit long with
// its trigger at or above the ask, a stop long at or below it, and the mirror for shorts),
// when it fills at the quote. null without the prices it needs.
export function fillPrice(kind, side, trigger, quote) {
  const at = quote ? (side === "long" ? quote.ask : quote.bid) : null;
  if (kind === "market") return at;
  const t = signedUnits(trigger);
  if (!t || t[0] <= 0n) return null;
  return crossed(kind, side, trigger, quote) ? at : trigger; // (not without a usable quote)
}

// Whether a pending order's ``trigger`` is crossed by ``quote`` already (it fills at the next
// price): the limit of a long and the stop of a short by an ask / bid at or below it, the
// others at or above it. False for a market order, or without a trigger or a quote.
export function crossed(kind, side, trigger, quote) {
  if (kind === "market" || !quote) return false;
  const t = signedUnits(trigger);
  const q = signedUnits(side === "long" ? quote.ask : quote.bid);
  if (!t || t[0] <= 0n || !q) return false;
  const scale = Math.max(t[1], q[1]);
  const tn = t[0] * 10n ** BigInt(scale - t[1]);
  const qn = q[0] * 10n ** BigInt(scale - q[1]);
  return (kind === "limit") === (side === "long") ? qn <= tn : qn >= tn;
}

// BigInt ``n`` at ``decimals`` as micro-dollars, rounded toward minus infinity (SPEC's
// rounding of money).
function toMicros(n, decimals) {
  if (decimals <= 6) return n * 10n ** BigInt(6 - decimals);
  const d = 10n ** BigInt(decimals - 6);
  const q = n / d; // toward zero
  return n < 0n && q * d !== n ? q - 1n : q;
}

// A money string as BigInt micro-dollars (rounded down); null when it is not a decimal.
export function micros(value) {
  const u = signedUnits(value);
  return u && toMicros(u[0], u[1]);
}

// BigInt micro-dollars as a money string: -1234567n -> "-1.234567".
export function microsText(n) {
  return n < 0n ? `-${unitsText(-n, 6)}` : unitsText(n, 6);
}

// Unrealized PnL of a position at a quote, as the engine computes it: long (bid - entry) *
// quantity, short (entry - ask) * quantity, in micro-dollars rounded down (BigInt, exact);
// null without a usable quote.
export function livePnl(position, quote) {
  if (!quote) return null;
  const entry = signedUnits(position.entryPrice);
  const quantity = signedUnits(position.quantity);
  const mark = signedUnits(position.type === "long" ? quote.bid : quote.ask);
  if (!entry || !quantity || !mark) return null;
  const scale = Math.max(entry[1], mark[1]);
  const at = ([n, d]) => n * 10n ** BigInt(scale - d);
  const move = position.type === "long" ? at(mark) - at(entry) : at(entry) - at(mark);
  return toMicros(move * quantity[0], scale + quantity[1]);
}

export function sideClass(value) {
  return value === "long" ? "side-long" : value === "short" ? "side-short" : "";
}

export function pnlClassOf(value) {
  const s = String(value ?? "");
  if (!isDecimal(s) || /^-?0*\.?0*$/.test(s)) return "num";
  return s.startsWith("-") ? "num down" : "num up";
}
