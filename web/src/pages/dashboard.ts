import { api } from "../api";
import { LineChart } from "../charts";
import { fmtBytes, fmtNum, h, mount } from "../dom";
import type { Page } from "../main";
import { bucketDelta, buckets, parsePrometheus, quantile, total, type Sample } from "../metrics";

const POLL_MS = 2000;
const WINDOW_S = 60; // TTFT percentiles over the last minute
const HISTORY = 150; // points on the chart: 5 minutes at 2 s

interface Scrape {
  t: number; // seconds
  samples: Sample[];
}

// herd_model_memory_bytes kinds, in the order the table lists them.
const MEMORY_KINDS: [kind: string, label: string][] = [
  ["weights", "weights"],
  ["kv_cache", "KV cache"],
  ["compute", "compute"],
];

/** Per loaded model, what llama.cpp allocated for it: kind -> bytes. */
function modelMemory(samples: Sample[]): Map<string, Map<string, number>> {
  const out = new Map<string, Map<string, number>>();
  for (const s of samples) {
    if (s.name !== "herd_model_memory_bytes") continue;
    const kinds = out.get(s.labels.model) ?? new Map<string, number>();
    kinds.set(s.labels.kind, s.value);
    out.set(s.labels.model, kinds);
  }
  return out;
}

function sum(values: Iterable<number>): number {
  let s = 0;
  for (const v of values) s += v;
  return s;
}

/** The value of a series without labels, or null when /metrics has none (no procfs). */
function gauge(samples: Sample[], name: string): number | null {
  const x = samples.find((s) => s.name === name);
  return x ? x.value : null;
}

function card(label: string, testid: string): { el: HTMLElement; value: HTMLElement; sub: HTMLElement } {
  const value = h("div", { class: "value", "data-testid": testid }, "–");
  const sub = h("div", { class: "sub" });
  return { el: h("div", { class: "stat card" }, h("div", { class: "label" }, label), value, sub), value, sub };
}

/** A model's memory: the total, then each kind llama.cpp could tell. A model loaded
 *  between the two requests is not in this scrape yet: /api/ps's size is the same total. */
function memoryCell(kinds: Map<string, number> | undefined, psSize: number | undefined): HTMLElement {
  if (!kinds || !kinds.size) return h("td", { "data-testid": "model-memory" }, fmtBytes(psSize));
  const parts = MEMORY_KINDS.filter(([k]) => kinds.has(k)).map(([k, label]) => `${label} ${fmtBytes(kinds.get(k))}`);
  return h("td", { "data-testid": "model-memory" }, fmtBytes(sum(kinds.values())), h("br"), h("small", null, parts.join(" · ")));
}

