// Model output -> safe HTML. marked renders markdown, DOMPurify removes anything
// that could run (script, event handlers, javascript: URLs, forms, SVG/MathML
// tricks), highlight.js colours code blocks, and each block gets a copy button.
// Nothing else in the app assigns innerHTML.

import DOMPurify from "dompurify";
import { Marked } from "marked";
import hljs from "highlight.js/lib/core";
import bash from "highlight.js/lib/languages/bash";
import c from "highlight.js/lib/languages/c";
import cpp from "highlight.js/lib/languages/cpp";
import css from "highlight.js/lib/languages/css";
import go from "highlight.js/lib/languages/go";
import java from "highlight.js/lib/languages/java";
import javascript from "highlight.js/lib/languages/javascript";
import json from "highlight.js/lib/languages/json";
import python from "highlight.js/lib/languages/python";
import rust from "highlight.js/lib/languages/rust";
import sql from "highlight.js/lib/languages/sql";
import typescript from "highlight.js/lib/languages/typescript";
import xml from "highlight.js/lib/languages/xml";
import yaml from "highlight.js/lib/languages/yaml";
import { h } from "./dom";

const LANGUAGES = { bash, c, cpp, css, go, java, javascript, json, python, rust, sql, typescript, xml, yaml };
for (const [name, lang] of Object.entries(LANGUAGES)) hljs.registerLanguage(name, lang);
hljs.registerAliases(["sh", "shell", "zsh", "console"], { languageName: "bash" });
hljs.registerAliases(["html", "svg"], { languageName: "xml" });
hljs.registerAliases(["js", "jsx", "mjs"], { languageName: "javascript" });
hljs.registerAliases(["ts", "tsx"], { languageName: "typescript" });
hljs.registerAliases(["py"], { languageName: "python" });
hljs.registerAliases(["yml"], { languageName: "yaml" });

const marked = new Marked({ gfm: true, breaks: false, async: false });

const PURIFY: Parameters<typeof DOMPurify.sanitize>[1] = {
  USE_PROFILES: { html: true }, // no SVG or MathML: their parsing quirks are where sanitizer bypasses live
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "option", "iframe", "object", "embed", "base", "link", "meta"],
  FORBID_ATTR: ["style", "srcset", "action", "formaction", "ping"],
  ALLOW_DATA_ATTR: false,
};

// Links in model output open in a new tab and tell the target nothing about us.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
  if (node.tagName === "IMG") node.setAttribute("referrerpolicy", "no-referrer");
});

/** Sanitised HTML for untrusted markdown. */
export function toSafeHtml(markdown: string): string {
  const html = marked.parse(markdown) as string;
  return DOMPurify.sanitize(html, PURIFY) as unknown as string;
}

/** Render untrusted markdown into `el`, with highlighted code and copy buttons. */
export function renderMarkdown(el: HTMLElement, markdown: string): void {
  el.innerHTML = toSafeHtml(markdown);
  for (const code of Array.from(el.querySelectorAll("pre > code"))) {
    const pre = code.parentElement!;
    const lang = /language-([\w+-]+)/.exec(code.className)?.[1];
    const text = code.textContent ?? "";
    if (lang && hljs.getLanguage(lang)) {
      // highlight() escapes the text itself; the result is markup of <span class> only.
      code.innerHTML = hljs.highlight(text, { language: lang, ignoreIllegals: true }).value;
      code.classList.add("hljs");
    }
    pre.classList.add("code");
    pre.appendChild(
      h(
        "button",
        {
          class: "copy",
          type: "button",
          title: "Copy code",
          on: { click: (ev: Event) => copyText(text, ev.currentTarget as HTMLButtonElement) },
        },
        "Copy",
      ),
    );
  }
}

export async function copyText(text: string, button?: HTMLButtonElement): Promise<void> {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // No async clipboard outside secure contexts (plain http to a LAN address): fall back.
    const ta = h("textarea", { class: "offscreen", readonly: true, value: text });
    document.body.appendChild(ta);
    ta.select();
    document.execCommand("copy");
    ta.remove();
  }
  if (button) {
    const label = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => (button.textContent = label), 1200);
  }
}
