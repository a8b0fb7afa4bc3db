// The console's only way to the server: the HTTP/JSON gateway under /v1 on the same origin.
// The API key lives in sessionStorage (this tab only, gone when it closes), never in
// localStorage or cookies. Errors arrive in the google.rpc.Status shape and are turned into
// plain sentences here, so every page shows them the same way.

const KEY_SLOT = "atelier.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY_SLOT) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_SLOT, key);
  else sessionStorage.removeItem(KEY_SLOT);
}

/** An API failure with a readable `message` (what happened and what to do). */
export class ApiError extends Error {
  constructor(status, body) {
    super(plainWords(status, body));
    this.status = status;
    this.code = body && (body.code ?? null);
    this.body = body;
  }
}

const CODE_NAMES = {
  3: "INVALID_ARGUMENT", 5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED",
  8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION", 10: "ABORTED", 14: "UNAVAILABLE",
  16: "UNAUTHENTICATED", 4: "DEADLINE_EXCEEDED", 13: "INTERNAL", 12: "UNIMPLEMENTED",
};

const LEADS = {
  UNAUTHENTICATED: "The API key was not accepted: check it (API key button, top right).",
  PERMISSION_DENIED: "This API key is not allowed to do that.",
  NOT_FOUND: "Not found.",
  INVALID_ARGUMENT: "The request was not valid.",
  FAILED_PRECONDITION: "The request conflicts with the current state.",
  ALREADY_EXISTS: "That already exists.",
  RESOURCE_EXHAUSTED: "The server is busy or a quota is used up.",
  UNAVAILABLE: "The server is unavailable right now.",
  DEADLINE_EXCEEDED: "The server took too long to answer.",
  ABORTED: "The request was aborted; try again.",
  INTERNAL: "The server failed while handling the request.",
};

function codeName(status, body) {
  const code = body && body.code;
  if (typeof code === "string" && isNaN(Number(code))) return code;
  if (code !== undefined && CODE_NAMES[Number(code)]) return CODE_NAMES[Number(code)];
  if (status === 401) return "UNAUTHENTICATED";
  if (status === 403) return "PERMISSION_DENIED";
  if (status === 404) return "NOT_FOUND";
  if (status === 409) return "ABORTED";
  if (status === 429) return "RESOURCE_EXHAUSTED";
  if (status === 503) return "UNAVAILABLE";
  if (status === 0) return "UNAVAILABLE";
  return "";
}

/** Status body -> sentences: the lead for the code, then the server's message and its details,
 * each said once (servers often repeat the message in a BadRequest or PreconditionFailure). */
export function plainWords(status, body) {
  const name = codeName(status, body);
  const lead = name === "UNAUTHENTICATED" && !apiKey()
    ? "This server needs an API key: enter yours (API key button, top right)."
    : LEADS[name] || `The server answered ${status || "nothing"}.`;
  const details = [...((body && body.details) || [])]
    .sort((a, b) => Number(!String(a["@type"]).endsWith("BadRequest")) - Number(!String(b["@type"]).endsWith("BadRequest")));
  const sentences = [];
  const cores = [];
  const message = ((body && body.message) || "").trim();
  for (const sentence of details.flatMap((d) => describeDetail(d, message))) {
    const core = sentence.replace(/^[^:]*: /, "").replace(/\.$/, "").toLowerCase();
    if (!cores.some((seen) => seen.includes(core))) {
      sentences.push(sentence);
      cores.push(core);
    }
  }
  const plain = message.replace(/^[^:\s]*: /, "").toLowerCase();
  if (message && !cores.some((core) => core.includes(plain)) && !lead.includes(message)) {
    sentences.unshift(capitalise(message) + ".");
  }
  return [lead, ...sentences].join(" ").replace(/\.\.+/g, ".");
}

