import { api, enc, lines, q, raw, upload } from "../api";
import { BarChart, LineChart } from "../charts";
import { ago, fmtBytes, fmtNum, h, field, mount, toast } from "../dom";
import type { Page } from "../main";
import { loadModels, type ModelEntry } from "../targets";

interface Job {
  id: string;
  kind: "tune" | "eval";
  status: string;
  params: Record<string, any>;
  created_at: number;
  started_at: number | null;
  finished_at: number | null;
  progress: Record<string, any>;
  points?: { step: number; loss?: number; eval_loss?: number }[];
  result: any;
  error: string | null;
  log?: string[];
}

const COLORS = ["#2f8f63", "#d9822b", "#3b6fd1", "#b04aa8"];

export function tunePage(arg: string): Page {
  const jobsBody = h("tbody");
  const detail = h("section", { class: "card job-detail", "data-testid": "job-detail" });
  let models: ModelEntry[] = [];
  let watch: AbortController | null = null;
  let charts: { destroy(): void }[] = [];
  let timer = 0;

  // ------------------------------------------------------------ the tune form
  const base = h("select", { name: "base", "data-testid": "tune-base" });
  const out = h("input", { name: "out", required: true, pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,127}", placeholder: "my-model", "data-testid": "tune-out" });
  const data = h("input", { type: "file", accept: ".jsonl,application/jsonl,application/x-ndjson", required: true, "data-testid": "tune-data" });
  const numbers: Record<string, HTMLInputElement> = {
    epochs: h("input", { type: "number", min: 0.01, step: "any", value: 3 }),
    max_steps: h("input", { type: "number", min: 0, step: 1, placeholder: "0 = by epochs" }),
    lr: h("input", { type: "number", min: 0, step: "any", value: 0.0002 }),
    rank: h("input", { type: "number", min: 1, step: 1, value: 8 }),
    batch_size: h("input", { type: "number", min: 1, step: 1, value: 4 }),
    seq_len: h("input", { type: "number", min: 8, step: 1, value: 1024 }),
    save_every: h("input", { type: "number", min: 1, step: 1, value: 100 }),
  };
  for (const [k, inp] of Object.entries(numbers)) inp.dataset.testid = `tune-${k.replace("_", "-")}`;
  const overwrite = h("input", { type: "checkbox", name: "overwrite" });
  const uploadBar = h("progress", { max: 1, value: 0, hidden: true });
  const tuneBtn = h("button", { class: "primary", type: "submit", "data-testid": "tune-start" }, "Start fine-tune");
  const tuneForm = h("form", {
    class: "card",
    on: {
      submit: async (ev: Event) => {
        ev.preventDefault();
        const file = data.files?.[0];
        if (!file) return toast("Choose a JSONL file of training examples.", "error");
        const params: Record<string, string | number | boolean> = { base: base.value, out: out.value.trim() };
        for (const [k, inp] of Object.entries(numbers)) if (inp.value.trim() !== "") params[k] = inp.value.trim();
        if (overwrite.checked) params.overwrite = true;
        tuneBtn.disabled = true;
        uploadBar.hidden = false;
        try {
          const job = await upload(`/v1/jobs/tune${q(params)}`, file, (f) => (uploadBar.value = f), "application/x-ndjson");
          toast(`Started ${job.id}: ${job.params.examples} examples`, "ok");
          location.hash = `#/tune/${job.id}`;
        } catch (e) {
          toast(e instanceof Error ? e.message : String(e), "error");
        } finally {
          tuneBtn.disabled = false;
          uploadBar.hidden = true;
        }
      },
    },
  },
    h("h2", null, "Fine-tune (LoRA)"),
    h("p", { class: "muted" }, "Upload JSONL: one {\"messages\": [...]} or {\"prompt\", \"completion\"} object per line. The loss covers the assistant's tokens only; the result is registered as a new model."),
    h("div", { class: "grid2" }, field("Base model", base), field("New model name", out), field("Training data (.jsonl)", data)),
    h("details", null, h("summary", null, "Training settings"),
      h("div", { class: "grid3" }, Object.entries(numbers).map(([k, inp]) => field(k.replace("_", " "), inp))),
      h("label", { class: "check" }, overwrite, " discard an earlier run's checkpoints of this name")),
    uploadBar,
    h("div", { class: "row end" }, tuneBtn));

  // ------------------------------------------------------------ the eval form
  const task = h("select", { name: "task", "data-testid": "eval-task" });
  const modelA = h("select", { name: "a", "data-testid": "eval-a" });
  const modelB = h("select", { name: "b", "data-testid": "eval-b" });
  const limit = h("input", { type: "number", min: 1, step: 1, placeholder: "all items", "data-testid": "eval-limit" });
  const evalBtn = h("button", { class: "primary", type: "submit", "data-testid": "eval-start" }, "Run evaluation");
  const evalForm = h("form", {
    class: "card",
    on: {
      submit: async (ev: Event) => {
        ev.preventDefault();
        const chosen = [modelA.value, modelB.value].filter(Boolean);
        const body: Record<string, unknown> = { task: task.value, models: chosen };
        if (limit.value.trim()) body.limit = parseInt(limit.value, 10);
        evalBtn.disabled = true;
        try {
          const job = await api<Job>("/v1/jobs/eval", { json: body });
          location.hash = `#/tune/${job.id}`;
        } catch (e) {
          toast(e instanceof Error ? e.message : String(e), "error");
        } finally {
          evalBtn.disabled = false;
        }
      },
    },
  },
    h("h2", null, "Evaluate"),
    h("p", { class: "muted" }, "Score a model on a task; pick a second model (e.g. the tuned one) to compare them side by side."),
    h("div", { class: "grid2" }, field("Task", task), field("Limit", limit), field("Model A (base)", modelA), field("Model B (tuned, optional)", modelB)),
    h("div", { class: "row end" }, evalBtn));

  const forms = h("div", { class: "grid2 top" }, tuneForm, evalForm);
  const jobsCard = h("section", { class: "card" }, h("h2", null, "Jobs"),
    h("table", { class: "jobs", "data-testid": "jobs" },
      h("thead", null, h("tr", null, ["Job", "Kind", "What", "Status", "Progress", "Started", ""].map((t) => h("th", null, t)))), jobsBody));
  // Watching a job: its live view comes first; otherwise the forms to start one.
  const el = h("div", { class: "page tune-page" }, h("h1", null, "Tune & evaluate"),
    arg ? [detail, jobsCard, forms] : [forms, jobsCard, detail]);

  function what(job: Job): string {
    return job.kind === "tune" ? `${job.params.base} → ${job.params.out}` : `${job.params.task}: ${(job.params.models ?? []).join(" vs ")}`;
  }

  function progressText(job: Job): string {
    const p = job.progress ?? {};
    if (job.kind === "tune" && p.step !== undefined) return `step ${p.step}${p.total ? ` / ${p.total}` : ""}${p.loss !== undefined ? ` · loss ${fmtNum(p.loss, 4)}` : ""}`;
    if (job.kind === "eval" && p.model) return `${p.model} (${p.index}/${p.total})`;
    return "";
  }

  async function refreshJobs(): Promise<void> {
    try {
      const list = await api<{ data: Job[] }>("/v1/jobs");
      mount(jobsBody, list.data.length ? list.data.map((j) =>
        h("tr", { class: j.id === arg ? "active" : "", "data-job": j.id },
          h("td", null, h("a", { href: `#/tune/${j.id}` }, j.id)),
          h("td", null, j.kind),
          h("td", null, what(j)),
          h("td", null, h("span", { class: `status ${j.status}` }, j.status)),
          h("td", null, progressText(j)),
          h("td", null, j.started_at ? ago(j.started_at) : "–"),
          h("td", null, !["succeeded", "failed", "cancelled"].includes(j.status)
            ? h("button", { type: "button", class: "small danger", on: { click: () => void cancel(j.id) } }, "Cancel")
            : h("button", { type: "button", class: "small", on: { click: () => void remove(j.id) } }, "Remove"))))
        : h("tr", null, h("td", { colspan: 7, class: "muted" }, "No jobs yet.")));
    } catch (e) {
      toast(e instanceof Error ? e.message : String(e), "error");
    }
  }

  async function cancel(id: string): Promise<void> {
    try {
      await api(`/v1/jobs/${enc(id)}/cancel`, { method: "POST" });
      void refreshJobs();
    } catch (e) {
      toast(e instanceof Error ? e.message : String(e), "error");
    }
  }

  async function remove(id: string): Promise<void> {
    try {
      await api(`/v1/jobs/${enc(id)}`, { method: "DELETE" });
      if (id === arg) location.hash = "#/tune";
      else void refreshJobs();
    } catch (e) {
      toast(e instanceof Error ? e.message : String(e), "error");
    }
  }

  // ------------------------------------------------------------ one job, live
  function renderTuneDetail(job: Job): { update(job: Job): void } {
    const chart = new LineChart(
      [{ label: "train loss", color: COLORS[0] }, { label: "eval loss", color: COLORS[1], points: true }],
      { xLabel: "step", yLabel: "loss", testid: "loss-chart" },
    );
    charts.push(chart);
    const status = h("div", { class: "job-status", "data-testid": "job-status" });
    const bar = h("progress", { max: 1, value: 0 });
    const log = h("pre", { class: "log", "data-testid": "job-log" });
    mount(detail, h("h2", null, `Fine-tune ${job.params.out}`), status, bar, chart.el, h("details", null, h("summary", null, "Log"), log));
    return {
      update(j: Job) {
        const p = j.progress ?? {};
        mount(status, h("span", { class: `status ${j.status}` }, j.status), " ", progressText(j),
          p.tok_s ? ` · ${fmtNum(p.tok_s, 0)} tok/s` : "", p.eval_loss !== undefined ? ` · eval loss ${fmtNum(p.eval_loss, 4)}` : "",
          ` · ${j.params.examples ?? "?"} examples (${fmtBytes(j.params.data_bytes)})`,
          j.error ? h("div", { class: "error" }, j.error) : null,
          j.status === "succeeded" && j.result?.model ? h("div", null, "Registered as ", h("a", { href: `#/chat/m:${encodeURIComponent(j.result.model)}` }, j.result.model), ": chat with it, or evaluate it against its base above.") : null);
        if (p.total) {
          bar.max = p.total;
          bar.value = p.step ?? 0;
        }
        const pts = j.points ?? [];
        const steps = Array.from(new Set(pts.map((x) => x.step))).sort((a, b) => a - b);
        const train = new Map(pts.filter((x) => x.loss !== undefined).map((x) => [x.step, x.loss!]));
        const evals = new Map(pts.filter((x) => x.eval_loss !== undefined).map((x) => [x.step, x.eval_loss!]));
        if (steps.length) chart.set([steps, steps.map((s) => train.get(s) ?? null), steps.map((s) => evals.get(s) ?? null)]);
        log.textContent = (j.log ?? []).join("\n");
      },
    };
  }

  function renderEvalDetail(job: Job): { update(job: Job): void } {
    const chart = new BarChart("eval-chart");
    charts.push(chart);
    const status = h("div", { class: "job-status", "data-testid": "job-status" });
    const table = h("div", { class: "eval-table" });
    const log = h("pre", { class: "log", "data-testid": "job-log" });
    mount(detail, h("h2", null, `Evaluation: ${job.params.task}`), status, table, chart.el, h("details", null, h("summary", null, "Log"), log));
    return {
      update(j: Job) {
        mount(status, h("span", { class: `status ${j.status}` }, j.status), " ", progressText(j), j.error ? h("div", { class: "error" }, j.error) : null);
        log.textContent = (j.log ?? []).join("\n");
        const results: Record<string, any> = j.result?.models ?? {};
        const names = (j.params.models as string[]).filter((m) => results[m]);
        if (!names.length) return;
        const metrics = Array.from(new Set(names.flatMap((m) => Object.keys(results[m].metrics ?? {}))));
        const cell = (m: string, k: string) => {
          const v = results[m].metrics?.[k];
          const ci = results[m].intervals?.[k];
          return h("td", null, typeof v === "number" ? fmtNum(v, 4) : "–", Array.isArray(ci) ? h("small", null, ` [${fmtNum(ci[0], 3)}, ${fmtNum(ci[1], 3)}]`) : null);
        };
        mount(table, h("table", { class: "results", "data-testid": "eval-results" },
          h("thead", null, h("tr", null, h("th", null, "metric"), names.map((m) => h("th", null, m)), names.length === 2 ? h("th", null, "Δ (B − A)") : null)),
          h("tbody", null, metrics.map((k) => h("tr", null, h("th", null, k), names.map((m) => cell(m, k)),
            names.length === 2 ? h("td", null, (() => {
              const a = results[names[0]].metrics?.[k];
              const b = results[names[1]].metrics?.[k];
              return typeof a === "number" && typeof b === "number" ? `${b - a >= 0 ? "+" : ""}${fmtNum(b - a, 4)}` : "–";
            })()) : null)))),
          h("small", { class: "muted" }, "Brackets: 95% confidence interval."));
        chart.set(metrics, names.map((m, i) => ({ label: m, color: COLORS[i % COLORS.length], values: metrics.map((k) => results[m].metrics?.[k] ?? null) })));
      },
    };
  }

  async function follow(id: string): Promise<void> {
    watch?.abort();
    const controller = new AbortController();
    watch = controller;
    let job: Job;
    try {
      job = await api<Job>(`/v1/jobs/${enc(id)}`);
    } catch (e) {
      mount(detail, h("div", { class: "error" }, e instanceof Error ? e.message : String(e)));
      return;
    }
    const view = job.kind === "tune" ? renderTuneDetail(job) : renderEvalDetail(job);
    view.update(job);
    try {
      const resp = await raw(`/v1/jobs/${enc(id)}/events`, { signal: controller.signal });
      for await (const line of lines(resp)) {
        const ev = JSON.parse(line);
        switch (ev.type) {
          case "snapshot":
            job = ev.job;
            break;
          case "progress":
            job.progress = ev.progress;
            break;
          case "point": {
            const pts = (job.points ??= []);
            const key = "loss" in ev.point ? "loss" : "eval_loss";
            const same = pts.find((p) => p.step === ev.point.step && key in p);
            if (same) Object.assign(same, ev.point);
            else pts.push(ev.point);
            break;
          }
          case "points":
            job.points = ev.points;
            break;
          case "log":
            (job.log ??= []).push(ev.line);
            if (job.log.length > 400) job.log.shift();
            break;
          case "status":
            Object.assign(job, { status: ev.status, error: ev.error, result: ev.result, started_at: ev.started_at, finished_at: ev.finished_at });
            void refreshJobs();
            break;
          case "result":
            job.result = ev.result;
            break;
        }
        view.update(job);
      }
    } catch (e) {
      if (!controller.signal.aborted) toast(e instanceof Error ? e.message : String(e), "error");
    }
  }

  async function init(): Promise<void> {
    try {
      models = await loadModels();
      const tasks = await api<{ data: { name: string; type: string }[] }>("/v1/jobs/tasks");
      mount(task, tasks.data.map((t) => h("option", { value: t.name }, `${t.name} (${t.type.replace("_", " ")})`)));
    } catch (e) {
      toast(e instanceof Error ? e.message : String(e), "error");
    }
    const bases = models.filter((m) => !m.details?.parent_model);
    mount(base, bases.map((m) => h("option", { value: m.name }, m.name)));
    mount(modelA, models.map((m) => h("option", { value: m.name }, m.name)));
    mount(modelB, h("option", { value: "" }, "(none)"), models.map((m) => h("option", { value: m.name }, m.name)));
    const tuned = models.find((m) => m.details?.parent_model);
    if (tuned) {
      modelA.value = tuned.details.parent_model!;
      modelB.value = tuned.name;
    }
    await refreshJobs();
    if (arg) void follow(arg);
    else mount(detail, h("p", { class: "muted" }, "Start a job, or pick one above to watch it."));
  }

  timer = window.setInterval(() => void refreshJobs(), 5000);
  void init();
  return {
    el,
    dispose: () => {
      watch?.abort();
      clearInterval(timer);
      for (const c of charts) c.destroy();
    },
  };
}
