// New LoRA job: upload images as a new dataset (multipart), then create the job and open its
// live page. One form, two API calls; the dataset id is shown if the second call fails so the
// upload is not lost.
import { api } from "./api.js";
import { errorBox, field, fill, h, notice } from "./dom.js";

export async function newJobPage(main) {
  const { base_models: models = [] } = await api.get("/v1/base-models", { page_size: 100 });
  const el = {
    files: h("input#nj-files", { type: "file", accept: "image/png,image/jpeg,image/webp", multiple: true, required: true }),
    dataset: h("input#nj-dataset", { required: true, value: "my-dataset", pattern: "[a-z0-9][a-z0-9\\-_.]{0,62}" }),
    caption: h("input#nj-caption", { placeholder: "optional caption for every image" }),
    model: h("select#nj-model", { required: true }, models.map((m) => h("option", { value: m.name }, m.name))),
    output: h("input#nj-output", { required: true, pattern: "[a-z0-9][a-z0-9\\-_.]{0,62}", placeholder: "my-lora" }),
    prompt: h("input#nj-prompt", { required: true, value: "a photo of sks toy" }),
    steps: h("input#nj-steps", { type: "number", min: 1, value: "200" }),
    rank: h("input#nj-rank", { type: "number", min: 1, max: 256, value: "4" }),
    resolution: h("input#nj-resolution", { type: "number", min: 8, step: 8, placeholder: "native" }),
    lr: h("input#nj-lr", { type: "number", step: "any", min: 0, placeholder: "recipe default (1e-4)" }),
    validation: h("input#nj-validation", { placeholder: "a photo of sks toy on the beach" }),
    validationSteps: h("input#nj-validation-steps", { type: "number", min: 1, value: "50" }),
    alias: h("input#nj-alias", { placeholder: "optional, e.g. latest-good" }),
  };
  const status = h("div#nj-status", { "aria-live": "polite" });
  const submit = h("button#nj-submit", { type: "submit" }, "Upload and start training");
  const thumbs = h("div.thumbs");
  el.files.addEventListener("change", () => fill(thumbs, [...el.files.files].map((f) =>
    h("img", { src: URL.createObjectURL(f), alt: f.name, width: 64, height: 64 }))));
  const form = h("form.stack", { onsubmit: (e) => { e.preventDefault(); start(el, status, submit); } },
    h("fieldset", {}, h("legend", {}, "1. Training images"),
      field("Images (PNG, JPEG or WebP, at least 64 px a side)", el.files), thumbs,
      h("div.row", {}, field("Dataset name", el.dataset), field("Caption", el.caption))),
    h("fieldset", {}, h("legend", {}, "2. LoRA job"),
      h("div.row", {}, field("Base model", el.model), field("Adapter name", el.output), field("Alias on success", el.alias)),
      field("Instance prompt", el.prompt, "use a rare token (sks) for the new concept"),
      h("div.row", {}, field("Steps", el.steps), field("Rank", el.rank), field("Resolution", el.resolution), field("Learning rate", el.lr)),
      h("div.row", {}, field("Validation prompt", el.validation), field("Validate every N steps", el.validationSteps))),
    h("div.actions", {}, submit));
  fill(main, h("div.page-head", {}, h("h1", {}, "New LoRA job")), form, status);
}

async function start(el, status, submit) {
  submit.disabled = true;
  let dataset = null;
  try {
    fill(status, notice(`Uploading ${el.files.files.length} image(s)…`));
    dataset = await upload(el);
    fill(status, notice(`Dataset ${dataset.id} stored (${(dataset.images || []).length} images). Creating the job…`));
    const { job } = await api.post("/v1/jobs", { request_id: crypto.randomUUID(), spec: jobSpec(el, dataset.id) });
    location.hash = `#/jobs/${job.id}`;
  } catch (error) {
    fill(status, errorBox(error), namedFiles(error, el.files.files),
      dataset ? notice(`The images are stored as dataset ${dataset.id}; fix the job settings and submit again.`) : null);
    submit.disabled = false;
  }
}

/** The server names images by position (`images[2]`); say which file that is. */
function namedFiles(error, files) {
  const indices = new Set([...error.message.matchAll(/images\[(\d+)\]/g)].map((m) => Number(m[1])));
  const names = [...indices].filter((i) => i < files.length).map((i) => `images[${i}] is ${files[i].name}`);
  return names.length ? h("p.hint.files-named", {}, names.join("; "), ".") : null;
}

async function upload(el) {
  const form = new FormData();
  form.append("name", el.dataset.value);
  for (const file of el.files.files) {
    if (el.caption.value) form.append("caption", el.caption.value); // applies to the next file part
    form.append("image", file, file.name);
  }
  const { dataset } = await api.upload("/v1/datasets", form);
  return dataset;
}

function jobSpec(el, datasetId) {
  const hyper = { max_train_steps: Number(el.steps.value) || undefined };
  if (el.resolution.value) hyper.resolution = Number(el.resolution.value);
  if (el.lr.value) hyper.learning_rate = Number(el.lr.value);
  if (el.validation.value) {
    hyper.validation_prompts = [el.validation.value];
    hyper.validation_steps = Number(el.validationSteps.value) || undefined;
  }
  return {
    method: "ADAPTER_KIND_LORA",
    base_model: el.model.value,
    dataset_id: datasetId,
    output_name: el.output.value,
    output_alias: el.alias.value || undefined,
    instance_prompt: el.prompt.value,
    lora: { rank: Number(el.rank.value) || undefined },
    hyperparameters: hyper,
  };
}
