// Display formatting. Amounts stay the decimal strings the API gives; plain numbers are used
// only for values computed for display (live unrealized PnL, estimates).

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

export function isDecimal(value) {
  return typeof value === "string" && DECIMAL.test(value);
}

// Display-only unrealized PnL of a position at a quote: long (bid - entry) * quantity,
// short (entry - ask) * quantity. null without a usable quote.
export function livePnl(position, quote) {
  if (!quote) return null;
  const entry = Number(position.entryPrice);
  const quantity = Number(position.quantity);
  const mark = Number(position.type === "long" ? quote.bid : quote.ask);
  if (![entry, quantity, mark].every(Number.isFinite)) return null;
  return position.type === "long" ? (mark - entry) * quantity : (entry - mark) * quantity;
}

export function signedNumber(n, decimals = 2) {
  if (n === null || !Number.isFinite(n)) return DASH;
  const fixed = n.toFixed(decimals);
  if (/^-0\.0*$/.test(fixed)) return fixed.slice(1);
  return n > 0 && !/^0\.0*$/.test(fixed) ? `+${fixed}` : fixed;
}

export function sideClass(value) {
  return value === "long" ? "side-long" : value === "short" ? "side-short" : "";
}

export function pnlClass(n) {
  if (n === null || !Number.isFinite(n) || Math.abs(n) < 0.005) return "num"; // shows as 0.00
  return n > 0 ? "num up" : "num down";
}

export function pnlClassOf(value) {
  const s = String(value ?? "");
  if (!isDecimal(s) || /^-?0*\.?0*$/.test(s)) return "num";
  return s.startsWith("-") ? "num down" : "num up";
}