export function dashboardPage(): Page {
  const tokS = card("Generation", "tok-s");
  const queue = card("Queue depth", "queue");
  const active = card("Active sequences", "active");
  const ttft = card("Time to first token", "ttft");
  const loadedCard = card("Loaded models", "loaded");
  const requests = card("Requests", "requests");
  // Process memory rides in the loaded-models card: six cards fill one row.
  const modelBytesEl = h("span", { "data-testid": "models-memory" }, "–");
  const rssEl = h("span", { "data-testid": "memory" }, "–");
  mount(loadedCard.sub, modelBytesEl, " allocated by llama.cpp · process RSS ", rssEl);
  const chart = new LineChart(
    [
      { label: "tok/s", color: "#2f8f63" },
      { label: "active", color: "#3b6fd1" },
      { label: "queued", color: "#d9822b" },
    ],
    { xLabel: "time", yLabel: "", time: true, testid: "throughput-chart", window: (HISTORY * POLL_MS) / 1000 },
  );
  const psBody = h("tbody");
  const note = h("p", { class: "muted" });
  const el = h(
    "div",
    { class: "page dashboard-page" },
    h("h1", null, "Dashboard"),
    h("div", { class: "stats" }, tokS.el, queue.el, active.el, ttft.el, loadedCard.el, requests.el),
    h("section", { class: "card" }, h("h2", null, "Throughput"), chart.el),
    h(
      "section",
      { class: "card" },
      h("h2", null, "Loaded models"),
      h("table", { "data-testid": "loaded-models" }, h("thead", null, h("tr", null, ["Model", "Memory", "Context", "Unloads at"].map((t) => h("th", null, t)))), psBody),
      note,
    ),
  );

  const scrapes: Scrape[] = [];
  const series: number[][] = [[], [], [], []];
  let timer = 0;
  let stopped = false;

  async function poll(): Promise<void> {
    let text: string;
    try {
      text = await api<string>("/metrics");
    } catch (e) {
      note.textContent = `metrics unavailable: ${e instanceof Error ? e.message : e}`;
      return;
    }
    const now: Scrape = { t: Date.now() / 1000, samples: parsePrometheus(text) };
    const prev = scrapes[scrapes.length - 1] ?? null;
    scrapes.push(now);
    while (scrapes.length > 2 && now.t - scrapes[0].t > WINDOW_S) scrapes.shift();

    const gen = total(now.samples, "herd_completion_tokens_total");
    const prompt = total(now.samples, "herd_prompt_tokens_total");
    let rate = 0;
    let promptRate = 0;
    if (prev) {
      const dt = Math.max(0.001, now.t - prev.t);
      rate = Math.max(0, gen - total(prev.samples, "herd_completion_tokens_total")) / dt;
      promptRate = Math.max(0, prompt - total(prev.samples, "herd_prompt_tokens_total")) / dt;
    }
    tokS.value.textContent = `${fmtNum(rate, 1)} tok/s`;
    tokS.sub.textContent = `prompt ${fmtNum(promptRate, 0)} tok/s · ${fmtNum(gen, 0)} generated in all`;
    const q = total(now.samples, "herd_queue_depth_total");
    const a = total(now.samples, "herd_active_sequences_total");
    queue.value.textContent = fmtNum(q, 0);
    active.value.textContent = fmtNum(a, 0);

    const oldest = scrapes.length > 1 ? scrapes[0] : null;
    const windowBuckets = bucketDelta(buckets(now.samples, "herd_time_to_first_token_seconds"), oldest ? buckets(oldest.samples, "herd_time_to_first_token_seconds") : null);
    const n = Math.max(0, ...windowBuckets.values());
    const useAll = n === 0;
    const b = useAll ? buckets(now.samples, "herd_time_to_first_token_seconds") : windowBuckets;
    const ms = (v: number | null) => (v === null ? "–" : `${fmtNum(v * 1000, 0)} ms`);
    const p50 = quantile(0.5, b);
    ttft.value.textContent = ms(p50);
    ttft.sub.textContent = `p50 ${ms(p50)} · p90 ${ms(quantile(0.9, b))} · p99 ${ms(quantile(0.99, b))} ${useAll ? "(since start)" : "(last minute)"}`;
    requests.value.textContent = fmtNum(total(now.samples, "herd_http_requests_total"), 0);
    const finished = total(now.samples, "herd_sequences_total");
    requests.sub.textContent = `${fmtNum(finished, 0)} sequences finished`;

    // Memory: the process as the kernel counts it (RSS), and per model what llama.cpp
    // allocated (weights, KV cache, compute buffers): the same figures as /metrics.
    const perModel = modelMemory(now.samples);
    const modelBytes = sum(Array.from(perModel.values(), (kinds) => sum(kinds.values())));
    modelBytesEl.textContent = fmtBytes(modelBytes);
    rssEl.textContent = fmtBytes(gauge(now.samples, "process_resident_memory_bytes"));

    series[0].push(now.t);
    series[1].push(rate);
    series[2].push(a);
    series[3].push(q);
    for (const s of series) while (s.length > HISTORY) s.shift();
    chart.set(series);

    try {
      const ps = await api<{ models: any[] }>("/api/ps");
      loadedCard.value.textContent = String(ps.models.length);
      mount(
        psBody,
        ps.models.length
          ? ps.models.map((m) => h("tr", null, h("td", null, m.name), memoryCell(perModel.get(m.name), m.size), h("td", null, String(m.context_length ?? "–")), h("td", null, new Date(m.expires_at).toLocaleTimeString())))
          : h("tr", null, h("td", { colspan: 4, class: "muted" }, "None loaded.")),
      );
      note.textContent = "";
    } catch {
      /* keep the last table */
    }
  }

  async function loop(): Promise<void> {
    if (stopped) return;
    await poll();
    if (!stopped) timer = window.setTimeout(() => void loop(), POLL_MS);
  }
  void loop();
  return {
    el,
    dispose: () => {
      stopped = true;
      clearTimeout(timer);
      chart.destroy();
    },
  };
}
