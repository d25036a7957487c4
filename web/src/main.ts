// The shell: navigation, hash routes, and the login gate.

import "uplot/dist/uPlot.min.css";
import "./style.css";
import { api, onAuthRequired, setCsrf } from "./api";
import { h, mount } from "./dom";
import { loginPage } from "./pages/login";
import { chatPage } from "./pages/chat";
import { modelsPage } from "./pages/models";
import { personasPage } from "./pages/personas";
import { tunePage } from "./pages/tune";
import { dashboardPage } from "./pages/dashboard";

export interface Page {
  el: HTMLElement;
  /** Called when the page is left: stop timers and streams. */
  dispose?: () => void;
}

type PageFactory = (arg: string) => Page;

const PAGES: Record<string, { title: string; make: PageFactory }> = {
  chat: { title: "Chat", make: chatPage },
  models: { title: "Models", make: modelsPage },
  personas: { title: "Personas", make: personasPage },
  tune: { title: "Tune & evaluate", make: tunePage },
  dashboard: { title: "Dashboard", make: dashboardPage },
};

interface SessionInfo {
  auth_required: boolean;
  authenticated: boolean;
  csrf_token: string | null;
}

const root = document.getElementById("app")!;
const main = h("main", { id: "main" });
const nav = h("nav", { class: "nav" });
let current: Page | null = null;
let session: SessionInfo | null = null;

function route(): { page: string; arg: string } {
  const [page, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  return { page: PAGES[page] ? page : "chat", arg: decodeURIComponent(rest.join("/")) };
}

function renderNav(): void {
  const { page } = route();
  const links = Object.entries(PAGES).map(([key, p]) =>
    h("a", { href: `#/${key}`, class: key === page ? "active" : "", "aria-current": key === page ? "page" : null }, p.title),
  );
  const logout =
    session?.auth_required && session.authenticated
      ? h("button", { class: "link", type: "button", on: { click: () => void logoutNow() } }, "Log out")
      : null;
  mount(nav, h("a", { class: "brand", href: "#/chat" }, h("span", { class: "logo", "aria-hidden": "true" }), "openherd"), h("div", { class: "links" }, links), logout);
}

function show(): void {
  current?.dispose?.();
  current = null;
  if (session && session.auth_required && !session.authenticated) {
    mount(main, loginPage(onLogin).el);
    nav.hidden = true;
    document.title = "Log in · openherd";
    return;
  }
  nav.hidden = false;
  renderNav();
  const { page, arg } = route();
  current = PAGES[page].make(arg);
  document.title = `${PAGES[page].title} · openherd`;
  mount(main, current.el);
}

async function refreshSession(): Promise<void> {
  try {
    session = await api<SessionInfo>("/v1/session");
  } catch {
    // An older server without the session endpoint: behave as if no login is needed.
    session = { auth_required: false, authenticated: true, csrf_token: null };
  }
  setCsrf(session.csrf_token);
}

async function onLogin(): Promise<void> {
  await refreshSession();
  show();
}

async function logoutNow(): Promise<void> {
  await api("/v1/session", { method: "DELETE" }).catch(() => undefined);
  await refreshSession();
  show();
}

onAuthRequired(() => {
  if (session && session.auth_required && !session.authenticated) return;
  void refreshSession().then(show);
});

window.addEventListener("hashchange", () => {
  // Sub-routes of the same page (#/personas/NAME) are handled by the page itself.
  show();
});

mount(root, h("header", { class: "top" }, nav), main);
void refreshSession().then(show);
