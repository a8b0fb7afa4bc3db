// The console shell: hash routes, the API-key dialog, and one error display for every page.
import { adapterPage, adaptersPage } from "./adapters.js";
import { apiKey, setApiKey } from "./api.js";
import { errorBox, fill } from "./dom.js";
import { jobPage, jobsPage } from "./jobs.js";
import { newJobPage } from "./newjob.js";
import { playgroundPage } from "./playground.js";

const ROUTES = [
  [/^jobs$/, jobsPage, "jobs"],
  [/^jobs\/([^/]+)$/, jobPage, "jobs"],
  [/^new$/, newJobPage, "jobs"],
  [/^adapters$/, adaptersPage, "adapters"],
  [/^adapters\/([^/]+)$/, adapterPage, "adapters"],
  [/^playground$/, playgroundPage, "playground"],
];

const main = document.getElementById("main");
let current = null;

async function route() {
  if (current) current.abort();
  current = new AbortController();
  const signal = current.signal;
  const [path, query = ""] = (location.hash.replace(/^#\/?/, "") || "jobs").split("?");
  const match = ROUTES.map(([re, page, tab]) => [path.match(re), page, tab]).find(([m]) => m);
  if (!match) {
    location.hash = "#/jobs";
    return;
  }
  const [m, page, tab] = match;
  for (const link of document.querySelectorAll("header nav a")) {
    if (link.dataset.tab === tab) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  try {
    await page(main, new URLSearchParams(query), m[1] && decodeURIComponent(m[1]), signal);
    if (!signal.aborted) main.focus({ preventScroll: true });
  } catch (error) {
    if (signal.aborted) return;
    fill(main, errorBox(error));
    if (error.status === 401 || error.code === 16) openKeyDialog(error.message);
  }
}

function openKeyDialog(reason) {
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-reason").textContent = reason || "";
  input.value = apiKey();
  if (!dialog.open) dialog.showModal();
  input.focus();
}

function showKeyState() {
  const button = document.getElementById("key-button");
  button.textContent = apiKey() ? "API key ✓" : "Enter API key";
  button.setAttribute("aria-label", apiKey() ? "API key set for this tab; change it" : "Enter an API key");
}

function wireKeyDialog() {
  const dialog = document.getElementById("key-dialog");
  document.getElementById("key-button").addEventListener("click", () => openKeyDialog(""));
  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey(document.getElementById("key-input").value.trim());
    dialog.close();
    showKeyState();
    route();
  });
  document.getElementById("key-forget").addEventListener("click", () => {
    setApiKey("");
    dialog.close();
    showKeyState();
    route();
  });
}

wireKeyDialog();
showKeyState();
window.addEventListener("hashchange", route);
route();
