// The petal swarm dashboard: polls /v1/dashboard (same origin: over TCP the login cookie goes with it) and redraws.
// No framework, no build step. Every value from the swarm is set as text (textContent), never parsed as HTML.
"use strict";

const params = new URLSearchParams(location.search);
const REFRESH_MS = Math.max(1, Number(params.get("refresh")) || 3) * 1000;
const gone = new Map(); // "model peer" -> last row seen: a server that left the DHT stays listed, offline

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-") || key === "title" || key === "href") node.setAttribute(key, String(value));
    else node[key] = value;
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

const ms = (s) => (s === null || s === undefined ? "–" : `${(s * 1000).toFixed(s < 0.01 ? 2 : 1)} ms`);
const num = (x, digits = 1) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const who = (s) => (s.public_name ? `${s.public_name} (${s.short_id})` : s.short_id);

function facts(pairs) {
  const dl = el("dl", {class: "facts"});
  for (const [label, value] of pairs) dl.append(el("div", {}, el("dt", {text: label}), el("dd", {text: value})));
  return dl;
}

function renderDaemon(d) {
  const box = document.getElementById("daemon");
  const serving = (d.serving || []).map(
    (s) => `${s.model} [${s.start}, ${s.end}) ${num(s.throughput)} tok/s, ${s.sessions} sessions, ${s.cache_tokens_left} cache tokens left`
  );
  box.replaceChildren(
    el("h2", {text: "This daemon"}),
    facts([
      ["peer", d.peer_id ? d.peer_id.slice(-8) : "–"],
      ["name", d.public_name || "–"],
      ["version", String(d.version ?? "–")],
      ["uptime", `${Math.round(d.uptime_s || 0)} s`],
      ["DHT peers", String(d.dht_peers ?? "–")],
      ["reachable", d.reachable === null || d.reachable === undefined ? "unknown" : d.reachable ? "yes" : "no (relayed)"],
      ["serving", serving.length ? serving.join("; ") : "nothing (client only)"],
    ])
  );
  box.dataset.peer = d.peer_id || "";
}

function withGone(model) {
  // servers seen before that are no longer announced at all: keep them, offline
  const present = new Set(model.servers.map((s) => s.peer_id));
  for (const s of model.servers) gone.set(`${model.model} ${s.peer_id}`, s);
  const rows = [...model.servers];
  for (const [key, s] of gone) {
    const [name, peer] = key.split(" ");
    if (name === model.model && !present.has(peer)) rows.push({...s, state: "offline", rtt_s: null, vanished: true});
  }
  return rows;
}

function renderMap(model, servers) {
  const n = model.num_blocks;
  const table = el("table", {class: "map", "data-role": "block-map"});
  const head = el("tr", {}, el("th", {class: "who", text: "block"}));
  for (let i = 0; i < n; i++) head.append(el("th", {text: String(i)}));
  table.append(head);
  const overall = el("tr", {"data-role": "blocks"}, el("th", {class: "who", text: "swarm"}));
  model.blocks.forEach((state, i) =>
    overall.append(el("td", {class: `st-${state}`, title: `block ${i}: ${state}`, "data-block": i, "data-state": state}))
  );
  table.append(overall);
  for (const s of servers) {
    const row = el("tr", {"data-peer": s.peer_id, "data-state": s.state}, el("th", {class: "who", text: who(s)}));
    for (let i = 0; i < n; i++) {
      const covered = s.start <= i && i < s.end;
      row.append(el("td", covered ? {class: `st-${s.state}`, title: `${who(s)}: block ${i}, ${s.state}`} : {}));
    }
    table.append(row);
  }
  return table;
}

