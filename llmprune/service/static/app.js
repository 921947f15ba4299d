// llmprune dashboard: keeps the server-rendered pages live from the events streams.
// Everything it shows is on the page without it; no library, nothing loaded from elsewhere.
"use strict";
(function () {
  const percent = (v) => (v == null ? "–" : (100 * v).toFixed(1) + "%");
  const number = (v) => (v == null ? "–" : Number(v).toFixed(2));
  const seconds = (v) => (v == null ? "–" : v < 120 ? v.toFixed(0) + " s" : (v / 60).toFixed(1) + " min");
  const pad = (n) => String(n).padStart(2, "0");
  const when = (t) => {
    if (t == null) return "–";
    const d = new Date(t * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  };
  const stageText = (s) => (s.stage ? `${s.stage} ${s.done}/${s.total} ${s.unit || ""}` : "");
  const FIELDS = ["model", "method", "pattern", "sparsity", "status", "progress", "ppl", "created", "duration"];

  function newRow(s) {
    const tr = document.createElement("tr");
    tr.dataset.jobId = s.id;
    const first = document.createElement("td");
    const link = document.createElement("a");
    link.href = "/jobs/" + encodeURIComponent(s.id);
    link.textContent = s.id;
    first.append(link);
    tr.append(first);
    for (const field of FIELDS) {
      const td = document.createElement("td");
      td.dataset.field = field;
      if (field === "status") td.append(document.createElement("span"));
      if (field === "progress") {
        const bar = document.createElement("progress");
        bar.setAttribute("aria-label", "progress of job " + s.id);
        const stage = document.createElement("span");
        stage.className = "stage";
        td.append(bar, " ", stage);
      }
      tr.append(td);
    }
    return tr;
  }

  function fillRow(tr, s) {
    const cell = (name) => tr.querySelector(`td[data-field="${name}"]`);
    tr.dataset.status = s.status;
    cell("model").textContent = s.model;
    cell("method").textContent = s.method;
    cell("pattern").textContent = s.pattern;
    cell("sparsity").textContent = `${percent(s.target)} → ${percent(s.achieved)}`;
    const badge = cell("status").querySelector("span");
    badge.className = "status " + s.status;
    badge.textContent = s.status;
    const bar = cell("progress").querySelector("progress");
    bar.max = s.total || 1;
    bar.value = s.done || 0;
    cell("progress").querySelector(".stage").textContent = stageText(s);
    cell("ppl").textContent = `${number(s.ppl_dense)} → ${number(s.ppl_pruned)}`;
    cell("created").textContent = when(s.created);
    cell("duration").textContent = seconds(s.duration);
  }

  const table = document.getElementById("jobs");
  if (table) {
    const filter = table.dataset.filter;
    const stream = new EventSource("/v1/events");
    stream.addEventListener("job", (event) => {
      const s = JSON.parse(event.data);
      let tr = table.querySelector(`tr[data-job-id="${CSS.escape(s.id)}"]`);
      if (filter && s.status !== filter) {
        if (tr) tr.remove();
        return;
      }
      if (!tr) {
        tr = newRow(s);
        table.tBodies[0].prepend(tr);
        const empty = document.getElementById("no-jobs");
        if (empty) empty.remove();
      }
      fillRow(tr, s);
    });
  }

  const job = document.getElementById("job");
  if (job && !["succeeded", "failed", "cancelled"].includes(job.dataset.status)) {
    const log = document.getElementById("log");
    log.textContent = ""; // the stream replays the whole log from the start
    const stream = new EventSource(`/v1/jobs/${encodeURIComponent(job.dataset.jobId)}/events`);
    stream.addEventListener("progress", (event) => {
      const p = JSON.parse(event.data);
      const bar = document.getElementById("progress");
      bar.max = p.total || 1;
      bar.value = p.done || 0;
      document.getElementById("stage").textContent = stageText(p);
      const badge = document.getElementById("job-status");
      badge.textContent = "running";
      badge.className = "status running";
    });
    stream.addEventListener("log", (event) => {
      const line = JSON.parse(event.data);
      log.textContent += `${line.level} ${line.message}\n`;
    });
    stream.addEventListener("end", () => {
      stream.close();
      window.location.reload(); // the finished job's page holds its result, chart and files
    });
  }

  const compare = document.getElementById("compare");
  if (compare) {
    const seen = new Map();
    let pending = null;
    const stream = new EventSource("/v1/events");
    stream.addEventListener("job", (event) => {
      const s = JSON.parse(event.data);
      const before = seen.get(s.id);
      seen.set(s.id, s.status);
      if (before !== undefined && before !== s.status && s.status === "succeeded" && !pending) {
        pending = setTimeout(async () => {
          pending = null;
          const group = compare.dataset.group;
          const response = await fetch("/compare.svg" + (group ? "?group=" + encodeURIComponent(group) : ""));
          if (response.ok) compare.innerHTML = await response.text();
        }, 300);
      }
    });
  }
})();
