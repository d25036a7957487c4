// Every request of the app goes through here: JSON in and out, errors as ApiError
// with the server's own message, the CSRF token on state-changing requests, and a
// 401 turned into the login screen.

export class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly code: string | null = null,
  ) {
    super(message);
  }
}

let csrfToken: string | null = null;
const authListeners: Array<() => void> = [];

export function setCsrf(token: string | null): void {
  csrfToken = token;
}

export function onAuthRequired(fn: () => void): void {
  authListeners.push(fn);
}

const UNSAFE = new Set(["POST", "PUT", "PATCH", "DELETE"]);

export interface RequestOptions {
  method?: string;
  json?: unknown;
  body?: BodyInit;
  headers?: Record<string, string>;
  signal?: AbortSignal;
}

export function requestInit(opts: RequestOptions = {}): RequestInit {
  const method = opts.method ?? (opts.json !== undefined || opts.body !== undefined ? "POST" : "GET");
  const headers: Record<string, string> = { ...(opts.headers ?? {}) };
  let body = opts.body;
  if (opts.json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(opts.json);
  }
  if (UNSAFE.has(method) && csrfToken) headers["X-CSRF-Token"] = csrfToken;
  return { method, headers, body, signal: opts.signal, credentials: "same-origin", cache: "no-store" };
}

/** The error message of a failed response: OpenAI's {error: {message}} or Ollama's {error: "..."}. */
export async function errorOf(resp: Response): Promise<ApiError> {
  let message = `${resp.status} ${resp.statusText}`;
  let code: string | null = null;
  try {
    const data = await resp.json();
    const err = data?.error;
    if (typeof err === "string") message = err;
    else if (err && typeof err.message === "string") {
      message = err.message;
      code = typeof err.code === "string" ? err.code : null;
    }
  } catch {
    /* not JSON: keep the status line */
  }
  if (resp.status === 401) for (const fn of authListeners) fn();
  return new ApiError(message, resp.status, code);
}

export async function raw(path: string, opts: RequestOptions = {}): Promise<Response> {
  const resp = await fetch(path, requestInit(opts));
  if (!resp.ok) throw await errorOf(resp);
  return resp;
}

export async function api<T = any>(path: string, opts: RequestOptions = {}): Promise<T> {
  const resp = await raw(path, opts);
  if (resp.status === 204) return undefined as T;
  const type = resp.headers.get("content-type") ?? "";
  return (type.includes("json") ? resp.json() : resp.text()) as Promise<T>;
}

/** Lines of a streamed body (NDJSON), as they arrive. */
export async function* lines(resp: Response): AsyncGenerator<string> {
  const reader = resp.body!.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let i: number;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 1);
        if (line) yield line;
      }
    }
    if (buf.trim()) yield buf.trim();
  } finally {
    reader.releaseLock();
  }
}

/** The `data:` payloads of a server-sent event stream (OpenAI's streaming format). */
export async function* sse(resp: Response): AsyncGenerator<string> {
  const reader = resp.body!.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value.replace(/\r\n/g, "\n");
      let i: number;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, i);
        buf = buf.slice(i + 2);
        const data = event
          .split("\n")
          .filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) yield data;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

/** Upload with progress events (fetch has none for request bodies). */
export function upload(
  path: string,
  body: Blob,
  onProgress: (fraction: number) => void,
  contentType = "application/octet-stream",
): Promise<any> {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    xhr.setRequestHeader("Content-Type", contentType);
    if (csrfToken) xhr.setRequestHeader("X-CSRF-Token", csrfToken);
    xhr.withCredentials = true;
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total);
    };
    xhr.onload = () => {
      let data: any = null;
      try {
        data = JSON.parse(xhr.responseText);
      } catch {
        /* keep null */
      }
      if (xhr.status >= 200 && xhr.status < 300) return resolve(data);
      const err = data?.error;
      const msg = typeof err === "string" ? err : err?.message ?? `${xhr.status} ${xhr.statusText}`;
      if (xhr.status === 401) for (const fn of authListeners) fn();
      reject(new ApiError(msg, xhr.status, err?.code ?? null));
    };
    xhr.onerror = () => reject(new ApiError("the upload failed: the server could not be reached", 0));
    xhr.send(body);
  });
}

export function q(params: Record<string, string | number | boolean | null | undefined>): string {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") u.set(k, String(v));
  const s = u.toString();
  return s ? `?${s}` : "";
}

export function enc(s: string): string {
  return encodeURIComponent(s);
}
