// Jobs: the list with state filters, and one job's live page (curves, ETA, previews, cancel).
import { api, stream } from "./api.js";
import { LineChart } from "./chart.js";
import { duration, enumWord, errorBox, fill, h, notice, pngUrl, when } from "./dom.js";

const STATES = ["", "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"];
const TERMINAL = new Set(["JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"]);

export function stateBadge(state) {
  const word = enumWord(state, "JOB_STATE_") || "unknown";
  return h(`span.badge.state-${word}`, {}, word);
}

const REFRESH_MS = 3000;

export async function jobsPage(main, params, _id, signal) {
  const state = params.get("state") || "";
  const filters = h("nav.filters", { "aria-label": "Filter jobs by state" },
    STATES.map((s) => h("a", {
      href: s ? `#/jobs?state=${s}` : "#/jobs",
      "aria-current": s === state ? "page" : null,
    }, s ? s.toLowerCase() : "all")));
  const body = h("div", {}, notice("Loading jobs…"));
  fill(main, h("div.page-head", {}, h("h1", {}, "Training jobs"), h("a.button", { href: "#/new" }, "New LoRA job")),
    filters, body);
  if (await listJobs(body, state)) refreshWhileActive(body, state, signal);
}

/** Fill `body` with the jobs table; true when it may change by itself (a job still queued or
 * running, or a queued/running filter that a new job can enter). */
