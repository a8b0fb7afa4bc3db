// Playground: prompt, base model, up to 4 adapters with weight sliders, seed, steps; the images
// appear once the generate stream's result arrives, with its progress shown as it runs.
import { api, stream } from "./api.js";
import { errorBox, field, fill, h, notice, pngUrl } from "./dom.js";

const MAX_ADAPTERS = 4;
const STAGES = { queued: "Queued", loading_adapters: "Loading adapters", denoising: "Denoising", encoding: "Encoding" };

export async function playgroundPage(main, params, _id, signal) {
  const [{ base_models: models = [] }, { adapters = [] }] = await Promise.all([
    api.get("/v1/base-models", { page_size: 100 }), api.get("/v1/adapters", { page_size: 100 })]);
  const view = new Playground(main, models, adapters, signal);
  view.render();
}

class Playground {
  constructor(main, models, adapters, signal) {
    this.main = main;
    this.models = models;
    this.adapters = adapters;
    this.signal = signal;
    this.rows = [];
  }

  render() {
    this.prompt = h("textarea#pg-prompt", { rows: 2, required: true, placeholder: "a photo of sks toy on a table" });
    this.negative = h("input#pg-negative", { placeholder: "optional" });
    this.model = h("select#pg-model", { required: true },
      this.models.map((m) => h("option", { value: m.name }, `${m.name} (v${m.version || 1}, ${m.architecture || "sd"})`)));
    this.seed = h("input#pg-seed", { type: "number", min: 0, value: "0" });
    this.steps = h("input#pg-steps", { type: "number", min: 1, max: 150, value: "4" });
    this.width = h("input#pg-width", { type: "number", min: 0, step: 8, value: "", placeholder: "native" });
    this.height = h("input#pg-height", { type: "number", min: 0, step: 8, value: "", placeholder: "native" });
    this.count = h("input#pg-count", { type: "number", min: 1, max: 4, value: "1" });
    this.adapterList = h("div.adapter-rows");
    this.addButton = h("button.small", { type: "button", onclick: () => this.addRow() }, "+ Add adapter");
    this.go = h("button#pg-generate", { type: "submit" }, "Generate");
    this.progress = h("div#pg-progress", { "aria-live": "polite" });
    this.results = h("div#pg-results.results");
    const form = h("form.playground", { onsubmit: (e) => { e.preventDefault(); this.generate(); } },
      field("Prompt", this.prompt),
      h("div.row", {}, field("Base model", this.model), field("Seed", this.seed), field("Steps", this.steps),
        field("Width", this.width), field("Height", this.height), field("Images", this.count)),
      field("Negative prompt", this.negative),
      h("fieldset", {}, h("legend", {}, `Adapters (up to ${MAX_ADAPTERS})`), this.adapterList, this.addButton),
      h("div.actions", {}, this.go));
    fill(this.main, h("div.page-head", {}, h("h1", {}, "Playground")),
      this.models.length ? null : notice("No base models in the registry yet."), form, this.progress, this.results);
    this.syncAddButton();
  }

  addRow() {
    if (this.rows.length >= MAX_ADAPTERS) return;
    const index = this.rows.length + 1;
    const select = h("select", { "aria-label": `Adapter ${index}`, class: "pg-adapter" },
      this.adapters.map((a) => h("option", { value: a.name }, `${a.name} (${(a.kind || "").replace("ADAPTER_KIND_", "").toLowerCase()}, v${a.latest_version})`)));
    const output = h("output", {}, "1.00");
    const slider = h("input", { type: "range", min: -2, max: 2, step: 0.05, value: "1", class: "pg-weight",
      "aria-label": `Weight of adapter ${index}`, oninput: () => { output.textContent = Number(slider.value).toFixed(2); } });
    const row = h("div.adapter-row", {}, select, slider, output,
      h("button.small.ghost", { type: "button", "aria-label": `Remove adapter ${index}`, onclick: () => this.removeRow(row) }, "Remove"));
    this.rows.push({ row, select, slider });
    this.adapterList.append(row);
    this.syncAddButton();
  }

  removeRow(row) {
    this.rows = this.rows.filter((r) => r.row !== row);
    row.remove();
    this.syncAddButton();
  }

  syncAddButton() {
    this.addButton.disabled = !this.adapters.length || this.rows.length >= MAX_ADAPTERS;
    this.addButton.title = this.adapters.length ? "" : "No adapters in the registry yet";
  }

  spec() {
    const spec = {
      base_model: this.model.value,
      prompt: this.prompt.value,
      negative_prompt: this.negative.value,
      steps: Number(this.steps.value) || 0,
      num_images: Number(this.count.value) || 1,
      adapters: this.rows.map((r) => ({ ref: { name: r.select.value }, weight: Number(r.slider.value) })),
    };
    if (this.seed.value !== "") spec.seed = String(this.seed.value);
    if (this.width.value) spec.width = Number(this.width.value);
    if (this.height.value) spec.height = Number(this.height.value);
    return spec;
  }

  async generate() {
    this.go.disabled = true;
    const bar = h("progress", { max: 1, value: 0, "aria-label": "generation progress" });
    const label = h("span", {}, "Sending…");
    fill(this.progress, h("div.progress-line", {}, bar, label));
    try {
      await stream("POST", "/v1/generate:stream", {
        json: { spec: this.spec() }, signal: this.signal,
        onEvent: (event) => this.onEvent(event, bar, label),
      });
    } catch (error) {
      fill(this.progress, errorBox(error));
    } finally {
      this.go.disabled = false;
    }
  }

  onEvent(event, bar, label) {
    if (event.progress) {
      const p = event.progress;
      const total = Number(p.total_steps || 0);
      bar.max = total || 1;
      bar.value = Number(p.step || 0);
      label.textContent = `${STAGES[p.stage] || p.stage || "Working"} ${total ? `step ${p.step || 0} of ${total}` : ""} · ${(Number(p.elapsed_ms || 0) / 1000).toFixed(1)} s`;
    } else if (event.result) {
      bar.value = bar.max;
      this.showResult(event.result);
      label.textContent = `Done in ${(Number((event.result.timings || {}).total_ms || 0) / 1000).toFixed(2)} s`;
    }
  }

  showResult(result) {
    const used = (result.adapters || []).map((a) => `${a.name} v${a.version} at weight ${Number(a.weight).toFixed(2)}`).join(", ");
    const prompt = this.prompt.value;
    const card = h("section.result", { "aria-label": "Generated images" },
      h("div.images", {}, (result.images || []).map((image) => h("figure", {},
        h("img.generated", { src: pngUrl(image.png), alt: `Generated: ${prompt} (seed ${image.seed})`,
          width: Math.max(128, Number(image.width || 0)), dataset: { width: image.width, height: image.height, seed: image.seed } }),
        h("figcaption", {}, `seed ${image.seed} · ${image.width}×${image.height}`, image.safety_flagged ? " · flagged by the safety check" : "")))),
      h("p.hint", {}, `“${prompt}”`, used ? ` with ${used}` : " without adapters"));
    this.results.prepend(card);
  }
}
