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
  function deploymentCell(dep, available) {
    if (!available) return el("span", { class: "muted", text: "no deployment service" });
    if (!dep) return el("span", { class: "muted", text: "none" });
    if (dep.error) return el("span", { class: "muted", text: dep.error });
    const status = dep.coreDeviceExecutionStatus || dep.deploymentStatus || "?";
    return el("span", {}, badge(status, stateClass(status), { "data-deployment-status": status }), " ",
      el("span", { class: "muted", text: dep.deploymentName || dep.deploymentId || "" }),
      dep.reason ? el("div", { class: "muted", text: dep.reason }) : null);
  }
  function renderOverview(fleet) {
    const rows = fleet.gateways.map((g) => {
      const t = g.telemetry || {};
      const anomalies = g.turbines.reduce((n, x) => n + (x.n_anomalies || 0), 0);
      return el("tr", { class: "gateway", "data-thing": g.thing },
        el("td", {}, el("strong", { text: g.thing })),
        el("td", { class: "model-version", text: g.model_version || "—" }),
        el("td", { title: fmtTime(g.last_seen), text: fmtAge(g.last_seen_age_s) }),
        el("td", {}, g.components.map((c) => badge(
          c.component.replace("com.windfleet.", "") + " " + (c.version || "") + " " + c.state,
          stateClass(c.state), { title: c.reason || "" }))),
        el("td", { class: "num" }, `${t.received ?? 0} rcvd`, el("br"),
          el("span", { class: t.lost ? "badge bad" : "muted", text: `${t.lost ?? 0} lost` }), " ",
          el("span", { class: "muted", text: `${t.duplicates ?? 0} dup` })),
        el("td", {}, deploymentCell(g.deployment, fleet.deployments_available)),
        el("td", { class: "turbines" },
          el("div", { class: "muted", text: `${g.turbines.length} turbines · ${anomalies} anomalous windows` }),
          g.turbines.map((x) => el("a", { href: "/turbines/" + encodeURIComponent(x.turbine_id),
            class: "badge turbine " + (x.anomaly ? "bad" : x.n_anomalies ? "warn" : "ok"), "data-turbine": x.turbine_id,
            title: `score ${fmtNum(x.last_score)} · model ${x.model_version} · ${x.n_anomalies} anomalous windows`,
            text: x.turbine_id }))));
    });
    content.replaceChildren(
      el("p", { class: "muted", text: `${fleet.gateways.length} gateways · ` +
        `${fleet.gateways.reduce((n, g) => n + g.turbines.length, 0)} turbines · ` +
        `${(fleet.counters || {}).messages_in || 0} telemetry messages ingested` }),
      table(["Gateway", "Model version", "Last seen", "Components", "Telemetry", "Deployment", "Turbines"],
        rows, { id: "fleet" }));
  }

  // ------------------------------------------------------------ turbine charts
  const PALETTE = ["#1f5fa8", "#7d3c98", "#117a65", "#b9770e", "#2e4053", "#a04000"];
  function chartOptions(title, label, color, width) {
    return {
      title: title, width: width, height: 220,
      scales: { x: { time: true } },
      series: [
        {},
        { label: label, stroke: color, width: 1.5 },
        { label: "threshold", stroke: "#c0392b", width: 1.5, dash: [6, 4] },
        { label: "anomaly", stroke: "#c0392b", fill: "#c0392b", width: 0, paths: () => null,
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
      el("td", { text: l.message || "" })));
    content.replaceChildren(
      el("p", { class: "muted", text: `${body.anomalies.length} most recent anomalous windows (newest first)` }),
      table(["Time", "Turbine", "Gateway", "Features over threshold", "Score", "Model"], rows, { id: "timeline" }),
      el("h2", { text: "Device warnings and errors" }),
      table(["Time", "Gateway", "Component", "Level", "Message"], logs, { id: "logs" }));
  }

  // ------------------------------------------------------------ registry + deployments
  function renderRegistry() {
    const message = el("div", { id: "message" });
    const tokenInput = el("input", { id: "token", type: "password", placeholder: "dashboard token (printed at start)",
      value: sessionStorage.getItem(TOKEN_KEY) || "", autocomplete: "off" });
    tokenInput.addEventListener("change", () => sessionStorage.setItem(TOKEN_KEY, tokenInput.value.trim()));
    const registryBox = el("div", { id: "registry-box" });
    const deploymentsBox = el("div", { id: "deployments-box" });
    content.replaceChildren(
      el("div", { class: "tokenbar" }, el("label", { text: "Token", htmlFor: "token" }), tokenInput), message,
      el("h2", { text: "Model versions" }), registryBox,
      el("h2", { text: "Deployments" }), deploymentsBox);

    async function decide(version, action) {
      const token = tokenInput.value.trim();
      sessionStorage.setItem(TOKEN_KEY, token);
      const headers = { "Content-Type": "application/json" };
      if (token) headers.Authorization = "Bearer " + token;
      let body = "{}";
      if (action === "reject") body = JSON.stringify({ reason: "rejected from the dashboard" });
      const response = await fetch(`/api/registry/${encodeURIComponent(version)}/${action}`,
        { method: "POST", headers: headers, body: body });
      let payload = {};
      try { payload = await response.json(); } catch (e) { payload = {}; }
      message.className = response.ok ? "ok" : "err";
      message.dataset.status = String(response.status);
      message.textContent = response.ok ? `${action} ${version}: accepted` :
        `${action} ${version} refused (${response.status}): ${payload.error || response.statusText}`;
      await refresh();
    }
    function metricsText(metrics) {
      if (!metrics || typeof metrics !== "object") return "";
      const flat = [];
      (function walk(prefix, obj) {
        for (const [k, v] of Object.entries(obj)) {
          if (v && typeof v === "object" && flat.length < 12) walk(prefix + k + ".", v);
          else if (typeof v === "number") flat.push(`${prefix}${k}=${Number.isInteger(v) ? v : v.toFixed(3)}`);
          else if (typeof v === "string" && v.length < 40) flat.push(`${prefix}${k}=${v}`);
        }
      })("", metrics);
      return flat.slice(0, 12).join("  ");
    }
    async function refresh() {
      const reg = await api("/api/registry");
      if (!reg.available) registryBox.replaceChildren(el("p", { class: "muted", text: "No model registry configured." }));
      else registryBox.replaceChildren(
        reg.error ? el("p", { class: "muted", text: reg.error }) : "",
        table(["Version", "Status", "Created", "Metrics", ""], reg.versions.map((v) =>
          el("tr", { class: "version-row", "data-version": v.version },
            el("td", { text: v.version }), el("td", {}, badge(v.status || "?", stateClass(v.status), { "data-status": v.status })),
            el("td", { text: v.created || "" }), el("td", {}, el("code", { text: metricsText(v.metrics) })),
            el("td", {},
              el("button", { class: "approve", text: "Approve", onclick: () => decide(v.version, "approve") }), " ",
              el("button", { class: "reject", text: "Reject", onclick: () => decide(v.version, "reject") })))),
        { id: "registry" }));
      const dep = await api("/api/deployments");
      if (!dep.available) {
        deploymentsBox.replaceChildren(el("p", { class: "muted", text: "No deployment service configured." }));
        return;
      }
      const devices = Object.entries(dep.devices || {}).map(([thing, d]) => el("tr", { class: "device-deployment" },
        el("td", { text: thing }), el("td", {}, deploymentCell(d, true))));
      deploymentsBox.replaceChildren(
        dep.error ? el("p", { class: "muted", text: dep.error }) : "",
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

  // ------------------------------------------------------------ dispatch
  if (config.page === "overview") poll(async () => renderOverview(await api("/api/fleet")));
  else if (config.page === "turbine") renderTurbine();
  else if (config.page === "anomalies") poll(async () => renderAnomalies(await api("/api/anomalies?limit=200")));
  else if (config.page === "registry") renderRegistry();
})();