async function listJobs(body, state) {
  const query = { page_size: 50, state: state ? `JOB_STATE_${state}` : "" };
  const { jobs = [], next_page_token } = await api.get("/v1/jobs", query);
  const live = state === "QUEUED" || state === "RUNNING";
  if (!jobs.length) {
    fill(body, notice(state ? `No ${state.toLowerCase()} jobs.` : "No jobs yet."));
    return live;
  }
  fill(body, h("table.list", {},
    h("thead", {}, h("tr", {}, ["Job", "Output", "Method", "State", "Progress", "Created"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, jobs.map(jobRow))),
  next_page_token ? h("p.hint", {}, "Showing the newest 50 jobs.") : null);
  return live || jobs.some((job) => !TERMINAL.has(job.state));
}

/** Poll the list (only the table, so focus on the filters stays) while a job is active and
 * the page is open; a failed refresh keeps the last table and says so. */
function refreshWhileActive(body, state, signal) {
  const tick = async () => {
    if (signal.aborted) return;
    try {
      if (await listJobs(body, state)) setTimeout(tick, REFRESH_MS);
    } catch (error) {
      if (!signal.aborted) body.prepend(errorBox(error));
    }
  };
  setTimeout(tick, REFRESH_MS);
}

function jobRow(job) {
  const spec = job.spec || {};
  const total = Number(job.total_steps || 0);
  return h("tr", {},
    h("td", {}, h("a.mono", { href: `#/jobs/${job.id}` }, job.id)),
    h("td", {}, spec.output_name || ""),
    h("td", {}, enumWord(spec.method, "ADAPTER_KIND_")),
    h("td", {}, stateBadge(job.state)),
    h("td", {}, total ? `${job.step || 0} / ${total}` : String(job.step || 0)),
    h("td", {}, when(job.created_at)));
}

export async function jobPage(main, params, id, signal) {
  const { job } = await api.get(`/v1/jobs/${encodeURIComponent(id)}`);
  const view = new JobView(main, job);
  view.watch(signal);
}

class JobView {
  constructor(main, job) {
    this.job = job;
    this.previewKeys = new Set();
    this.title = h("h1");
    this.cancelButton = h("button.danger", { type: "button", onclick: () => this.cancel() }, "Cancel job");
    this.head = h("div.page-head", {}, this.title, this.cancelButton);
    this.facts = h("dl.facts");
    this.status = h("div", { "aria-live": "polite" });
    const charts = h("div.charts");
    this.loss = new LineChart(charts, { title: "Loss", series: [
      { key: "loss", name: "training loss", color: "#2563eb" },
      { key: "val", name: "validation loss", color: "#d97706" }] });
    this.lr = new LineChart(charts, { title: "Learning rate", series: [
      { key: "lr", name: "learning rate", color: "#059669" }] });
    this.previews = h("div.previews", { "aria-label": "Validation previews" });
    fill(main, h("p.crumbs", {}, h("a", { href: "#/jobs" }, "Jobs"), " / ", job.id), this.head, this.status,
      this.facts, charts, h("h2", {}, "Validation previews"), this.previews);
    this.render();
  }

  render() {
    const job = this.job;
    const spec = job.spec || {};
    const terminal = TERMINAL.has(job.state);
    this.cancelButton.hidden = terminal; // one element for the page's life: a click never lands on a replaced node
    fill(this.title, spec.output_name || "Job", " ", stateBadge(job.state));
    const total = Number(job.total_steps || 0);
    const step = Number(job.step || 0);
    const output = job.output && job.output.name
      ? h("a", { href: `#/adapters/${job.output.name}` }, `${job.output.name} v${job.output.version}`) : "—";
    const rows = [
      ["Job id", h("span.mono", {}, job.id)], ["Method", enumWord(spec.method, "ADAPTER_KIND_")],
      ["Base model", spec.base_model], ["Dataset", h("span.mono", {}, spec.dataset_id || "")],
      ["Step", h("span#job-step", {}, total ? `${step} / ${total}` : String(step))],
      ["Progress", h("progress", { max: total || 1, value: step, "aria-label": "training progress" })],
      ["ETA", h("span#job-eta", {}, terminal ? "—" : this.eta !== undefined ? duration(this.eta) : "…")],
      ["Learning rate", this.lastLr !== undefined ? this.lastLr.toExponential(2) : "—"],
      ["Output", output], ["Created", when(job.created_at)], ["Attempts", String(job.attempts || 0)],
    ];
    if (job.error) rows.push(["Error", h("span.error-text", {}, job.error)]);
    fill(this.facts, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  }

  async watch(signal) {
    fill(this.status, notice("Watching live…"));
    try {
      await stream("GET", `/v1/jobs/${encodeURIComponent(this.job.id)}:watch`, {
        signal, onEvent: (event) => this.onEvent(event),
      });
      if (signal.aborted) return;
      fill(this.status, notice(TERMINAL.has(this.job.state) ? `Job ${enumWord(this.job.state, "JOB_STATE_")}.` : "Stream ended."));
    } catch (error) {
      if (signal.aborted) return;
      fill(this.status, errorBox(error), h("button", { type: "button", onclick: () => this.watch(signal) }, "Reconnect"));
    }
  }

  onEvent(event) {
    if (event.job) this.job = event.job;
    const step = Number(event.step ?? this.job.step ?? 0);
    const loss = Number(event.loss);
    if (step > 0 && loss > 0) this.loss.add("loss", step, loss);
    const lr = Number(event.learning_rate);
    if (step > 0 && lr > 0) {
      this.lr.add("lr", step, lr);
      this.lastLr = lr;
    }
    this.addValidationLoss(step);
    if (event.eta_seconds !== undefined) this.eta = Number(event.eta_seconds);
    for (const image of event.validation_images || []) this.addPreview(image);
    this.render();
  }

  /** Validation loss from the job's metrics: `validation_loss` at `validation_step` while it runs
   * (the newest validation), then `eval_loss_initial` (step 0) and `eval_loss_final` once done. */
  addValidationLoss(step) {
    const metrics = this.job.metrics || {};
    const start = Number(this.job.resumed_from_step || 0);
    if (metrics.eval_loss_initial !== undefined && start === 0) this.loss.add("val", 0, Number(metrics.eval_loss_initial));
    if (metrics.validation_loss !== undefined) {
      this.loss.add("val", Number(metrics.validation_step || step), Number(metrics.validation_loss));
    }
    if (metrics.eval_loss_final !== undefined) {
      this.loss.add("val", Number(metrics.steps || this.job.step || step), Number(metrics.eval_loss_final));
    }
  }

  addPreview(image) {
    const key = `${image.step}:${image.prompt}`;
    if (this.previewKeys.has(key)) return;
    this.previewKeys.add(key);
    const alt = `Validation image at step ${image.step}: ${image.prompt}`;
    this.previews.prepend(h("figure.preview", {},
      h("img", { src: pngUrl(image.png), alt, width: 128, height: 128 }),
      h("figcaption", {}, h("b", {}, `step ${image.step}`), " ", image.prompt)));
  }

  async cancel() {
    if (!confirm(`Cancel job ${this.job.id}?`)) return;
    this.cancelButton.disabled = true;
    try {
      const { job } = await api.post(`/v1/jobs/${encodeURIComponent(this.job.id)}:cancel`, {});
      this.job = job;
      this.render();
      fill(this.status, notice("Cancel requested; the worker stops at its next step."));
    } catch (error) {
      this.cancelButton.disabled = false;
      fill(this.status, errorBox(error));
    }
  }
}
