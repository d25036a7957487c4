import { api, ApiError } from "../api";
import { h } from "../dom";
import type { Page } from "../main";

export function loginPage(onDone: () => Promise<void>): Page {
  const key = h("input", { type: "password", name: "api_key", autocomplete: "current-password", required: true, "data-testid": "api-key", "aria-label": "API key" });
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const button = h("button", { class: "primary", type: "submit" }, "Log in");
  const form = h(
    "form",
    {
      class: "login card",
      on: {
        submit: async (ev: Event) => {
          ev.preventDefault();
          button.disabled = true;
          error.hidden = true;
          try {
            await api("/v1/session", { json: { api_key: key.value } });
            key.value = "";
            await onDone();
          } catch (e) {
            error.textContent = e instanceof ApiError ? e.message : String(e);
            error.hidden = false;
          } finally {
            button.disabled = false;
          }
        },
      },
    },
    h("h1", null, h("span", { class: "logo", "aria-hidden": "true" }), "openherd"),
    h("p", null, "This server requires an API key (HERD_API_KEYS). Log in with one; the browser keeps a session cookie, never the key."),
    h("label", { class: "field" }, h("span", { class: "label" }, "API key"), key),
    error,
    button,
  );
  setTimeout(() => key.focus(), 0);
  return { el: h("div", { class: "login-wrap" }, form) };
}
