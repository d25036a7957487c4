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

function card(label: string, testid: string): { el: HTMLElement; value: HTMLElement; sub: HTMLElement } {
  const value = h("div", { class: "value", "data-testid": testid }, "–");
  const sub = h("div", { class: "sub" });
  return { el: h("div", { class: "stat card" }, h("div", { class: "label" }, label), value, sub), value, sub };
}

export function dashboardPage(): Page {
  const tokS = card("Generation", "tok-s");
  const queue = card("Queue depth", "queue");
  const active = card("Active sequences", "active");
  const ttft = card("Time to first token", "ttft");
  const loadedCard = card("Loaded models", "loaded");
  const requests = card("Requests", "requests");
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

    series[0].push(now.t);
    series[1].push(rate);
    series[2].push(a);
    series[3].push(q);
    for (const s of series) while (s.length > HISTORY) s.shift();
    chart.set(series);

    try {
      const ps = await api<{ models: any[] }>("/api/ps");
      const bytes = ps.models.reduce((s, m) => s + (m.size ?? 0), 0);
      loadedCard.value.textContent = String(ps.models.length);
      loadedCard.sub.textContent = `${fmtBytes(bytes)} of model memory`;
      mount(
        psBody,
        ps.models.length
          ? ps.models.map((m) => h("tr", null, h("td", null, m.name), h("td", null, fmtBytes(m.size)), h("td", null, String(m.context_length ?? "–")), h("td", null, new Date(m.expires_at).toLocaleTimeString())))
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
