import { api, enc, q } from "../api";
import { ChatView, type ChatTarget, type Conversation } from "../chat";
import { ago, download, h, mount, toast } from "../dom";
import type { Page } from "../main";
import { loadTargets } from "../targets";

const LAST = "openherd.chat.target";

function parseChoice(value: string): ChatTarget | null {
  if (value.startsWith("p:")) return { model: value.slice(2), persona: value.slice(2) };
  if (value.startsWith("m:")) return { model: value.slice(2), persona: null };
  return null;
}

export function chatPage(arg: string): Page {
  const picker = h("select", { "aria-label": "Model or persona", "data-testid": "target" });
  const list = h("ul", { class: "conversations", "data-testid": "conversations" });
  const heading = h("div", { class: "side-title" }, "Conversations");
  const view = new ChatView({
    target: () => parseChoice(picker.value),
    persist: true,
    onConversation: () => void refreshList(),
    placeholder: "Pick a model or persona and say hello. Conversations are saved, like `herd chat`.",
  });

  const newBtn = h("button", { type: "button", class: "primary small", "data-testid": "new-chat", on: { click: () => startNew() } }, "New chat");
  const side = h("aside", { class: "sidebar" }, h("div", { class: "side-head" }, heading, newBtn), list);
  const el = h(
    "div",
    { class: "page chat-page" },
    side,
    h("div", { class: "chat-main" }, h("div", { class: "toolbar" }, h("label", { class: "picker" }, "Chat with ", picker)), view.el),
  );

  function target(): ChatTarget | null {
    return parseChoice(picker.value);
  }

  function startNew(): void {
    view.show(null);
    void refreshList();
    view.focus();
  }

  // Refreshes overlap (a new turn, a rename, the picker); only the newest may draw,
  // or an older, slower response would put a stale list (e.g. an untitled chat) back.
  let refreshes = 0;

  async function refreshList(): Promise<void> {
    const mine = ++refreshes;
    const t = target();
    if (!t) {
      mount(list);
      return;
    }
    heading.textContent = t.persona ? `Conversations with ${t.persona}` : "Model conversations";
    let convs: Conversation[] = [];
    try {
      convs = (await api<{ data: Conversation[] }>(`/v1/conversations${q({ persona: t.persona })}`)).data;
    } catch (e) {
      if (mine === refreshes) toast(e instanceof Error ? e.message : String(e), "error");
    }
    if (mine !== refreshes) return;
    const currentId = view.conversation?.id;
    mount(
      list,
      convs.length === 0 ? h("li", { class: "muted" }, "None yet.") : null,
      convs.map((c) => item(c, c.id === currentId)),
    );
  }

  function item(c: Conversation, active: boolean): HTMLElement {
    const title = h("span", { class: "title" }, c.title || "New conversation");
    const open = h(
      "button",
      {
        type: "button",
        class: "conv-open",
        title: c.title || c.id,
        on: {
          click: async () => {
            if (!c.persona && c.model && picker.value !== `m:${c.model}`) {
              picker.value = `m:${c.model}`;
            }
            try {
              await view.open(c.id, c.persona);
              void refreshList();
            } catch (e) {
              toast(e instanceof Error ? e.message : String(e), "error");
            }
          },
        },
      },
      title,
      h("small", null, `${c.persona ? "" : c.model + " · "}${c.turns} turns · ${ago(c.updated_at)}`),
    );
    const rename = h("button", { type: "button", class: "link", title: "Rename", on: { click: () => renameInline() } }, "Rename");
    const exportBtn = h(
      "button",
      { type: "button", class: "link", title: "Export as Markdown", on: { click: () => download(`/v1/conversations/${enc(c.id)}/export${q({ persona: c.persona, format: "markdown" })}`) } },
      "Export",
    );
    const del = h(
      "button",
      {
        type: "button",
        class: "link danger",
        title: "Delete",
        on: {
          click: async () => {
            if (!confirm(`Delete the conversation “${c.title || c.id}”? This cannot be undone.`)) return;
            try {
              await api(`/v1/conversations/${enc(c.id)}${q({ persona: c.persona })}`, { method: "DELETE" });
              if (view.conversation?.id === c.id) view.show(null);
              void refreshList();
            } catch (e) {
              toast(e instanceof Error ? e.message : String(e), "error");
            }
          },
        },
      },
      "Delete",
    );
    const li = h("li", { class: active ? "active" : "", "data-conversation": c.id }, open, h("div", { class: "conv-actions" }, rename, exportBtn, del));

    function renameInline(): void {
      const input = h("input", { type: "text", value: c.title, maxlength: 200, "aria-label": "New title" });
      const save = async () => {
        try {
          await api(`/v1/conversations/${enc(c.id)}${q({ persona: c.persona })}`, { method: "PATCH", json: { title: input.value } });
        } catch (e) {
          toast(e instanceof Error ? e.message : String(e), "error");
        }
        void refreshList();
      };
      input.addEventListener("keydown", (ev) => {
        if (ev.key === "Enter") void save();
        if (ev.key === "Escape") void refreshList();
      });
      input.addEventListener("blur", () => void save(), { once: true });
      mount(li, input);
      input.focus();
      input.select();
    }
    return li;
  }

  async function init(): Promise<void> {
    try {
      const { models, personas } = await loadTargets();
      const groups = [
        models.length
          ? h("optgroup", { label: "Models" }, models.map((m) => h("option", { value: `m:${m.name}` }, m.name)))
          : null,
        personas.length
          ? h("optgroup", { label: "Personas" }, personas.map((p) => h("option", { value: `p:${p.name}` }, p.name)))
          : null,
      ];
      mount(picker, groups);
      if (!models.length && !personas.length) {
        mount(picker, h("option", { value: "" }, "No models yet: pull one on the Models page"));
      }
      const wanted = arg || localStorage.getItem(LAST) || "";
      if (wanted && Array.from(picker.options).some((o) => o.value === wanted)) picker.value = wanted;
    } catch (e) {
      toast(e instanceof Error ? e.message : String(e), "error");
    }
    await refreshList();
    view.focus();
  }

  picker.addEventListener("change", () => {
    localStorage.setItem(LAST, picker.value);
    view.show(null);
    void refreshList();
  });

  void init();
  return { el, dispose: () => view.stop() };
}
