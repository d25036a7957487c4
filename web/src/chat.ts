// The chat view: used by the Chat page (with persisted conversations) and by the
// persona editor's side chat (ephemeral). Answers stream from the OpenAI-compatible
// /v1/chat/completions as server-sent events; Stop aborts the fetch, which closes
// the connection, and the server cancels the sequence.

import { api, ApiError, enc, q, requestInit, errorOf, sse } from "./api";
import { h, mount, toast, debounceFrame, fmtNum } from "./dom";
import { renderMarkdown } from "./markdown";

export interface ChatTarget {
  model: string; // the id sent as `model`: a store model or a persona name
  persona: string | null;
}

export interface Turn {
  seq?: number;
  role: "user" | "assistant" | "system";
  content: string;
  meta?: Record<string, any>;
}

export interface Conversation {
  id: string;
  persona: string | null;
  model: string;
  title: string;
  turns: number;
  updated_at: number;
  messages?: Turn[];
}

interface ChatOptions {
  target: () => ChatTarget | null;
  persist: boolean;
  onConversation?: (conv: Conversation | null) => void;
  placeholder?: string;
  compact?: boolean;
}

interface MsgView {
  turn: Turn;
  el: HTMLElement;
  body: HTMLElement;
  foot: HTMLElement;
}

export class ChatView {
  readonly el: HTMLElement;
  private list: HTMLElement;
  private input: HTMLTextAreaElement;
  private sendBtn: HTMLButtonElement;
  private stopBtn: HTMLButtonElement;
  private empty: HTMLElement;
  private temperature: HTMLInputElement;
  private maxTokens: HTMLInputElement;
  private system: HTMLTextAreaElement;
  private views: MsgView[] = [];
  private controller: AbortController | null = null;
  conversation: Conversation | null = null;

  constructor(private opts: ChatOptions) {
    this.list = h("div", { class: "messages", "data-testid": "messages", "aria-live": "polite" });
    this.empty = h("div", { class: "empty" }, opts.placeholder ?? "Send a message to start.");
    this.input = h("textarea", {
      class: "composer-input",
      rows: 2,
      placeholder: "Message… (Enter sends, Shift+Enter for a new line)",
      "aria-label": "Message",
      "data-testid": "composer",
      on: { keydown: (ev: KeyboardEvent) => this.onKey(ev), input: () => this.autosize() },
    });
    this.sendBtn = h("button", { class: "primary", type: "submit", "data-testid": "send" }, "Send");
    this.stopBtn = h(
      "button",
      { class: "danger", type: "button", hidden: true, "data-testid": "stop", on: { click: () => this.stop() } },
      "Stop",
    );
    this.temperature = h("input", { type: "number", min: 0, max: 2, step: 0.1, placeholder: "default" });
    this.maxTokens = h("input", { type: "number", min: 1, step: 1, placeholder: "default" });
    this.system = h("textarea", { rows: 2, placeholder: "Optional system prompt (models only; a persona has its own)" });
    const options = h(
      "details",
      { class: "chat-options" },
      h("summary", null, "Options"),
      h(
        "div",
        { class: "row" },
        h("label", null, "Temperature ", this.temperature),
        h("label", null, "Max tokens ", this.maxTokens),
      ),
      opts.compact ? null : this.system,
    );
    const form = h(
      "form",
      {
        class: "composer",
        on: {
          submit: (ev: Event) => {
            ev.preventDefault();
            void this.send();
          },
        },
      },
      this.input,
      h("div", { class: "composer-actions" }, options, h("span", { class: "spacer" }), this.stopBtn, this.sendBtn),
    );
    this.el = h("section", { class: `chat${opts.compact ? " compact" : ""}` }, this.list, form);
    this.list.appendChild(this.empty);
  }

  get streaming(): boolean {
    return this.controller !== null;
  }

  focus(): void {
    this.input.focus();
  }

