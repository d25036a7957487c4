import { api, lines, raw } from "../api";
import { ago, fmtBytes, h, mount, toast } from "../dom";
import type { Page } from "../main";
import { loadModels, type ModelEntry } from "../targets";

interface ShowInfo {
  details: Record<string, any>;
  model_info: Record<string, any>;
  template: string;
  license: string;
  capabilities: string[];
  modified_at: string;
}

function contextLength(info: ShowInfo | undefined): number | null {
  if (!info) return null;
  const arch = info.model_info?.["general.architecture"] ?? "llama";
  const v = info.model_info?.[`${arch}.context_length`];
  return typeof v === "number" ? v : null;
}

export function modelsPage(): Page {
  const tbody = h("tbody");
  const loaded = h("div", { class: "loaded" });
  const name = h("input", { type: "text", placeholder: "smollm2, or hf:OWNER/REPO/FILE.gguf", "aria-label": "Model to pull", "data-testid": "pull-name", required: true });
  const pullBtn = h("button", { class: "primary", type: "submit", "data-testid": "pull" }, "Pull");
  const bar = h("progress", { max: 1, value: 0, "data-testid": "pull-progress", hidden: true });
  const status = h("div", { class: "pull-status", "data-testid": "pull-status" });
  const shows = new Map<string, ShowInfo>();
  let controller: AbortController | null = null;

  const form = h(
    "form",
    {
      class: "card pull",
      on: {
        submit: (ev: Event) => {
          ev.preventDefault();
          void pull(name.value.trim());
        },
      },
    },
    h("h2", null, "Pull a model"),
    h("div", { class: "row" }, name, pullBtn),
    bar,
    status,
  );

  const table = h(
    "table",
    { class: "models", "data-testid": "models-table" },
    h("thead", null, h("tr", null, ["Name", "Size", "Parameters", "Quantisation", "Context", "Family", "Added", ""].map((t) => h("th", null, t)))),
    tbody,
  );

  const el = h("div", { class: "page models-page" }, h("h1", null, "Models"), form, h("section", { class: "card" }, h("h2", null, "In the store"), table), h("section", { class: "card" }, h("h2", null, "Loaded now"), loaded));

  async function pull(model: string): Promise<void> {
    if (!model) return;
    pullBtn.disabled = true;
    bar.hidden = false;
    bar.removeAttribute("value"); // indeterminate until a total is known
    status.textContent = "starting…";
    controller = new AbortController();
    try {
      const resp = await raw("/api/pull", { json: { model, stream: true }, signal: controller.signal });
      let last: any = null;
      for await (const line of lines(resp)) {
        const ev = JSON.parse(line);
        if (ev.error) throw new Error(ev.error);
        last = ev;
        if (ev.total) {
          bar.max = ev.total;
          bar.value = ev.completed ?? 0;
          status.textContent = `${ev.status}: ${fmtBytes(ev.completed ?? 0)} of ${fmtBytes(ev.total)} (${Math.floor((100 * (ev.completed ?? 0)) / ev.total)}%)`;
        } else {
          status.textContent = ev.status;
        }
      }
      if (last?.status !== "success") throw new Error("the pull ended early");
      bar.max = 1;
      bar.value = 1;
      status.textContent = `${model}: success`;
      toast(`Pulled ${model}`, "ok");
      await refresh();
    } catch (e) {
      if (!controller.signal.aborted) {
        status.textContent = `failed: ${e instanceof Error ? e.message : e}`;
        toast(status.textContent, "error");
      }
    } finally {
      pullBtn.disabled = false;
      controller = null;
    }
  }

  async function remove(m: ModelEntry): Promise<void> {
    if (!confirm(`Delete ${m.name} from the store?`)) return;
    try {
      await api("/api/delete", { method: "DELETE", json: { model: m.name } });
      toast(`Deleted ${m.name}`, "ok");
      await refresh();
    } catch (e) {
      toast(e instanceof Error ? e.message : String(e), "error");
    }
  }

  function detailsRow(m: ModelEntry, info: ShowInfo): HTMLElement {
    const kv = Object.entries(info.model_info ?? {}).map(([k, v]) => h("tr", null, h("th", null, k), h("td", null, String(v))));
    return h(
      "tr",
      { class: "details-row" },
      h(
        "td",
        { colspan: 8 },
        h("div", { class: "details" },
          h("div", null, h("h3", null, "Model info"), h("table", { class: "kv" }, h("tbody", null, kv,
            h("tr", null, h("th", null, "capabilities"), h("td", null, (info.capabilities ?? []).join(", "))),
            info.details?.parent_model ? h("tr", null, h("th", null, "base model"), h("td", null, info.details.parent_model)) : null,
            h("tr", null, h("th", null, "digest"), h("td", null, h("code", null, m.digest ?? ""))),
          ))),
          h("div", null, h("h3", null, "Chat template"), h("pre", { class: "template" }, info.template || "(none: the engine's default)")),
        ),
      ),
    );
  }

  async function refresh(): Promise<void> {
    let models: ModelEntry[] = [];
    try {
      models = await loadModels();
    } catch (e) {
      toast(e instanceof Error ? e.message : String(e), "error");
    }
    await Promise.all(
      models.filter((m) => !shows.has(m.name)).map(async (m) => {
        try {
          shows.set(m.name, await api<ShowInfo>("/api/show", { json: { model: m.name } }));
        } catch {
          /* listed without details */
        }
      }),
    );
    const rows: HTMLElement[] = [];
    for (const m of models) {
      const info = shows.get(m.name);
      let open: HTMLElement | null = null;
      const row = h(
        "tr",
        { "data-model": m.name },
        h("td", null, h("strong", null, m.name)),
        h("td", null, fmtBytes(m.size)),
        h("td", null, m.details?.parameter_size ?? "–"),
        h("td", null, m.details?.quantization_level ?? "–"),
        h("td", null, contextLength(info)?.toLocaleString() ?? "–"),
        h("td", null, m.details?.family ?? "–"),
        h("td", null, m.modified_at ? ago(Date.parse(m.modified_at) / 1000) : "–"),
        h(
          "td",
          { class: "actions" },
          h("a", { class: "button small", href: `#/chat/m:${encodeURIComponent(m.name)}` }, "Chat"),
          h("button", {
            type: "button", class: "small", on: {
              click: () => {
                if (open) { open.remove(); open = null; return; }
                if (!info) return toast("No details for this model", "error");
                open = detailsRow(m, info);
                row.after(open);
              },
            },
          }, "Details"),
          h("button", { type: "button", class: "small danger", on: { click: () => void remove(m) } }, "Delete"),
        ),
      );
      rows.push(row);
    }
    mount(tbody, rows.length ? rows : h("tr", null, h("td", { colspan: 8, class: "muted" }, "No models yet. Pull smollm2 above to get started.")));
    try {
      const ps = await api<{ models: any[] }>("/api/ps");
      mount(
        loaded,
        ps.models.length
          ? h("ul", { class: "plain" }, ps.models.map((m) => h("li", null, h("strong", null, m.name), ` · ${fmtBytes(m.size)} · context ${m.context_length ?? "–"} · until ${new Date(m.expires_at).toLocaleTimeString()}`)))
          : h("p", { class: "muted" }, "No model is loaded; one loads on its first request."),
      );
    } catch {
      mount(loaded);
    }
  }

  void refresh();
  // A pull keeps going when the page is left (the stream is read to its end): downloads are slow.
  return { el };
}

declare module "../targets" {
  interface ModelEntry {
    digest?: string;
    modified_at?: string;
  }
}