function renderServers(servers) {
  const cols = ["peer", "name", "state", "span", "version", "dtype / quant", "adapters", "throughput", "link", "cache left", "reach", "RTT", "reports"];
  const table = el("table", {class: "servers", "data-role": "servers"});
  table.append(el("tr", {}, ...cols.map((c) => el("th", {text: c}))));
  for (const s of servers) {
    table.append(
      el(
        "tr",
        {"data-peer": s.peer_id, "data-state": s.state},
        el("td", {}, el("code", {text: s.short_id, title: s.peer_id})),
        el("td", {text: s.public_name || "–"}),
        el("td", {class: `state ${s.state}`, text: s.vanished ? "offline (gone)" : s.state}),
        el("td", {text: `[${s.start}, ${s.end})`}),
        el("td", {class: "num", text: String(s.version)}),
        el("td", {text: `${s.dtype} / ${s.quant}`}),
        el("td", {"data-role": "adapters", text: s.adapters && s.adapters.length ? s.adapters.join(", ") : "–"}),
        el("td", {class: "num", text: `${num(s.throughput)} tok/s`}),
        el("td", {class: "num", text: s.link_mbit === null || s.link_mbit === undefined ? "–" : `${s.link_mbit} Mbit/s`}),
        el("td", {class: "num", text: String(s.cache_tokens_left)}),
        el("td", {text: s.reach + (s.tls ? " (TLS)" : "")}),
        el("td", {class: "num", text: ms(s.rtt_s)}),
        el("td", {
          class: s.reports ? "num problem" : "num",
          "data-role": "reports",
          title: "clients that signed a report of wrong outputs from this server (spot checks, petalctl verify)",
          text: s.reports ? `⚠ ${s.reports}` : "0",
        })
      )
    );
  }
  return table;
}

function renderRoute(model) {
  const box = el("div", {class: "route", "data-role": "route"}, el("strong", {text: "Route now: "}));
  if (!model.route) {
    box.append(el("span", {class: "problem", text: model.route_error || "none"}));
    return box;
  }
  model.route.forEach((hop, i) => {
    if (i) box.append(el("span", {class: "arrow", text: "→"}));
    box.append(el("span", {class: "hop", "data-peer": hop.peer_id, text: `[${hop.start}, ${hop.end}) on ${who(hop)} · ${ms(hop.rtt_s)}`}));
  });
  return box;
}

function renderModel(model) {
  const servers = withGone(model);
  const health = model.healthy
    ? el("span", {class: "badge healthy", text: "healthy"})
    : el("span", {class: "badge broken", text: `broken: ${model.uncovered.map(([a, b]) => `${a}:${b}`).join(", ")} not served`});
  const online = servers.filter((s) => s.state === "online").length;
  return el(
    "section",
    {class: "panel", "data-model": model.model, "data-healthy": model.healthy},
    el(
      "div",
      {class: "model-head"},
      el("h2", {text: model.model}),
      health,
      el("span", {class: "muted", text: `${model.family}, ${model.num_blocks} blocks, ${online}/${servers.length} servers online`})
    ),
    renderMap(model, servers),
    renderServers(servers),
    renderRoute(model)
  );
}

function showProblem(text) {
  const p = document.getElementById("problem");
  p.hidden = !text;
  p.textContent = text || "";
}

async function poll() {
  try {
    const r = await fetch("/v1/dashboard", {cache: "no-store", credentials: "same-origin"});
    const data = await r.json();
    if (!r.ok) throw new Error(data && data.error ? data.error.message : `HTTP ${r.status}`);
    renderDaemon(data.daemon);
    const main = document.getElementById("models");
    const sections = data.models.map(renderModel);
    if (!sections.length) sections.push(el("p", {class: "muted", text: "No model is announced in the swarm yet."}));
    main.replaceChildren(...sections);
    document.getElementById("updated").textContent = `updated ${new Date(data.at * 1000).toLocaleTimeString()}`;
    document.body.dataset.loaded = "true";
    showProblem("");
  } catch (e) {
    showProblem(`cannot read /v1/dashboard: ${e.message}`);
  } finally {
    setTimeout(poll, REFRESH_MS);
  }
}

poll();