  private onKey(ev: KeyboardEvent): void {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      void this.send();
    }
  }

  private autosize(): void {
    this.input.style.height = "auto";
    this.input.style.height = `${Math.min(this.input.scrollHeight, 240)}px`;
  }

  /** Show a stored conversation (null: a fresh, empty chat). */
  show(conv: Conversation | null): void {
    this.stop();
    this.conversation = conv;
    this.views = [];
    mount(this.list);
    for (const t of conv?.messages ?? []) this.addView(t);
    if (!this.views.length) this.list.appendChild(this.empty);
    this.refreshActions();
    this.scroll(true);
  }

  async open(id: string, persona: string | null): Promise<void> {
    const conv = await api<Conversation>(`/v1/conversations/${enc(id)}${q({ persona })}`);
    this.show(conv);
  }

  private addView(turn: Turn): MsgView {
    this.empty.remove();
    const body = h("div", { class: "body" });
    const foot = h("div", { class: "foot" });
    const who = turn.role === "user" ? "You" : turn.role === "assistant" ? this.opts.target()?.model ?? "assistant" : turn.role;
    const el = h(
      "article",
      { class: `msg ${turn.role}`, "data-role": turn.role },
      h("header", null, h("span", { class: "who" }, who)),
      body,
      foot,
    );
    const view = { turn, el, body, foot };
    this.renderBody(view);
    this.renderFoot(view);
    this.views.push(view);
    this.list.appendChild(el);
    return view;
  }

  private renderBody(view: MsgView): void {
    if (view.turn.role === "assistant") renderMarkdown(view.body, view.turn.content);
    else view.body.textContent = view.turn.content; // what the user typed is shown as typed
  }

  private renderFoot(view: MsgView): void {
    const meta = view.turn.meta ?? {};
    const bits: (string | HTMLElement)[] = [];
    if (meta.interrupted) bits.push(h("span", { class: "badge warn" }, "stopped"));
    if (meta.finish === "length") bits.push(h("span", { class: "badge warn" }, "cut off (max tokens)"));
    if (meta.greeting) bits.push(h("span", { class: "badge" }, "greeting"));
    if (typeof meta.tokens === "number") {
      bits.push(`${meta.tokens} tokens`);
      if (typeof meta.tok_s === "number") bits.push(` · ${fmtNum(meta.tok_s, 1)} tok/s`);
    }
    const sources = Array.isArray(meta.sources) ? meta.sources : [];
    const srcEl =
      sources.length > 0
        ? h(
            "details",
            { class: "sources" },
            h("summary", null, `Sources (${sources.length})`),
            h(
              "ol",
              null,
              sources.map((s: any) =>
                h("li", null, h("strong", null, String(s?.title || s?.document || "document")), s?.text ? h("p", null, String(s.text).slice(0, 400)) : null),
              ),
            ),
          )
        : null;
    mount(view.foot, ...bits, srcEl);
  }

  private refreshActions(): void {
    for (const v of this.views) v.el.querySelector(".actions")?.remove();
    const last = this.views[this.views.length - 1];
    for (const v of this.views) {
      if (v.turn.role !== "assistant" || v.turn.meta?.greeting) continue;
      const actions = h(
        "span",
        { class: "actions" },
        h("button", { type: "button", class: "link", on: { click: () => void navigator.clipboard?.writeText(v.turn.content) } }, "Copy"),
        v === last
          ? h("button", { type: "button", class: "link", "data-testid": "regenerate", on: { click: () => void this.regenerate() } }, "Regenerate")
          : null,
      );
      v.el.querySelector("header")!.appendChild(actions);
    }
  }

  private scroll(force = false): void {
    const l = this.list;
    const near = l.scrollHeight - l.scrollTop - l.clientHeight < 120;
    if (force || near) l.scrollTop = l.scrollHeight;
  }

  private setBusy(busy: boolean): void {
    this.sendBtn.disabled = busy;
    this.stopBtn.hidden = !busy;
    this.el.classList.toggle("busy", busy);
  }

  stop(): void {
    this.controller?.abort();
  }

  async send(text?: string): Promise<void> {
    const content = (text ?? this.input.value).trim();
    if (!content || this.streaming) return;
    const target = this.opts.target();
    if (!target) {
      toast("Pick a model or persona first.", "error");
      return;
    }
    this.input.value = "";
    this.autosize();
    try {
      if (this.opts.persist && !this.conversation) {
        const conv = await api<Conversation>("/v1/conversations", {
          json: { persona: target.persona, model: target.persona ? undefined : target.model },
        });
        this.show(conv);
        this.opts.onConversation?.(conv);
      }
      const turn: Turn = { role: "user", content };
      if (this.opts.persist && this.conversation) {
        const saved = await api<any>(`/v1/conversations/${enc(this.conversation.id)}/turns${q({ persona: this.conversation.persona })}`, {
          json: { role: "user", content },
        });
        turn.seq = saved.seq;
        this.conversation = saved.conversation;
      }
      this.addView(turn);
      this.scroll(true);
      await this.answer(target);
    } catch (e) {
      toast(e instanceof Error ? e.message : String(e), "error");
      if (!this.views.some((v) => v.turn.role === "user" && v.turn.content === content)) this.input.value = content;
    }
  }

  async regenerate(): Promise<void> {
    if (this.streaming) return;
    const last = this.views[this.views.length - 1];
    const target = this.opts.target();
    if (!last || last.turn.role !== "assistant" || !target) return;
    try {
      if (this.opts.persist && this.conversation && last.turn.seq) {
        await api(`/v1/conversations/${enc(this.conversation.id)}/turns${q({ persona: this.conversation.persona, from: last.turn.seq })}`, {
          method: "DELETE",
        });
      }
      this.views.pop();
      last.el.remove();
      this.refreshActions();
      await this.answer(target);
    } catch (e) {
      toast(e instanceof Error ? e.message : String(e), "error");
    }
  }

  private history(): { role: string; content: string }[] {
    const out: { role: string; content: string }[] = [];
    const system = this.system.value.trim();
    if (system && !this.conversation?.persona && !this.opts.target()?.persona) out.push({ role: "system", content: system });
    for (const v of this.views) out.push({ role: v.turn.role, content: v.turn.content });
    return out;
  }

  private async answer(target: ChatTarget): Promise<void> {
    const body: Record<string, unknown> = {
      model: target.model,
      messages: this.history(),
      stream: true,
      stream_options: { include_usage: true },
    };
    const t = parseFloat(this.temperature.value);
    if (isFinite(t)) body.temperature = t;
    const m = parseInt(this.maxTokens.value, 10);
    if (isFinite(m) && m > 0) body.max_tokens = m;

    const view = this.addView({ role: "assistant", content: "", meta: {} });
    view.el.dataset.streaming = "true";
    view.body.classList.add("streaming");
    const controller = new AbortController();
    this.controller = controller;
    this.setBusy(true);
    const render = debounceFrame(() => {
      this.renderBody(view);
      this.scroll();
    });
    const meta: Record<string, any> = {};
    const started = performance.now();
    let firstToken = 0;
    let failure: string | null = null;
    try {
      const resp = await fetch("/v1/chat/completions", requestInit({ json: body, signal: controller.signal }));
      if (!resp.ok) throw await errorOf(resp);
      for await (const data of sse(resp)) {
        if (data === "[DONE]") break;
        let chunk: any;
        try {
          chunk = JSON.parse(data);
        } catch {
          continue;
        }
        if (chunk.error) throw new ApiError(chunk.error.message ?? "generation failed", 500);
        if (chunk.herd?.sources) meta.sources = chunk.herd.sources;
        if (chunk.usage) meta.tokens = chunk.usage.completion_tokens;
        const choice = chunk.choices?.[0];
        const delta = choice?.delta?.content;
        if (typeof delta === "string" && delta) {
          if (!firstToken) firstToken = performance.now();
          view.turn.content += delta;
          render();
        }
        if (choice?.finish_reason) meta.finish = choice.finish_reason;
      }
    } catch (e) {
      if (controller.signal.aborted) meta.interrupted = true;
      else failure = e instanceof Error ? e.message : String(e);
    } finally {
      this.controller = null;
      this.setBusy(false);
      delete view.el.dataset.streaming;
      view.body.classList.remove("streaming");
    }
    if (firstToken && typeof meta.tokens === "number" && meta.tokens > 1) {
      meta.tok_s = (meta.tokens - 1) / Math.max(0.001, (performance.now() - firstToken) / 1000);
    }
    meta.ttft_ms = firstToken ? Math.round(firstToken - started) : null;
    view.turn.meta = meta;
    this.renderBody(view);
    this.renderFoot(view);
    if (failure !== null && !view.turn.content) {
      view.el.classList.add("error");
      view.body.textContent = failure;
      toast(failure, "error");
      this.views.pop();
      if (this.opts.persist && this.conversation) this.opts.onConversation?.(this.conversation);
      return;
    }
    if (failure !== null) toast(failure, "error");
    if (this.opts.persist && this.conversation) {
      try {
        const saved = await api<any>(`/v1/conversations/${enc(this.conversation.id)}/turns${q({ persona: this.conversation.persona })}`, {
          json: { role: "assistant", content: view.turn.content, meta },
        });
        view.turn.seq = saved.seq;
        this.conversation = saved.conversation;
        this.opts.onConversation?.(this.conversation);
      } catch (e) {
        toast(`The answer was not saved: ${e instanceof Error ? e.message : e}`, "error");
      }
    }
    this.refreshActions();
    this.scroll();
  }
}