function describeDetail(detail, message) {
  const type = String(detail["@type"] || "");
  const d = snakeKeys(detail);
  if (type.endsWith("BadRequest")) {
    return (d.field_violations || []).map((v) => `Field ${v.field}: ${v.description}.`);
  }
  if (type.endsWith("PreconditionFailure")) {
    return (d.violations || []).map((v) => `${v.subject || v.type || "Precondition"}: ${v.description}.`);
  }
  if (type.endsWith("QuotaFailure")) {
    return (d.violations || []).map((v) => `Quota ${v.subject || ""}: ${v.description}.`);
  }
  if (type.endsWith("RetryInfo") && d.retry_delay) {
    return [`Try again in ${parseFloat(d.retry_delay) || d.retry_delay} s.`];
  }
  if (type.endsWith("ResourceInfo") && d.resource_name && !message.includes(d.resource_name)) {
    return [`(${d.resource_type || "resource"} ${d.resource_name})`];
  }
  return [];
}

function capitalise(text) {
  return text ? text[0].toUpperCase() + text.slice(1) : text;
}

/** JSON from the gateway may use lowerCamelCase (json_name) or proto names; use proto names. */
export function snakeKeys(value) {
  if (Array.isArray(value)) return value.map(snakeKeys);
  if (value === null || typeof value !== "object") return value;
  const out = {};
  for (const [key, inner] of Object.entries(value)) {
    const snake = key.startsWith("@") ? key : key.replace(/[A-Z]/g, (c) => "_" + c.toLowerCase());
    out[snake] = snakeKeys(inner);
  }
  return out;
}

function headers(extra = {}) {
  const all = { ...extra };
  const key = apiKey();
  if (key) all.Authorization = `Bearer ${key}`;
  return all;
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = { message: (await response.text().catch(() => "")).slice(0, 200) };
  }
  return new ApiError(response.status, body);
}

async function send(method, path, { json, form, query, raw } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query || {})) {
    if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  }
  const init = { method, headers: headers() };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (error) {
    throw new ApiError(0, { message: `could not reach the server (${error.message})` });
  }
  if (!response.ok) throw await failure(response);
  if (raw) return response;
  const text = await response.text();
  return text ? snakeKeys(JSON.parse(text)) : {};
}

export const api = {
  get: (path, query) => send("GET", path, { query }),
  post: (path, json) => send("POST", path, { json }),
  put: (path, json) => send("PUT", path, { json }),
  del: (path) => send("DELETE", path),
  upload: (path, form) => send("POST", path, { form }),
  raw: (path, query) => send("GET", path, { query, raw: true }),
};

/**
 * Read a Server-Sent Events stream with fetch (EventSource cannot send the Authorization
 * header). Calls onEvent(message) per `data:` event, snake_cased; `event: error` (a
 * google.rpc.Status) rejects with an ApiError; `event: end` or the end of the body resolves.
 * `signal` aborts it.
 */
export async function stream(method, path, { json, signal, onEvent }) {
  const init = { method, headers: headers({ Accept: "text/event-stream" }), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(new URL(path, location.origin), init);
  } catch (error) {
    if (error.name === "AbortError") return;
    throw new ApiError(0, { message: `could not reach the server (${error.message})` });
  }
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (error) {
      if (error.name === "AbortError") return;
      throw new ApiError(0, { message: `the stream broke (${error.message})` });
    }
    if (chunk.done) break;
    buffer += chunk.value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      dispatch(buffer.slice(0, end), onEvent);
      buffer = buffer.slice(end + 2);
    }
  }
  if (buffer.trim()) dispatch(buffer, onEvent);
}

function dispatch(block, onEvent) {
  let kind = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) kind = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (!data.length || kind === "end") return;
  const payload = JSON.parse(data.join("\n"));
  if (kind === "error") throw new ApiError(httpOf(payload.code), payload);
  onEvent(snakeKeys(payload));
}

/** The HTTP status the gateway would have sent for a gRPC code (an error inside a stream). */
function httpOf(code) {
  return { 3: 400, 5: 404, 7: 403, 8: 429, 9: 400, 10: 409, 14: 503, 16: 401, 4: 504 }[Number(code)] || 500;
}
