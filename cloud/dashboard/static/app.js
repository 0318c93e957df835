/* windfleet dashboard: renders the JSON API, polls it for live updates.
   No framework; every value from the API reaches the DOM through textContent. */
(function () {
  "use strict";
  const config = JSON.parse(document.body.dataset.config || "{}");
  const content = document.getElementById("content");
  const statusEl = document.getElementById("status");
  const TOKEN_KEY = "windfleet-token";
  window.wfCharts = {};

  // ------------------------------------------------------------ helpers
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  function table(headers, rows, attrs) {
    return el("table", attrs, el("thead", {}, el("tr", {}, headers.map((h) => el("th", { text: h })))),
      el("tbody", {}, rows));
  }
  function fmtTime(ts) {
    if (ts === null || ts === undefined) return "—";
    const d = new Date(ts * 1000);
    return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0").slice(0, 1);
  }
  function fmtAge(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    if (seconds < 90) return Math.max(0, Math.round(seconds)) + " s ago";
    if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
    return Math.round(seconds / 3600) + " h ago";
  }
  function fmtNum(x, digits) {
    return x === null || x === undefined ? "—" : Number(x).toFixed(digits === undefined ? 3 : digits);
  }
  function stateClass(state) {
    if (!state) return "";
    const s = String(state).toUpperCase();
    if (["RUNNING", "SUCCEEDED", "COMPLETED", "ACTIVE", "APPROVED", "FINISHED"].includes(s)) return "ok";
    if (["ERRORED", "BROKEN", "FAILED", "TIMED_OUT", "REJECTED", "CANCELED", "CANCELLED"].includes(s)) return "bad";
    return "warn";
  }
  function badge(text, cls, attrs) {
    return el("span", Object.assign({ class: "badge " + (cls || ""), text: text }, attrs || {}));
  }
  async function api(path, options) {
    const response = await fetch(path, Object.assign({ headers: { Accept: "application/json" } }, options || {}));
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) {
      const err = new Error((body && body.error) || response.statusText);
      err.status = response.status;
      throw err;
    }
    return body;
  }
  // one line of a (possibly multi-line, path-laden) error, the full text on demand
  function oneLine(text, max) {
    const first = String(text || "").split(/\r?\n/).map((l) => l.trim()).find((l) => l) || "";
    const limit = max || 120;
    return first.length > limit ? first.slice(0, limit - 1) + "…" : first;
  }
  const openDetails = new Set();  // <details> the user opened survive the next poll's re-render
  function errorDetails(key, label, text) {
    const short = (label ? label + ": " : "") + oneLine(text);
    const full = String(text || "");
    if (full.trim() === oneLine(text) && full.indexOf("\n") < 0) {
      return el("div", { class: "error-line", "data-error": key, text: short });
    }
    const node = el("details", { class: "error", "data-error": key },
      el("summary", { text: short }), el("pre", { class: "error-full", text: full }));
    if (openDetails.has(key)) node.open = true;
    node.addEventListener("toggle", () => { if (node.open) openDetails.add(key); else openDetails.delete(key); });
    return node;
  }
  function setStatus(ok, text) {
    statusEl.textContent = text;
    statusEl.className = "status" + (ok ? "" : " err");
  }
  function poll(fn) {
    let stopped = false;
    async function tick() {
      if (stopped) return;
      try {
        await fn();
        setStatus(true, "live · updated " + new Date().toLocaleTimeString([], { hour12: false }));
      } catch (e) {
        setStatus(false, "update failed: " + e.message);
      }
      setTimeout(tick, config.poll_ms || 2000);
    }
    tick();
    return () => { stopped = true; };
  }
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === config.page) a.classList.add("active");
  }

  // ------------------------------------------------------------ fleet overview
  const STATES = ["broken", "offline", "degraded", "healthy"];
  const STATE_CLASS = { healthy: "ok", degraded: "warn", broken: "bad", offline: "off" };
  function deploymentCell(dep, available, key) {
    if (!available) return el("span", { class: "muted", text: "no deployment service" });
    if (!dep) return el("span", { class: "muted", text: "none" });
    if (dep.error) return errorDetails(key + ":service", "", dep.error);
    const status = dep.coreDeviceExecutionStatus || dep.deploymentStatus || "?";
    return el("span", {}, badge(status, stateClass(status), { "data-deployment-status": status }), " ",
      el("span", { class: "muted", text: dep.deploymentName || dep.deploymentId || "" }),
      dep.reason ? errorDetails(key + ":reason", "", dep.reason) : null);
  }
  function renderOverview() {
    const view = { state: "", q: "", offset: 0, limit: 50 };
    const summary = el("div", { id: "fleet-summary", class: "summary" });
    const progress = el("div", { id: "deployment-progress" });
    const search = el("input", { id: "fleet-search", type: "search", placeholder: "filter gateways by name",
      autocomplete: "off" });
    const pager = el("div", { id: "pager", class: "pager" });
    const info = el("p", { class: "muted", id: "fleet-info" });
    const tableBox = el("div", { id: "fleet-box" });
    content.replaceChildren(summary, progress, el("div", { class: "toolbar" }, search, pager), info, tableBox);
    let timer = null;
    search.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(() => { view.q = search.value.trim(); view.offset = 0; refresh(); }, 250);
    });
    function chip(state, n) {
      const active = view.state === state;
      return el("button", { class: "chip " + STATE_CLASS[state] + (active ? " active" : ""), "data-state-count": state,
        title: active ? "show every gateway" : `show only ${state} gateways`,
        onclick: () => { view.state = active ? "" : state; view.offset = 0; refresh(); } },
        el("strong", { text: String(n) }), " " + state);
    }
    function render(fleet) {
      const s = fleet.summary;
      summary.replaceChildren(
        ...["healthy", "degraded", "broken", "offline"].map((st) => chip(st, s.by_state[st] || 0)),
        el("span", { class: "chip anomalies" + (s.turbines_open_anomalies ? " bad" : ""), id: "open-anomalies",
          "data-count": String(s.turbines_open_anomalies),
          title: "turbines whose latest scored window is anomalous" },
          el("strong", { text: String(s.turbines_open_anomalies) }),
          ` of ${s.turbines} turbines with an open anomaly (on ${s.gateways_open_anomalies} gateways)`),
        el("a", { class: "chip drift" + (s.turbines_drifted ? " warn" : ""), id: "drifted-turbines", href: "/drift",
          "data-count": String(s.turbines_drifted || 0), title: "turbines whose inputs drifted from the model's training data" },
          el("strong", { text: String(s.turbines_drifted || 0) }), " drifted"));
      const shown = s.deployments.filter((d) => d.in_progress);
      progress.replaceChildren(...(shown.length ? shown : s.deployments.slice(0, 1)).map((d) => {
        const counts = Object.entries(d.counts).sort().map(([k, n]) => badge(`${n} ${k}`, stateClass(k)));
        return el("div", { class: "progress-box" + (d.in_progress ? " active" : ""),
          "data-deployment": d.deploymentId, "data-done": String(d.done), "data-devices": String(d.devices) },
          el("strong", { text: (d.in_progress ? "Deployment in progress: " : "Latest deployment: ") +
            (d.deploymentName || d.deploymentId) }), " ",
          el("progress", { max: d.devices, value: d.done }), " ",
          el("span", { text: `${d.done} of ${d.devices} devices done` }), " ", counts);
      }));
      const first = fleet.total ? fleet.offset + 1 : 0;
      const last = fleet.offset + fleet.gateways.length;
      pager.replaceChildren(
        el("button", { id: "page-prev", text: "‹ prev", disabled: fleet.offset === 0,
          onclick: () => { view.offset = Math.max(0, view.offset - view.limit); refresh(); } }),
        el("span", { id: "page-info", text: `${first}–${last} of ${fleet.total}` +
          (view.state || view.q ? ` (filtered from ${s.gateways})` : "") }),
        el("button", { id: "page-next", text: "next ›", disabled: last >= fleet.total,
          onclick: () => { view.offset += view.limit; refresh(); } }));
      info.textContent = `${s.gateways} gateways · ${s.turbines} turbines · ` +
        `${(fleet.counters || {}).messages_in || 0} telemetry messages ingested · most urgent first`;
      const rows = fleet.gateways.map((g) => {
        const t = g.telemetry || {};
        const anomalies = g.turbines.reduce((n, x) => n + (x.n_anomalies || 0), 0);
        const running = g.components.filter((c) => ["RUNNING", "FINISHED"].includes(String(c.state).toUpperCase()));
        const others = g.components.filter((c) => !running.includes(c));
        return el("tr", { class: "gateway state-" + g.state, "data-thing": g.thing, "data-state": g.state },
          el("td", {}, el("strong", { text: g.thing })),
          el("td", { class: "state" }, badge(g.state, STATE_CLASS[g.state], { "data-gateway-state": g.state }),
            g.state_reason ? el("div", { class: "muted", text: oneLine(g.state_reason, 80) }) : null,
            g.errors.map((e, i) => errorDetails(`${g.thing}:${e.source}:${i}`, e.source, e.text))),
          el("td", { class: "model-version", text: g.model_version || "—" }),
          el("td", { title: fmtTime(g.last_seen), text: fmtAge(g.last_seen_age_s) }),
          el("td", {}, running.length ? badge(`${running.length} running`, "ok", {
            title: running.map((c) => `${c.component.replace("com.windfleet.", "")} ${c.version || ""}`).join("\n") }) : null,
            others.map((c) => badge(`${c.component.replace("com.windfleet.", "")} ${c.version || ""} ${c.state}`,
              stateClass(c.state)))),
          el("td", { class: "num" }, `${t.received ?? 0} rcvd`, el("br"),
            el("span", { class: t.lost ? "badge bad" : "muted", text: `${t.lost ?? 0} lost` }), " ",
            el("span", { class: "muted", text: `${t.duplicates ?? 0} dup` })),
          el("td", {}, deploymentCell(g.deployment, fleet.deployments_available, g.thing)),
          el("td", { class: "turbines" },
            el("div", { class: "muted", text: `${g.turbines.length} turbines · ${g.open_anomalies} open · ` +
              `${anomalies} anomalous windows` }),
            g.turbines.map((x) => el("a", { href: "/turbines/" + encodeURIComponent(x.turbine_id),
              class: "badge turbine " + (x.anomaly ? "bad" : x.n_anomalies ? "warn" : "ok") +
                ((x.drifted || []).length ? " drifted" : ""), "data-turbine": x.turbine_id,
              title: `score ${fmtNum(x.last_score)} · model ${x.model_version} · ${x.n_anomalies} anomalous windows` +
                ((x.drifted || []).length ? ` · drifted: ${x.drifted.join(", ")}` : ""),
              text: x.turbine_id }))));
      });
      tableBox.replaceChildren(table(["Gateway", "State", "Model version", "Last seen", "Components", "Telemetry",
        "Deployment", "Turbines"], rows, { id: "fleet" }));
    }
    async function refresh() {
      const params = new URLSearchParams({ offset: view.offset, limit: view.limit });
      if (view.state) params.set("state", view.state);
      if (view.q) params.set("q", view.q);
      render(await api("/api/fleet?" + params.toString()));
    }
    poll(refresh);
  }

  // ------------------------------------------------------------ turbine charts
  const PALETTE = ["#1f5fa8", "#7d3c98", "#117a65", "#b9770e", "#2e4053", "#a04000"];
  function chartOptions(title, label, color, width, marks) {
    return {
      title: title, width: width, height: 220,
      scales: { x: { time: true } },
      series: [
        {},
        { label: label, stroke: color, width: 1.5 },
        { label: "threshold", stroke: "#c0392b", width: 1.5, dash: [6, 4] },
        { label: marks || "anomaly", stroke: "#c0392b", fill: "#c0392b", width: 0, paths: () => null,
          points: { show: true, size: 7, stroke: "#c0392b", fill: "#c0392b" } },
      ],
      axes: [{}, { size: 60 }],
    };
  }
  function seriesFor(data, feature) {
    if (feature === "score") {
      return [data.ts, data.score, data.ts.map(() => 1.0),
        data.score.map((s, i) => (data.anomaly[i] ? s : null))];
    }
    const errors = data.errors[feature];
    return [data.ts, errors, data.thresholds[feature],
      errors.map((e, i) => (data.anomalous[feature][i] ? e : null))];
  }
  function mergeScores(data, fresh, cap) {
    if (!data) return fresh;
    const keys = ["ts", "score", "anomaly", "model_version"];
    for (const k of keys) data[k] = data[k].concat(fresh[k]).slice(-cap);
    for (const f of data.features) {
      for (const part of ["errors", "thresholds", "anomalous"]) {
        data[part][f] = data[part][f].concat(fresh[part][f] || fresh.ts.map(() => null)).slice(-cap);
      }
    }
    return data;
  }
  function renderTurbine() {
    const id = config.turbine_id;
    const cap = 2000;
    let data = null;
    const charts = {};
    const header = el("p", { class: "muted" });
    const grid = el("div", { class: "charts" });
    content.replaceChildren(header, grid);
    document.getElementById("title").textContent = "Turbine " + id;
    function draw() {
      const width = Math.max(480, Math.min(900, grid.clientWidth / (grid.clientWidth > 1100 ? 2 : 1) - 30));
      for (const feature of ["score"].concat(data.features)) {
        const series = seriesFor(data, feature);
        if (!charts[feature]) {
          const title = feature === "score" ? "score (max error / threshold)" : feature + " reconstruction error";
          const box = el("div", { class: "chart", "data-feature": feature }, el("h3", { text: title }));
          grid.append(box);
          charts[feature] = new uPlot(chartOptions("", feature === "score" ? "score" : "error",
            PALETTE[Object.keys(charts).length % PALETTE.length], width), series, box);
          charts[feature].wfBox = box;
        } else {
          charts[feature].setData(series);
        }
        const box = charts[feature].wfBox;
        box.dataset.points = String(series[0].length);
        box.dataset.thresholdPoints = String(series[2].filter((v) => v !== null && v !== undefined).length);
        box.dataset.anomalyPoints = String(series[3].filter((v) => v !== null).length);
      }
      window.wfCharts = charts;
      const last = data.ts.length - 1;
      header.textContent = `gateway ${data.thing} · ${data.ts.length} windows shown · model ` +
        `${last >= 0 ? data.model_version[last] : "—"} · last score ${last >= 0 ? fmtNum(data.score[last]) : "—"}` +
        ` · ${data.anomaly.filter(Boolean).length} anomalous windows`;
    }
    poll(async () => {
      const since = data && data.ts.length ? "&since=" + data.ts[data.ts.length - 1] : "";
      const fresh = await api(`/api/turbines/${encodeURIComponent(id)}/scores?limit=${cap}${since}`);
      if (data && fresh.features.join() !== data.features.join()) data = null;  // model changed features
      if (!data || fresh.ts.length) {
        data = mergeScores(data, fresh, cap);
        draw();
      }
    });
  }

  // ------------------------------------------------------------ anomaly timeline
  function renderAnomalies(body) {
    const rows = body.anomalies.map((a) => el("tr", { class: "anomaly-row", "data-turbine": a.turbine_id },
      el("td", { text: new Date(a.ts * 1000).toLocaleString([], { hour12: false }) }),
      el("td", {}, el("a", { href: "/turbines/" + encodeURIComponent(a.turbine_id), text: a.turbine_id })),
      el("td", { text: a.thing }),
      el("td", {}, a.anomalous_features.map((f) => badge(
        `${f} ${fmtNum(a.feature_errors[f])} > ${fmtNum(a.thresholds[f])}`, "bad")))
      , el("td", { class: "num", text: fmtNum(a.score, 2) }),
      el("td", { text: a.model_version })));
    const logs = body.logs.map((l) => el("tr", {},
      el("td", { text: new Date(l.ts * 1000).toLocaleString([], { hour12: false }) }),
      el("td", { text: l.thing }), el("td", { text: l.component || "" }),
      el("td", {}, badge(l.level || "", stateClass(l.level === "ERROR" ? "FAILED" : "")) ),
      el("td", {}, errorDetails(`log:${l.thing}:${l.ts}`, "", l.message || ""))));
    content.replaceChildren(
      el("p", { class: "muted", text: `${body.anomalies.length} most recent anomalous windows (newest first)` }),
      table(["Time", "Turbine", "Gateway", "Features over threshold", "Score", "Model"], rows, { id: "timeline" }),
      el("h2", { text: "Device warnings and errors" }),
      table(["Time", "Gateway", "Component", "Level", "Message"], logs, { id: "logs" }));
  }

  // ------------------------------------------------------------ registry + deployments
  function fmtBytes(n) {
    if (n === null || n === undefined) return "—";
    if (n < 1024) return n + " B";
    if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
    return (n / 1048576).toFixed(1) + " MiB";
  }
  function fmtRate(x) { return x === null || x === undefined ? "—" : (100 * x).toFixed(2) + " %"; }
  function kv(obj, fmt) {
    if (!obj || !Object.keys(obj).length) return el("span", { class: "muted", text: "—" });
    return el("span", { class: "kv" }, Object.entries(obj).map(([k, v]) =>
      el("span", { class: "kv-item", "data-key": k }, el("span", { class: "muted", text: k + " " }), fmt(v))));
  }
  function decisionText(d) {
    return `${d.status} by ${d.actor || "?"} at ${String(d.at || "").replace("T", " ")}` + (d.reason ? `: ${d.reason}` : "");
  }
  function historyCell(v) {
    const list = v.decisions || [];
    if (!list.length) return el("span", { class: "muted", text: "no decision yet" });
    const last = list[list.length - 1];
    return el("a", { href: "#history", class: "last-decision", title: decisionText(last),
      text: `${last.status} by ${last.actor || "?"}` + (list.length > 1 ? ` (+${list.length - 1})` : "") });
  }
  // every decision of every version, newest first: the audit trail, as the registry records it
  function historyTable(versions) {
    const rows = [];
    for (const v of versions) {
      for (const d of v.decisions || []) rows.push([v, d]);
    }
    rows.sort((a, b) => String(b[1].at).localeCompare(String(a[1].at)) || Number(b[0].version) - Number(a[0].version));
    if (!rows.length) return el("p", { class: "muted", id: "history", text: "No decision recorded yet." });
    return table(["Time (UTC)", "Model version", "Package", "Decision", "By", "Reason"], rows.map(([v, d]) =>
      el("tr", { class: "decision-row", "data-version": v.version, "data-actor": d.actor, "data-decision": d.status },
        el("td", { class: "when", text: String(d.at || "").replace("T", " ").replace("Z", "") }),
        el("td", { text: v.model_version || "—" }), el("td", { text: v.version }),
        el("td", {}, badge(d.status, stateClass(d.status))), el("td", {}, el("strong", { text: d.actor || "?" })),
        el("td", { class: "reason", text: d.reason || "" }))), { id: "history" });
  }
  // sortable columns: [header, key for sorting, render]
  const REGISTRY_COLUMNS = [
    ["Model version", (v) => v.model_version, (v) => el("strong", { text: v.model_version || "—" })],
    ["Package", (v) => Number(v.version), (v) => el("span", { class: "package", text: v.version })],
    ["Status", (v) => v.status, (v) => el("span", {}, badge(v.status || "?", stateClass(v.status), { "data-status": v.status }),
      v.running ? badge("fleet runs it", "ok", { "data-running": "true" }) : null)],
    ["F1", (v) => v.f1, (v) => el("span", { class: "num f1", text: fmtNum(v.f1) })],
    ["False alarms", (v) => v.false_alarm_rate, (v) => el("span", { class: "num far", text: fmtRate(v.false_alarm_rate) })],
    ["Recall per kind", (v) => v.per_kind_recall ? Math.min(...Object.values(v.per_kind_recall)) : null,
      (v) => kv(v.per_kind_recall, (x) => fmtNum(x, 2))],
    ["Baselines F1", (v) => v.baselines_f1 ? Math.max(...Object.values(v.baselines_f1).filter((x) => x !== null)) : null,
      (v) => kv(v.baselines_f1, (x) => fmtNum(x, 2))],
    ["Training data", (v) => v.training && v.training.summary, (v) => el("span", { text: (v.training && v.training.summary) || "—" })],
    ["Features, window / stride", (v) => (v.features || []).length,
      (v) => el("span", { title: (v.features || []).join(", ") },
        el("span", { text: v.features ? `${v.features.length}` : "—" }),
        el("span", { class: "muted", text: `, ${v.window ?? "—"} / ${v.stride ?? "—"}` }))],
    ["Lineage", (v) => v.lineage, (v) => el("span", { text: v.lineage || "—" })],
    ["Size", (v) => v.size_bytes, (v) => el("span", { class: "num", text: fmtBytes(v.size_bytes) })],
    ["sha256", (v) => v.sha256, (v) => el("code", { title: v.sha256 || "", text: v.sha256 ? v.sha256.slice(0, 10) + "…" : "—" })],
    ["Last decision", (v) => (v.decisions || []).length ? v.decisions[v.decisions.length - 1].at : null, historyCell],
    ["Drift", (v) => v.drift ? v.drift.drifted_turbines.length : null, driftCell],
  ];
  // a model version's drift now: "retrain suggested" while any turbine running it is drifted
  function driftCell(v) {
    const d = v.drift;
    if (!d) return el("span", { class: "muted", text: "no drift reports" });
    if (!d.retrain_suggested) return badge(`no drift (${d.turbines} turbines)`, "ok", { "data-retrain": "false" });
    return el("a", { href: "/drift", title: d.drifted_turbines.join(", ") },
      badge(`retrain suggested: ${d.drifted_turbines.length} of ${d.turbines} turbines drifted`, "warn",
        { "data-retrain": "true" }));
  }
  function renderRegistry() {
    const message = el("div", { id: "message" });
    const tokenInput = el("input", { id: "token", type: "password", placeholder: "dashboard token (printed at start)",
      value: sessionStorage.getItem(TOKEN_KEY) || "", autocomplete: "off" });
    tokenInput.addEventListener("change", () => sessionStorage.setItem(TOKEN_KEY, tokenInput.value.trim()));
    const fleetBox = el("p", { id: "fleet-model", class: "muted" });
    const decideBox = el("div", { id: "decide-box" });
    const compareBox = el("div", { id: "compare-box" });
    const registryBox = el("div", { id: "registry-box" });
    const deploymentsBox = el("div", { id: "deployments-box" });
    content.replaceChildren(
      el("div", { class: "tokenbar" }, el("label", { text: "Token", htmlFor: "token" }), tokenInput), message,
      el("h2", { text: "Model versions" }), fleetBox, decideBox, registryBox, compareBox,
      el("h2", { text: "Deployments" }), deploymentsBox);
    const sort = { column: 1, dir: -1 };  // newest package first
    let last = null;

    async function decide(v, action, reason) {
      const token = tokenInput.value.trim();
      sessionStorage.setItem(TOKEN_KEY, token);
      const headers = { "Content-Type": "application/json" };
      if (token) headers.Authorization = "Bearer " + token;
      const response = await fetch(`/api/registry/${encodeURIComponent(v.version)}/${action}`,
        { method: "POST", headers: headers, body: JSON.stringify({ reason: reason }) });
      let payload = {};
      try { payload = await response.json(); } catch (e) { payload = {}; }
      message.className = response.ok ? "ok" : "err";
      message.dataset.status = String(response.status);
      message.textContent = response.ok ? `${action} ${v.version}: accepted (recorded as ${payload.actor})` :
        `${action} ${v.version} refused (${response.status}): ${payload.error || response.statusText}`;
      if (response.ok) decideBox.replaceChildren();
      await refresh();
    }
    function openDecision(v, action) {
      const reason = el("textarea", { id: "reason", rows: 2, maxLength: 500, required: true,
        placeholder: `why ${action} this version? (recorded with your token's name and the time)` });
      const confirm = el("button", { id: "decide-confirm", class: action, text: `Confirm ${action}`, disabled: true,
        onclick: () => decide(v, action, reason.value.trim()) });
      reason.addEventListener("input", () => { confirm.disabled = !reason.value.trim(); });
      decideBox.replaceChildren(el("div", { class: "decide", "data-action": action, "data-version": v.version },
        el("strong", { text: `${action === "approve" ? "Approve" : "Reject"} package ${v.version} (model ${v.model_version || "—"})` }),
        action === "approve" ? el("span", { class: "muted", text: " — approving rolls it out to the fleet" }) : null,
        el("label", { htmlFor: "reason", text: "Reason" }), reason,
        el("div", {}, confirm, " ", el("button", { id: "decide-cancel", text: "Cancel",
          onclick: () => decideBox.replaceChildren() }))));
      reason.focus();
    }
    function sortedRows(versions) {
      const key = REGISTRY_COLUMNS[sort.column][1];
      return versions.slice().sort((a, b) => {
        const x = key(a), y = key(b);
        if (x === y) return 0;
        if (x === null || x === undefined) return 1;  // unknowns last, whatever the direction
        if (y === null || y === undefined) return -1;
        return (x < y ? -1 : 1) * sort.dir;
      });
    }
    function renderTable(reg) {
      // the actions sit right after the status, so they never scroll out of sight
      const heads = REGISTRY_COLUMNS.map(([name], i) => el("th", {
        class: "sortable", "data-sort": String(i), "aria-sort": i === sort.column ? (sort.dir > 0 ? "ascending" : "descending") : "none",
        onclick: () => { sort.dir = sort.column === i ? -sort.dir : 1; sort.column = i; renderTable(last); } },
        name, i === sort.column ? (sort.dir > 0 ? " ▲" : " ▼") : ""));
      heads.splice(3, 0, el("th", { text: "Actions" }));
      const head = el("tr", {}, heads);
      const rows = sortedRows(reg.versions).map((v) => {
        const cells = REGISTRY_COLUMNS.map(([name, , render]) => el("td", {}, render(v)));
        cells.splice(3, 0, el("td", { class: "actions" },
          v.running ? null : el("button", { class: "compare", text: "Compare", title: "side by side with the model the fleet runs",
            onclick: () => showCompare(v) }),
          v.actions.map((a) => el("button", { class: a, text: a === "approve" ? "Approve" : "Reject",
            onclick: () => openDecision(v, a) }))));
        return el("tr", { class: "version-row" + (v.running ? " running" : ""), "data-version": v.version,
          "data-model-version": v.model_version || "" }, cells);
      });
      registryBox.replaceChildren(reg.error ? el("p", { class: "muted", text: reg.error }) : "",
        el("div", { class: "scroll" }, el("table", { id: "registry" }, el("thead", {}, head), el("tbody", {}, rows))),
        el("h2", { text: "Decisions" }), historyTable(reg.versions));
    }

    // ---- compare with what the fleet runs
    function barChart(title, labels, series, opts) {
      const box = el("div", { class: "chart" }, el("h3", { text: title }));
      const xs = labels.map((_, i) => i);
      const colors = ["#1f5fa8", "#b9770e"];
      const plot = new uPlot({
        width: Math.min(560, Math.max(360, 80 * labels.length)), height: 220,
        scales: { x: { time: false, range: [-0.5, labels.length - 0.5] }, y: opts.y || {} },
        axes: [{ splits: () => xs, values: (u, splits) => splits.map((i) => labels[i] ?? ""), size: 50 }, { size: 55 }],
        series: [{ label: "", value: (u, i) => (i === null || i === undefined ? "" : labels[i] ?? "") }].concat(series.map((s, i) => ({ label: s.label, stroke: colors[i], fill: colors[i] + "99",
          width: 1, paths: uPlot.paths.bars({ size: [series.length > 1 ? 0.35 : 0.6, 60], align: series.length > 1 ? (i ? 1 : -1) : 0 }),
          points: { show: false } }))).concat(opts.reference !== undefined ? [{ label: opts.referenceLabel, stroke: "#c0392b",
          dash: [6, 4], width: 1.5, points: { show: false } }] : []),
      }, [xs].concat(series.map((s) => s.values)).concat(opts.reference !== undefined ? [xs.map(() => opts.reference)] : []), box);
      box.dataset.points = String(xs.length);
      return [box, plot];
    }
    function canarySection(k) {
      const parts = [el("h3", { text: "Shadow statistics (canary)" }), el("p", { class: "muted", text: k.note })];
      if (k.verdict) parts.push(el("p", {}, badge(k.verdict, k.verdict === "promote" ? "ok" : k.verdict === "abort" ? "bad" : "warn",
        { "data-verdict": k.verdict }), " ", el("span", { text: k.reason || "" })));
      if (k.available) {
        parts.push(table(["Gate", "Rule", "Measured", "Limit", ""], (k.gates || []).map((g) => el("tr", { class: "gate-row", "data-gate": g.gate },
          el("td", { text: g.gate }), el("td", { text: g.rule }), el("td", { class: "num", text: g.measured ?? "—" }),
          el("td", { class: "num", text: g.limit ?? "—" }), el("td", {}, badge(g.passed ? "pass" : "fail", g.passed ? "ok" : "bad")))),
          { id: "canary-gates" }));
        parts.push(table(["Canary device", "Windows", "Current alarm rate", "Candidate alarm rate", "Agreement", "Errors"],
          Object.entries(k.devices || {}).map(([t, m]) => el("tr", { class: "canary-device", "data-thing": t },
            el("td", { text: t }), el("td", { class: "num", text: m ? m.windows : "—" }),
            el("td", { class: "num", text: m ? fmtRate(m.current_alarm_rate) : "—" }),
            el("td", { class: "num", text: m ? fmtRate(m.candidate_alarm_rate) : "—" }),
            el("td", { class: "num", text: m ? fmtNum(m.agreement) : "—" }), el("td", { class: "num", text: m ? m.errors : "—" }))),
          { id: "canary-devices" }));
      }
      return el("section", { id: "canary", class: "canary", "data-available": String(k.available) }, parts);
    }
    async function showCompare(v) {
      compareBox.replaceChildren(el("p", { class: "muted", text: `comparing package ${v.version}…` }));
      let c;
      try { c = await api(`/api/registry/${encodeURIComponent(v.version)}/compare`); }
      catch (e) { compareBox.replaceChildren(el("p", { class: "err", text: "compare failed: " + e.message })); return; }
      const dep = c.deployed;
      const depName = dep ? `package ${dep.version ?? "—"} (model ${dep.model_version || "—"})` : "nothing known";
      const lowerIsBetter = (key) => key === "false_alarm_rate";
      const fmtMetric = (key, x) => key === "false_alarm_rate" ? fmtRate(x) : fmtNum(x);
      const metricRows = c.metrics.map((m) => {
        let cls = "";
        if (m.delta !== null && m.delta !== 0) cls = (m.delta > 0) !== lowerIsBetter(m.key) ? "better" : "worse";
        return el("tr", { class: "metric-row", "data-metric": m.key },
          el("td", { text: m.metric }), el("td", { class: "num", text: fmtMetric(m.key, m.candidate) }),
          el("td", { class: "num", text: fmtMetric(m.key, m.deployed) }),
          el("td", { class: "num delta " + cls, text: m.delta === null ? "—" :
            (m.delta > 0 ? "+" : "") + (m.key === "false_alarm_rate" ? fmtRate(m.delta) : fmtNum(m.delta)) }));
      });
      const thresholdRows = c.thresholds.map((t) => el("tr", { class: "threshold-row", "data-feature": t.feature },
        el("td", { text: t.feature }), el("td", { class: "num", text: fmtNum(t.candidate, 4) }),
        el("td", { class: "num", text: fmtNum(t.deployed, 4) }),
        el("td", { class: "num", text: t.ratio === null ? "—" : "×" + fmtNum(t.ratio, 3) })));
      const charts = el("div", { class: "charts compare-charts" });
      compareBox.replaceChildren(el("section", { id: "compare", "data-version": v.version },
        el("h2", { text: `Compare package ${v.version} (model ${v.model_version || "—"}) with what the fleet runs: ${depName}` }),
        el("p", { class: "muted", id: "fleet-source", text: "How we know: " + (c.fleet.detail || "—") }),
        el("div", { class: "side" },
          table(["Metric", `candidate ${v.version}`, "fleet's", "delta"], metricRows, { id: "compare-metrics" }),
          table(["Feature threshold", `candidate ${v.version}`, "fleet's", "candidate / fleet's"], thresholdRows,
            { id: "compare-thresholds" })),
        charts,
        canarySection(c.canary)));
      window.wfCharts = {};
      // F1 and per-kind recall share a 0..1 axis; the baselines are context, not the model
      const scored = c.metrics.filter((m) => (m.key === "f1" || m.key.startsWith("recall:")) &&
        (m.candidate !== null || m.deployed !== null));
      if (scored.length) {
        const [box, plot] = barChart("F1 and recall: candidate vs fleet's", scored.map((m) => m.key === "f1" ? "F1" : m.metric.replace("recall: ", "")),
          [{ label: `candidate ${v.version}`, values: scored.map((m) => m.candidate) },
           { label: "fleet's", values: scored.map((m) => m.deployed) }], { y: { range: [0, 1] } });
        box.dataset.chart = "metrics";
        charts.append(box);
        window.wfCharts.compareMetrics = plot;
      }
      const ratios = c.thresholds.filter((t) => t.ratio !== null);
      if (ratios.length) {
        const [box, plot] = barChart("Threshold per feature, candidate / fleet's (1 = unchanged)", ratios.map((t) => t.feature),
          [{ label: "candidate / fleet's", values: ratios.map((t) => t.ratio) }],
          { y: { range: (u, min, max) => [0, Math.max(1.5, max * 1.1)] }, reference: 1, referenceLabel: "unchanged" });
        box.dataset.chart = "thresholds";
        charts.append(box);
        window.wfCharts.compareThresholds = plot;
      }
      compareBox.scrollIntoView({ block: "nearest" });
    }

    async function refresh() {
      const reg = await api("/api/registry");
      if (!reg.available) registryBox.replaceChildren(el("p", { class: "muted", text: "No model registry configured." }));
      else {
        last = reg;
        const f = reg.fleet || {};
        fleetBox.textContent = f.version ? `The fleet runs package ${f.version} (${f.detail}).` :
          `The fleet's model: ${f.detail || "unknown"}.`;
        renderTable(reg);
      }
      const dep = await api("/api/deployments");
      if (!dep.available) {
        deploymentsBox.replaceChildren(el("p", { class: "muted", text: "No deployment service configured." }));
        return;
      }
      const devices = Object.entries(dep.devices || {}).map(([thing, d]) => el("tr", { class: "device-deployment" },
        el("td", { text: thing }), el("td", {}, deploymentCell(d, true, "dev:" + thing))));
      deploymentsBox.replaceChildren(
        dep.error ? errorDetails("deployments", "", dep.error) : "",
        table(["Deployment", "Target", "Status", "Created"], dep.deployments.map((d) =>
          el("tr", { class: "deployment-row", "data-deployment": d.deploymentId },
            el("td", { text: d.deploymentName || d.deploymentId }), el("td", {}, el("code", { text: d.targetArn || "" })),
            el("td", {}, badge(d.deploymentStatus || "?", stateClass(d.deploymentStatus))),
            el("td", { text: d.creationTimestamp || "" }))), { id: "deployments" }),
        el("h2", { text: "Per device" }),
        table(["Gateway", "Latest deployment on the device"], devices, { id: "device-deployments" }));
    }
    poll(refresh);
  }

  // ------------------------------------------------------------ canary
  // The current (or last) canary: both models' alarm rates and their agreement over time (the
  // pooled figures the gates read), the gates with their limits, the verdict, and Promote /
  // Abort by hand (Bearer token + a reason, recorded with the token's name).
  function renderCanary() {
    const message = el("div", { id: "message" });
    const tokenInput = el("input", { id: "token", type: "password", placeholder: "dashboard token (printed at start)",
      value: sessionStorage.getItem(TOKEN_KEY) || "", autocomplete: "off" });
    tokenInput.addEventListener("change", () => sessionStorage.setItem(TOKEN_KEY, tokenInput.value.trim()));
    const summary = el("div", { id: "canary-summary" });
    const actBox = el("div", { id: "canary-actions" });
    const decideBox = el("div", { id: "decide-box" });
    const chartBox = el("div", { class: "chart", id: "canary-chart" }, el("h3", { text: "Alarm rates and agreement (pooled over the canary devices)" }));
    const gatesBox = el("div", { id: "canary-gates-box" });
    const devicesBox = el("div", { id: "canary-devices-box" });
    content.replaceChildren(
      el("div", { class: "tokenbar" }, el("label", { text: "Token", htmlFor: "token" }), tokenInput), message,
      summary, actBox, decideBox, chartBox, el("h2", { text: "Gates" }), gatesBox,
      el("h2", { text: "Canary devices" }), devicesBox);
    let chart = null;

    async function act(action, reason) {
      const token = tokenInput.value.trim();
      sessionStorage.setItem(TOKEN_KEY, token);
      const headers = { "Content-Type": "application/json" };
      if (token) headers.Authorization = "Bearer " + token;
      const response = await fetch(`/api/canary/${action}`,
        { method: "POST", headers: headers, body: JSON.stringify({ reason: reason }) });
      let payload = {};
      try { payload = await response.json(); } catch (e) { payload = {}; }
      message.className = response.ok ? "ok" : "err";
      message.dataset.status = String(response.status);
      message.textContent = response.ok ? `${action}: done (recorded as ${payload.actor})` :
        `${action} refused (${response.status}): ${payload.error || response.statusText}`;
      if (response.ok) decideBox.replaceChildren();
      await refresh();
    }
    function openDecision(action, version) {
      const reason = el("textarea", { id: "reason", rows: 2, maxLength: 500, required: true,
        placeholder: `why ${action} this canary? (recorded with your token's name and the time)` });
      const confirm = el("button", { id: "decide-confirm", class: action === "promote" ? "approve" : "reject",
        text: `Confirm ${action}`, disabled: true, onclick: () => act(action, reason.value.trim()) });
      reason.addEventListener("input", () => { confirm.disabled = !reason.value.trim(); });
      decideBox.replaceChildren(el("div", { class: "decide", "data-action": action },
        el("strong", { text: action === "promote" ? `Promote model ${version} to the whole fleet` :
          `Abort the canary of model ${version} (its package is marked Rejected)` }),
        el("label", { htmlFor: "reason", text: "Reason" }), reason,
        el("div", {}, confirm, " ", el("button", { id: "decide-cancel", text: "Cancel",
          onclick: () => decideBox.replaceChildren() }))));
      reason.focus();
    }
    function drawChart(view) {
      const series = view.series || [];
      const cfg = view.config || {};
      const k = Number(cfg.alarm_rate_factor), eps = Number(cfg.alarm_rate_epsilon), a = Number(cfg.min_agreement);
      const data = [series.map((p) => p.ts), series.map((p) => p.current_alarm_rate),
        series.map((p) => p.candidate_alarm_rate), series.map((p) => Math.min(1, k * p.current_alarm_rate + eps)),
        series.map((p) => p.agreement), series.map(() => a)];
      chartBox.dataset.points = String(series.length);
      if (!chart) {
        const width = Math.max(480, Math.min(1100, content.clientWidth - 30));
        chart = new uPlot({
          width: width, height: 260, scales: { x: { time: true }, y: { range: [0, 1.05] } },
          series: [{},
            { label: "current alarm rate", stroke: "#2471a3", width: 2 },
            { label: "candidate alarm rate", stroke: "#d35400", width: 2 },
            { label: "alarm-rate limit (k × current + ε)", stroke: "#d35400", width: 1, dash: [6, 4] },
            { label: "agreement", stroke: "#1e8449", width: 2 },
            { label: "minimum agreement", stroke: "#1e8449", width: 1, dash: [6, 4] }],
          axes: [{}, { size: 50 }],
        }, data, chartBox);
        window.wfCharts = { canary: chart };
      } else {
        chart.setData(data);
      }
    }
    async function refresh() {
      const view = await api("/api/canary");
      const state = view.canary || {};
      const running = state.status === "running";
      const verdict = running ? view.verdict : state.status;
      const cls = verdict === "promote" || verdict === "promoted" ? "ok" : verdict === "abort" || verdict === "aborted" ? "bad" : "warn";
      if (!state.status) {
        summary.replaceChildren(el("p", { class: "muted", text: "No canary has run for this model package group." }));
      } else {
        summary.replaceChildren(
          el("p", {}, el("strong", { text: `Model ${state.model_version} (package ${state.package_version}, component ${state.component_version})` }),
            " on ", el("span", { text: (state.devices || []).join(", ") }), el("span", { class: "muted", text: ` · group ${state.thing_group}` })),
          el("p", {}, badge(verdict || "?", cls, { id: "canary-verdict", "data-verdict": verdict || "" }), " ",
            el("span", { id: "canary-reason", text: running ? (view.reason || "") : (state.reason || "") }),
            running ? null : el("span", { class: "muted", text: ` · by ${state.actor || "?"} at ${fmtTime(state.finished)}` })));
      }
      actBox.replaceChildren(
        el("button", { id: "canary-promote", class: "approve", text: "Promote", disabled: !running,
          onclick: () => openDecision("promote", state.model_version) }), " ",
        el("button", { id: "canary-abort", class: "reject", text: "Abort", disabled: !running,
          onclick: () => openDecision("abort", state.model_version) }),
        el("span", { class: "muted", text: running ? " Promote or abort by hand (needs the token); otherwise the gates decide." :
          " No canary is running." }));
      drawChart(view);
      gatesBox.replaceChildren(view.gates ? table(["Gate", "Rule", "Measured", "Limit", ""], view.gates.map((g) =>
        el("tr", { class: "gate-row", "data-gate": g.gate, "data-passed": String(g.passed) },
          el("td", { text: g.gate }), el("td", { text: g.rule }), el("td", { class: "num", text: g.measured ?? "—" }),
          el("td", { class: "num", text: g.limit ?? "—" }), el("td", {}, badge(g.passed ? "pass" : "fail", g.passed ? "ok" : "bad")))),
        { id: "canary-gates" }) : el("p", { class: "muted", text: "Gates are evaluated while a canary runs." }));
      devicesBox.replaceChildren(table(["Device", "Windows", "Current alarm rate", "Candidate alarm rate", "Agreement", "Errors"],
        Object.entries(view.devices || {}).map(([t, m]) => el("tr", { class: "canary-device", "data-thing": t },
          el("td", { text: t }), el("td", { class: "num", text: m ? m.windows : "—" }),
          el("td", { class: "num", text: m ? fmtRate(m.current_alarm_rate) : "—" }),
          el("td", { class: "num", text: m ? fmtRate(m.candidate_alarm_rate) : "—" }),
          el("td", { class: "num", text: m ? fmtNum(m.agreement) : "—" }), el("td", { class: "num", text: m ? m.errors : "—" }))),
        { id: "canary-devices" }));
    }
    poll(refresh);
  }

  // ------------------------------------------------------------ drift
  // Per model version: "retrain suggested" while any turbine running it is drifted in its newest
  // record; per turbine its drifted features; for one turbine (a row click, ?turbine=, else the
  // first drifted) each feature's drift score over time against its threshold.
  function renderDrift() {
    const modelsBox = el("div", { id: "drift-models-box" });
    const turbinesBox = el("div", { id: "drift-turbines-box" });
    const header = el("p", { class: "muted", id: "drift-chart-title" });
    const grid = el("div", { class: "charts", id: "drift-charts" });
    content.replaceChildren(el("h2", { text: "Model versions" }), modelsBox,
      el("h2", { text: "Turbines (newest drift report)" }), turbinesBox, el("h2", { text: "Drift over time" }), header, grid);
    let selected = config.turbine_id || null;
    let charts = {};
    let shown = null;
    function select(id) {
      selected = id;
      history.replaceState(null, "", "/drift?turbine=" + encodeURIComponent(id));
      refresh();
    }
    function featureBadges(d) {
      return d.drifted.length ? d.drifted.map((f) => badge(`${f} ${fmtNum(d.score[f])} > ${fmtNum(d.thresholds[f])}`, "warn",
        { "data-feature": f })) : el("span", { class: "muted", text: "none" });
    }
    function drawSeries(data) {
      if (shown !== data.turbine_id) {
        grid.replaceChildren();
        charts = {};
        shown = data.turbine_id;
      }
      const width = Math.max(480, Math.min(900, grid.clientWidth / (grid.clientWidth > 1100 ? 2 : 1) - 30));
      data.features.forEach((feature, k) => {
        const scores = data.score[feature];
        const series = [data.ts, scores, data.thresholds[feature], scores.map((v, i) => (data.drifted[feature][i] ? v : null))];
        if (!charts[feature]) {
          const box = el("div", { class: "chart", "data-feature": feature }, el("h3", { text: feature + " drift score and its threshold" }));
          grid.append(box);
          charts[feature] = new uPlot(chartOptions("", "drift", PALETTE[k % PALETTE.length], width, "drifted"), series, box);
          charts[feature].wfBox = box;
        } else {
          charts[feature].setData(series);
        }
        const box = charts[feature].wfBox;
        box.dataset.points = String(series[0].length);
        box.dataset.thresholdPoints = String(series[2].filter((v) => v !== null && v !== undefined).length);
        box.dataset.driftedPoints = String(series[3].filter((v) => v !== null).length);
      });
      window.wfCharts = charts;
      const last = data.ts.length - 1;
      header.textContent = `Turbine ${data.turbine_id} (gateway ${data.thing}) · ${data.ts.length} drift reports · model ` +
        `${last >= 0 ? data.model_version[last] : "—"} · ${last >= 0 ? data.samples[last] : "—"} readings per report`;
      header.dataset.turbine = data.turbine_id;
    }
    async function refresh() {
      const view = await api("/api/drift");
      modelsBox.replaceChildren(view.models.length ? table(["Model version", "Turbines reporting", "Drifted now", "Features", ""],
        view.models.map((m) => el("tr", { class: "drift-model", "data-model-version": m.model_version,
          "data-retrain": String(m.retrain_suggested) },
          el("td", {}, el("strong", { text: m.model_version })), el("td", { class: "num", text: String(m.turbines) }),
          el("td", { text: m.drifted_turbines.join(", ") || "—" }),
          el("td", {}, kv(m.features, (n) => el("span", { text: `${n} turbine${n === 1 ? "" : "s"}` }))),
          el("td", {}, m.retrain_suggested ? badge("retrain suggested", "warn", { "data-flag": "retrain" }) : badge("in distribution", "ok")))),
        { id: "drift-models" }) : el("p", { class: "muted", text: "No drift reports yet." }));
      turbinesBox.replaceChildren(table(["Turbine", "Gateway", "Model", "Reported", "Drifted features"],
        view.turbines.map((d) => el("tr", { class: "drift-turbine" + (d.turbine_id === selected ? " running" : ""),
          "data-turbine": d.turbine_id, "data-drifted": String(d.drifted.length > 0), onclick: () => select(d.turbine_id) },
          el("td", {}, el("a", { href: "/drift?turbine=" + encodeURIComponent(d.turbine_id), text: d.turbine_id,
            onclick: (e) => { e.preventDefault(); } })),
          el("td", { text: d.thing }), el("td", { text: d.model_version }), el("td", { text: fmtTime(d.ts) }),
          el("td", {}, featureBadges(d)))), { id: "drift-turbines" }));
      if (!selected && view.turbines.length) selected = (view.flagged[0] || view.turbines[0].turbine_id);
      if (selected) drawSeries(await api(`/api/turbines/${encodeURIComponent(selected)}/drift?limit=2000`));
    }
    poll(refresh);
  }

  // ------------------------------------------------------------ dispatch
  if (config.page === "overview") renderOverview();
  else if (config.page === "turbine") renderTurbine();
  else if (config.page === "anomalies") poll(async () => renderAnomalies(await api("/api/anomalies?limit=200")));
  else if (config.page === "registry") renderRegistry();
  else if (config.page === "canary") renderCanary();
  else if (config.page === "drift") renderDrift();
})();
