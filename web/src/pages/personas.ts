import { api, ApiError, enc, q, upload } from "../api";
import { ChatView } from "../chat";
import { download, fmtBytes, h, field, mount, toast } from "../dom";
import type { Page } from "../main";
import { loadModels, loadPersonas, type ModelEntry, type PersonaEntry } from "../targets";

const SAMPLING: [string, "float" | "int", string][] = [
  ["temperature", "float", "0 = greedy; higher = more varied"],
  ["top_p", "float", "nucleus sampling mass"],
  ["top_k", "int", "sample from the k most likely tokens"],
  ["min_p", "float", "drop tokens below min_p × the top probability"],
  ["repeat_penalty", "float", "1 = off"],
  ["frequency_penalty", "float", "OpenAI semantics"],
  ["presence_penalty", "float", "OpenAI semantics"],
  ["max_tokens", "int", "answer length limit"],
  ["seed", "int", "fixed seed = reproducible answers"],
];

const KNOWLEDGE: [string, "float" | "int", string][] = [
  ["top_k", "int", "passages placed in the prompt"],
  ["chunk_tokens", "int", "tokens per chunk"],
  ["chunk_overlap", "int", "tokens shared by neighbouring chunks"],
  ["max_context_tokens", "int", "budget for all passages"],
  ["min_score", "float", "drop weak matches (0 keeps top_k)"],
];

function num(input: HTMLInputElement, kind: "float" | "int"): number | null {
  if (input.value.trim() === "") return null;
  const v = kind === "int" ? parseInt(input.value, 10) : parseFloat(input.value);
  if (!isFinite(v)) throw new Error(`${input.name} must be a number`);
  return v;
}

