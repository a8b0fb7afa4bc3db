// Adapters: the list, and one adapter's versions, aliases (moved with compare-and-swap) and
// downloads in each export format its kind supports.
import { api } from "./api.js";
import { bytes, enumWord, errorBox, field, fill, h, notice, shortDigest, when } from "./dom.js";

const FORMATS = {
  ADAPTER_KIND_LORA: [["ADAPTER_FORMAT_DIFFUSERS", "diffusers"], ["ADAPTER_FORMAT_KOHYA", "kohya (A1111/ComfyUI)"]],
  ADAPTER_KIND_TEXTUAL_INVERSION: [["ADAPTER_FORMAT_DIFFUSERS", "diffusers"], ["ADAPTER_FORMAT_A1111", "A1111"]],
  ADAPTER_KIND_DREAMBOOTH: [["ADAPTER_FORMAT_DIFFUSERS", "diffusers (zip)"], ["ADAPTER_FORMAT_CHECKPOINT", "single-file checkpoint"]],
};

export async function adaptersPage(main) {
  const body = h("div", {}, notice("Loading adapters…"));
  fill(main, h("div.page-head", {}, h("h1", {}, "Adapters")), body);
  const { adapters = [] } = await api.get("/v1/adapters", { page_size: 100 });
  if (!adapters.length) return fill(body, notice("No adapters yet. Train one from the Jobs page."));
  fill(body, h("table.list", {},
    h("thead", {}, h("tr", {}, ["Name", "Kind", "Base model", "Latest", "Aliases", "Updated"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, adapters.map((a) => h("tr", {},
      h("td", {}, h("a", { href: `#/adapters/${a.name}` }, a.name)),
      h("td", {}, enumWord(a.kind, "ADAPTER_KIND_")),
      h("td", {}, a.base_model),
      h("td", {}, `v${a.latest_version}`),
      h("td", {}, aliasList(a.aliases)),
      h("td", {}, when(a.updated_at)))))));
}

function aliasList(aliases) {
  const entries = Object.entries(aliases || {});
  return entries.length ? entries.map(([name, v]) => h("span.chip", {}, `${name} → v${v}`)) : "—";
}

export async function adapterPage(main, params, name) {
  const [{ adapter }, { versions = [] }] = await Promise.all([
    api.get(`/v1/adapters/${encodeURIComponent(name)}`),
    api.get(`/v1/adapters/${encodeURIComponent(name)}/versions`, { page_size: 100 }),
  ]);
  const aliases = h("section", { "aria-labelledby": "aliases-h" });
  fill(main, h("p.crumbs", {}, h("a", { href: "#/adapters" }, "Adapters"), " / ", name),
    h("div.page-head", {}, h("h1", {}, name, " ", h("span.badge", {}, enumWord(adapter.kind, "ADAPTER_KIND_")))),
    h("p", {}, `Base model ${adapter.base_model} · latest v${adapter.latest_version} · created ${when(adapter.created_at)}`),
    aliases, h("h2", {}, "Versions"), versionsTable(adapter, versions));
  renderAliases(aliases, adapter, versions);
}

function versionsTable(adapter, versions) {
  const formats = FORMATS[adapter.kind] || FORMATS.ADAPTER_KIND_LORA;
  return h("table.list.versions", {},
    h("thead", {}, h("tr", {}, ["Version", "Size", "Manifest digest", "Source", "Files", "Created", "Download"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, [...versions].sort((a, b) => b.version - a.version).map((v) => h("tr", {},
      h("td", {}, `v${v.version}`, v.trigger_tokens && v.trigger_tokens.length ? h("div.hint", {}, v.trigger_tokens.join(", ")) : null),
      h("td", {}, bytes(v.size_bytes)),
      h("td", {}, h("code", { title: v.manifest_digest }, shortDigest(v.manifest_digest))),
      h("td", {}, v.source_format || "atelier"),
      h("td", {}, h("details", {}, h("summary", {}, `${(v.files || []).length} file(s)`),
        h("ul.files", {}, (v.files || []).map((f) => h("li", {}, h("span.mono", {}, f.path), ` ${bytes(f.size)} `,
          h("code", { title: f.sha256 }, shortDigest(f.sha256))))))),
      h("td", {}, when(v.created_at)),
      h("td.downloads", {}, formats.map(([fmt, label]) => downloadButton(adapter.name, v.version, fmt, label)))))));
}

function downloadButton(name, version, format, label) {
  const button = h("button.small", { type: "button", onclick: () => download(button, name, version, format) }, label);
  return button;
}

/** Fetch with the API key (a plain link cannot carry it), then save the bytes as a file. */
async function download(button, name, version, format) {
  const cell = button.parentElement;
  cell.querySelectorAll(".error").forEach((e) => e.remove());
  button.disabled = true;
  const original = button.textContent;
  button.textContent = "Preparing…";
  try {
    const response = await api.raw(`/v1/adapters/${encodeURIComponent(name)}:export`,
      { "ref.version": version, format });
    const blob = await response.blob();
    const disposition = response.headers.get("Content-Disposition") || "";
    const match = disposition.match(/filename\*?=(?:UTF-8'')?"?([^";]+)"?/i);
    const filename = match ? decodeURIComponent(match[1]) : `${name}-v${version}-${format.replace("ADAPTER_FORMAT_", "").toLowerCase()}.safetensors`;
    const url = URL.createObjectURL(blob);
    const link = h("a", { href: url, download: filename });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (error) {
    cell.append(errorBox(error));
  } finally {
    button.disabled = false;
    button.textContent = original;
  }
}

function renderAliases(section, adapter, versions) {
  const aliases = Object.entries(adapter.aliases || {});
  const status = h("div#alias-status", { "aria-live": "polite" });
  const options = [...versions].sort((a, b) => b.version - a.version).map((v) => h("option", { value: v.version }, `v${v.version}`));
  const aliasInput = h("input#alias-name", { required: true, pattern: "[a-z0-9][a-z0-9\\-_.]{0,62}", placeholder: "stable" });
  const target = h("select#alias-version", {}, options);
  const expected = h("input#alias-expected", { type: "number", min: 0, placeholder: "current version, 0 if new" });
  aliasInput.addEventListener("input", () => {
    const current = (adapter.aliases || {})[aliasInput.value];
    expected.value = current === undefined ? "0" : String(current);
  });
  const form = h("form.inline-form", { onsubmit: (e) => { e.preventDefault(); moveAlias(adapter, aliasInput.value, target.value, expected.value, status); } },
    field("Alias", aliasInput), field("Point at", target),
    field("Expected current version", expected, "compare-and-swap: the move fails if someone moved it meanwhile"),
    h("button", { type: "submit" }, "Move alias"));
  fill(section, h("h2#aliases-h", {}, "Aliases"),
    aliases.length
      ? h("table.list.aliases", {}, h("tbody", {}, aliases.map(([alias, v]) => h("tr", {},
        h("th", { scope: "row" }, alias), h("td", {}, `v${v}`),
        h("td", {}, h("button.small", { type: "button", onclick: () => {
          aliasInput.value = alias;
          expected.value = String(v);
          aliasInput.focus();
        } }, "Move…"))))))
      : notice("No aliases yet."),
    form, status);
}

async function moveAlias(adapter, alias, version, expected, status) {
  const body = { version: Number(version) };
  if (expected !== "") body.expected_version = Number(expected);
  try {
    const moved = await api.put(`/v1/adapters/${encodeURIComponent(adapter.name)}/aliases/${encodeURIComponent(alias)}`, body);
    const from = moved.previous_version !== undefined ? ` (was v${moved.previous_version})` : "";
    fill(status, notice(`Alias ${moved.alias || alias} now points at v${moved.version}${from}.`));
    setTimeout(() => window.dispatchEvent(new HashChangeEvent("hashchange")), 800);
  } catch (error) {
    const conflict = error.code === 9 || error.code === "FAILED_PRECONDITION" || error.status === 412;
    fill(status, errorBox(error), conflict
      ? h("p.hint", {}, "Someone else moved this alias since you loaded the page. Reload to see where it points now, then try again.")
      : null);
  }
}
