// A tiny DOM builder. Every string becomes a text node and every attribute goes
// through setAttribute or a property: nothing here parses HTML, so untrusted text
// (model output, persona fields, file names) cannot become markup by accident.
// The one place that does produce HTML from text is markdown.ts, through DOMPurify.

export type Child = Node | string | number | null | undefined | false | Child[];

type Handler = (ev: any) => void;

export interface Attrs {
  [name: string]: unknown;
  class?: string;
  on?: Record<string, Handler>;
  dataset?: Record<string, string>;
}

const SAFE_URL = /^(?:\/(?!\/)|#|\?|https?:|mailto:|blob:)/i;

export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs?: Attrs | null,
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  if (attrs) {
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "on") {
        for (const [ev, fn] of Object.entries(value as Record<string, Handler>)) el.addEventListener(ev, fn);
      } else if (name === "dataset") {
        Object.assign(el.dataset, value);
      } else if (name === "class") {
        el.className = String(value);
      } else if (name === "value" || name === "checked" || name === "selected" || name === "indeterminate") {
        (el as any)[name] = value;
      } else if (name.startsWith("on")) {
        throw new Error("use the `on` map for event handlers");
      } else if (name === "href" || name === "src" || name === "action") {
        const url = String(value);
        if (!SAFE_URL.test(url)) throw new Error(`refusing a ${name} of ${url.slice(0, 40)}`);
        el.setAttribute(name, url);
      } else {
        el.setAttribute(name, value === true ? "" : String(value));
      }
    }
  }
  append(el, children);
  return el;
}

export function append(parent: Node, children: Child[]): void {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(parent, c);
    else parent.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
}

export function clear(el: Element): void {
  el.replaceChildren();
}

export function mount(el: Element, ...children: Child[]): void {
  el.replaceChildren();
  append(el, children);
}

export function fmtBytes(n: number | null | undefined): string {
  if (n === null || n === undefined || !isFinite(n)) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(v >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}

export function fmtNum(n: number | null | undefined, digits = 2): string {
  if (n === null || n === undefined || !isFinite(n)) return "–";
  return n.toLocaleString(undefined, { maximumFractionDigits: digits });
}

export function fmtTime(ts: number | null | undefined): string {
  if (!ts) return "–";
  return new Date(ts * 1000).toLocaleString();
}

export function ago(ts: number): string {
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 60) return "just now";
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(ts * 1000).toLocaleDateString();
}

let toastBox: HTMLElement | null = null;

/** A transient message; text only. */
export function toast(message: string, kind: "info" | "error" | "ok" = "info"): void {
  if (!toastBox) {
    toastBox = h("div", { class: "toasts", role: "status", "aria-live": "polite" });
    document.body.appendChild(toastBox);
  }
  const t = h("div", { class: `toast ${kind}` }, message);
  toastBox.appendChild(t);
  setTimeout(() => t.remove(), kind === "error" ? 8000 : 3500);
}

/** A labelled form row. */
export function field(label: string, control: HTMLElement, hint?: string): HTMLElement {
  return h("label", { class: "field" }, h("span", { class: "label" }, label), control, hint ? h("small", null, hint) : null);
}

/** Trigger a download of a same-origin URL (the session cookie goes with it). */
export function download(url: string): void {
  const a = h("a", { href: url, download: "" });
  document.body.appendChild(a);
  a.click();
  a.remove();
}

export function debounceFrame(fn: () => void): () => void {
  let queued = false;
  return () => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => {
      queued = false;
      fn();
    });
  };
}