export function personasPage(arg: string): Page {
  const listEl = h("ul", { class: "persona-list", "data-testid": "persona-list" });
  const editor = h("div", { class: "persona-editor" });
  const chatBox = h("aside", { class: "side-chat" });
  const importInput = h("input", { type: "file", accept: ".herd,application/zip", hidden: true, "data-testid": "import-file" });
  let models: ModelEntry[] = [];
  let sideChat: ChatView | null = null;

  importInput.addEventListener("change", async () => {
    const file = importInput.files?.[0];
    importInput.value = "";
    if (!file) return;
    try {
      const p = await api<PersonaEntry>("/v1/personas/import", { body: file, headers: { "Content-Type": "application/octet-stream" } });
      toast(`Imported ${p.name}`, "ok");
      location.hash = `#/personas/${encodeURIComponent(p.name)}`;
    } catch (e) {
      toast(e instanceof Error ? e.message : String(e), "error");
    }
  });

  const el = h(
    "div",
    { class: "page personas-page" },
    h(
      "aside",
      { class: "sidebar" },
      h("div", { class: "side-head" }, h("div", { class: "side-title" }, "Personas"),
        h("a", { class: "button primary small", href: "#/personas/new", "data-testid": "new-persona" }, "New")),
      listEl,
      h("button", { type: "button", class: "small", on: { click: () => importInput.click() } }, "Import .herd…"),
      importInput,
    ),
    editor,
    chatBox,
  );

  async function refreshList(selected: string | null): Promise<void> {
    let personas: PersonaEntry[] = [];
    try {
      personas = await loadPersonas();
    } catch (e) {
      toast(e instanceof Error ? e.message : String(e), "error");
    }
    mount(
      listEl,
      personas.length ? null : h("li", { class: "muted" }, "No personas yet."),
      personas.map((p) =>
        h("li", { class: p.name === selected ? "active" : "" },
          h("a", { href: `#/personas/${encodeURIComponent(p.name)}` }, h("strong", null, p.name), h("small", null, p.description || p.model))),
      ),
    );
  }

  function input(name: string, value: unknown, attrs: Record<string, unknown> = {}): HTMLInputElement {
    return h("input", { name, value: value === null || value === undefined ? "" : String(value), ...attrs });
  }

  function modelSelect(name: string, value: string | null, allowNone: boolean): HTMLSelectElement {
    const sel = h("select", { name },
      allowNone ? h("option", { value: "" }, "(none)") : null,
      models.map((m) => h("option", { value: m.name }, m.name)));
    if (value && !models.some((m) => m.name === value)) sel.appendChild(h("option", { value }, `${value} (not in the store)`));
    sel.value = value ?? "";
    return sel;
  }

  function exampleRow(user = "", assistant = ""): HTMLElement {
    const row = h("div", { class: "example" },
      h("textarea", { name: "ex_user", rows: 2, placeholder: "User says…", value: user }),
      h("textarea", { name: "ex_assistant", rows: 2, placeholder: "Persona answers…", value: assistant }),
      h("button", { type: "button", class: "link danger", on: { click: () => row.remove() } }, "Remove"));
    return row;
  }

  function showEditor(p: PersonaEntry | null): void {
    const isNew = p === null;
    const name = input("name", p?.name ?? "", { required: true, pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,127}", readonly: !isNew, "data-testid": "persona-name" });
    const description = input("description", p?.description ?? "", { "data-testid": "persona-description" });
    const version = input("version", p?.version ?? "1");
    const model = modelSelect("model", p?.model ?? models[0]?.name ?? "", false);
    model.dataset.testid = "persona-model";
    const adapter = modelSelect("adapter", p?.adapter ?? null, true);
    const system = h("textarea", { name: "system", rows: 5, value: p?.system ?? "", "data-testid": "persona-system" });
    const greeting = h("textarea", { name: "greeting", rows: 2, value: p?.greeting ?? "", "data-testid": "persona-greeting" });
    const examples = h("div", { class: "examples" }, (p?.examples ?? []).map((e: any) => exampleRow(e.user, e.assistant)));
    const sampling = SAMPLING.map(([k, kind, hint]) => [k, kind, input(k, p?.sampling?.[k], { type: "number", step: kind === "int" ? 1 : "any", placeholder: "default" }), hint] as const);
    const stop = h("textarea", { name: "stop", rows: 2, value: (p?.sampling?.stop ?? []).join("\n"), placeholder: "one stop sequence per line" });
    const knowledge = KNOWLEDGE.map(([k, kind, hint]) => [k, kind, input(k, p?.knowledge?.[k as keyof PersonaEntry["knowledge"]], { type: "number", step: kind === "int" ? 1 : "any", placeholder: "default" }), hint] as const);
    const embedding = modelSelect("embedding_model", p?.knowledge?.embedding_model ?? null, true);
    const safety = h("textarea", { name: "safety", rows: 4, class: "mono", value: p?.safety ? JSON.stringify(p.safety, null, 2) : "", placeholder: '{"pii_output": "redact", "blocked_topics": ["…"]} (empty = the server default)' });

    const collect = (): Record<string, unknown> => {
      const s: Record<string, unknown> = {};
      for (const [k, kind, inp] of sampling) s[k] = num(inp, kind);
      s.stop = stop.value.split("\n").map((x) => x.trim()).filter(Boolean);
      const kn: Record<string, unknown> = { embedding_model: embedding.value || null };
      for (const [k, kind, inp] of knowledge) {
        const v = num(inp, kind);
        if (v !== null || !isNew) kn[k] = v;
      }
      let safetyValue: unknown = null;
      if (safety.value.trim()) {
        try {
          safetyValue = JSON.parse(safety.value);
        } catch {
          throw new Error("safety must be a JSON object (or empty)");
        }
      }
      const ex = Array.from(examples.querySelectorAll<HTMLElement>(".example")).map((row) => ({
        user: (row.querySelector("[name=ex_user]") as HTMLTextAreaElement).value,
        assistant: (row.querySelector("[name=ex_assistant]") as HTMLTextAreaElement).value,
      })).filter((e) => e.user.trim() || e.assistant.trim());
      const data: Record<string, unknown> = {
        name: name.value.trim(), description: description.value, version: version.value || "1", model: model.value,
        adapter: adapter.value || null, system: system.value, greeting: greeting.value, examples: ex, sampling: s,
        knowledge: kn, safety: safetyValue,
      };
      if (isNew) {
        // A new persona takes defaults for what is left empty: send only what is set.
        data.sampling = Object.fromEntries(Object.entries(s).filter(([, v]) => v !== null && !(Array.isArray(v) && !v.length)));
        data.knowledge = Object.fromEntries(Object.entries(kn).filter(([, v]) => v !== null));
        if (safetyValue === null) delete data.safety;
      }
      return data;
    };

    const saveBtn = h("button", { class: "primary", type: "submit", "data-testid": "persona-save" }, isNew ? "Create persona" : "Save changes");
    const form = h("form", {
      class: "card persona-form",
      on: {
        submit: async (ev: Event) => {
          ev.preventDefault();
          saveBtn.disabled = true;
          try {
            const data = collect();
            const saved = isNew
              ? await api<PersonaEntry>("/v1/personas", { json: data })
              : await api<PersonaEntry>(`/v1/personas/${enc(p!.name)}`, { method: "PATCH", json: data });
            toast(isNew ? `Created ${saved.name}` : `Saved ${saved.name}`, "ok");
            if (isNew) location.hash = `#/personas/${encodeURIComponent(saved.name)}`;
            else {
              showEditor(saved);
              void refreshList(saved.name);
            }
          } catch (e) {
            toast(e instanceof Error ? e.message : String(e), "error");
          } finally {
            saveBtn.disabled = false;
          }
        },
      },
    },
      h("h1", null, isNew ? "New persona" : p!.name),
      h("fieldset", null, h("legend", null, "Character"),
        h("div", { class: "grid2" },
          field("Name", name, isNew ? "letters, digits, . _ -; served as a model id" : "the name cannot change"),
          field("Version", version),
          field("Base model", model),
          field("Tuned adapter model", adapter, "a model tuned from the base; served instead of it"),
        ),
        field("Description", description),
        field("System prompt", system, "who the persona is and how it answers"),
        field("Greeting", greeting, "the first message of every new conversation"),
      ),
      h("fieldset", null, h("legend", null, "Example dialogues"), examples,
        h("button", { type: "button", class: "small", on: { click: () => examples.appendChild(exampleRow()) } }, "Add example")),
      h("details", null, h("summary", null, "Sampling"),
        h("div", { class: "grid3" }, sampling.map(([k, , inp, hint]) => field(k, inp, hint))), field("Stop sequences", stop)),
      h("details", null, h("summary", null, "Retrieval settings"),
        h("div", { class: "grid3" }, knowledge.map(([k, , inp, hint]) => field(k, inp, hint)), field("Embedding model", embedding, "(none) = the base model"))),
      h("details", null, h("summary", null, "Safety policy"), field("Policy (JSON)", safety)),
      h("div", { class: "row end" }, saveBtn),
    );

    const parts: HTMLElement[] = [form];
    if (!isNew) parts.push(knowledgeCard(p!), actionsCard(p!));
    mount(editor, ...parts);
    setupSideChat(isNew ? null : p!);
  }

  function knowledgeCard(p: PersonaEntry): HTMLElement {
    const tbody = h("tbody");
    const renderDocs = (persona: PersonaEntry) => {
      const rows = (persona.knowledge?.sources ?? []).map((s) =>
        h("tr", null,
          h("td", null, s.title || s.file, s.title ? h("small", null, ` (${s.file})`) : null),
          h("td", null, fmtBytes(s.size)),
          h("td", null, s.added_at ? new Date(s.added_at).toLocaleString() : "–"),
          h("td", null, h("button", { type: "button", class: "small danger", on: { click: () => void removeDoc(persona, s.file, renderDocs) } }, "Remove"))));
      mount(tbody, rows.length ? rows : h("tr", null, h("td", { colspan: 4, class: "muted" }, "No documents yet.")));
    };
    renderDocs(p);
    const files = h("input", { type: "file", multiple: true, accept: ".txt,.md,.markdown,.html,.htm,.pdf", "data-testid": "knowledge-file" });
    const progress = h("div", { class: "uploads", "data-testid": "knowledge-progress" });
    files.addEventListener("change", async () => {
      const list = Array.from(files.files ?? []);
      files.value = "";
      for (const f of list) await uploadDoc(p, f, progress);
      // Only the table: the form (maybe mid-edit) and the side chat stay as they are.
      renderDocs(await api<PersonaEntry>(`/v1/personas/${enc(p.name)}`));
    });
    return h("section", { class: "card" },
      h("h2", null, "Knowledge"),
      h("p", { class: "muted" }, "Documents the persona answers from (.txt .md .html .pdf). Each upload is chunked and indexed with the persona's model; answers cite their sources."),
      h("table", { class: "docs", "data-testid": "documents" }, h("thead", null, h("tr", null, ["Document", "Size", "Added", ""].map((t) => h("th", null, t)))), tbody),
      h("label", { class: "button" }, "Upload documents…", files),
      progress);
  }

  async function uploadDoc(p: PersonaEntry, file: File, box: HTMLElement): Promise<void> {
    const bar = h("progress", { max: 1, value: 0 });
    const label = h("span", null, "uploading…");
    const row = h("div", { class: "upload" }, h("strong", null, file.name), bar, label);
    box.appendChild(row);
    try {
      const result = await upload(`/v1/personas/${enc(p.name)}/knowledge${q({ filename: file.name })}`, file, (f) => {
        bar.value = f;
        label.textContent = f < 1 ? `uploading ${Math.round(f * 100)}%` : "indexing…";
        if (f >= 1) bar.removeAttribute("value");
      });
      bar.max = 1;
      bar.value = 1;
      if (result.index_error) label.textContent = `stored; indexing failed: ${result.index_error}`;
      else if (result.indexed) {
        const quarantined = Array.isArray(result.quarantined) ? result.quarantined.length : 0;
        label.textContent = `indexed: ${result.passages} passages${quarantined ? `, ${quarantined} quarantined (instructions found in the text)` : ""}`;
      } else label.textContent = "stored; it is indexed on the first question";
      row.classList.add("done");
    } catch (e) {
      row.classList.add("failed");
      label.textContent = `failed: ${e instanceof ApiError ? e.message : e}`;
    }
  }

  async function removeDoc(p: PersonaEntry, file: string, render: (p: PersonaEntry) => void): Promise<void> {
    if (!confirm(`Remove ${file} from ${p.name}?`)) return;
    try {
      await api(`/v1/personas/${enc(p.name)}/knowledge/${enc(file)}`, { method: "DELETE" });
      render(await api<PersonaEntry>(`/v1/personas/${enc(p.name)}`));
    } catch (e) {
      toast(e instanceof Error ? e.message : String(e), "error");
    }
  }

  function actionsCard(p: PersonaEntry): HTMLElement {
    return h("section", { class: "card row" },
      h("button", { type: "button", on: { click: () => download(`/v1/personas/${enc(p.name)}/export`) } }, "Export .herd"),
      h("a", { class: "button", href: `#/chat/p:${encodeURIComponent(p.name)}` }, "Open in Chat"),
      h("span", { class: "spacer" }),
      h("button", {
        type: "button", class: "danger", on: {
          click: async () => {
            if (!confirm(`Delete ${p.name}, its documents and its conversations?`)) return;
            try {
              await api(`/v1/personas/${enc(p.name)}`, { method: "DELETE" });
              toast(`Deleted ${p.name}`, "ok");
              location.hash = "#/personas";
            } catch (e) {
              toast(e instanceof Error ? e.message : String(e), "error");
            }
          },
        },
      }, "Delete persona"));
  }

  function setupSideChat(p: PersonaEntry | null): void {
    sideChat?.stop();
    if (!p) {
      mount(chatBox, h("div", { class: "card muted" }, "Save the persona to try it here."));
      sideChat = null;
      return;
    }
    sideChat = new ChatView({
      target: () => ({ model: p.name, persona: p.name }),
      persist: false,
      compact: true,
      placeholder: "Try the persona here: this side chat is not saved.",
    });
    if (p.greeting) sideChat.show({ id: "", persona: p.name, model: p.model, title: "", turns: 1, updated_at: 0, messages: [{ role: "assistant", content: p.greeting, meta: { greeting: true } }] });
    mount(chatBox, h("h2", null, `Try ${p.name}`), sideChat.el);
  }

  async function init(): Promise<void> {
    try {
      models = await loadModels();
    } catch (e) {
      toast(e instanceof Error ? e.message : String(e), "error");
    }
    const selected = arg && arg !== "new" ? arg : null;
    await refreshList(selected);
    if (arg === "new") showEditor(null);
    else if (selected) {
      try {
        showEditor(await api<PersonaEntry>(`/v1/personas/${enc(selected)}`));
      } catch (e) {
        mount(editor, h("div", { class: "card error" }, e instanceof Error ? e.message : String(e)));
      }
    } else {
      mount(editor, h("div", { class: "card" }, h("h1", null, "Personas"),
        h("p", null, "A persona is a model with a character: a system prompt, a greeting, example dialogues, sampling defaults, its own documents and a safety policy. It is served under its own name, so any OpenAI or Ollama client can talk to it."),
        h("a", { class: "button primary", href: "#/personas/new" }, "Create a persona")));
      mount(chatBox);
    }
  }

  void init();
  return { el, dispose: () => sideChat?.stop() };
}
