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

export async function call(method, path, { key = null, body, query } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (key) headers.Authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch(apiUrl(path, query), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
    });
  } catch (err) {
    throw new ApiError(0, "NETWORK_ERROR", `the server did not answer (${err && err.message ? err.message : err})`);
  }
  const raw = await response.text().catch(() => "");
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
