// isthmus web view: polls the admin API's status pages once a second and renders them.
// Only textContent is used for data, so nothing a member cluster names is ever parsed as HTML.
"use strict";

const TYPES = ["CDS", "LDS", "EDS", "RDS", "SDS"];
let token = sessionStorage.getItem("isthmus-token") || "";

async function get(path) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const response = await fetch(path, { headers, cache: "no-store" });
  if (response.status === 401 || response.status === 403) {
    document.getElementById("auth").hidden = false;
    throw new Error(path + ": " + response.status + " (give an admin token with the read right)");
  }
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function badge(row, state) {
  const td = row.insertCell();
  const span = document.createElement("span");
  span.textContent = state;
  span.className = "state state-" + String(state).replace(/ /g, "-");
  td.appendChild(span);
  return td;
}

function fill(id, items, render) {
  const body = document.querySelector("#" + id + " tbody");
  const rows = document.createDocumentFragment();
  for (const item of items) {
    const row = document.createElement("tr");
    render(row, item);
    rows.appendChild(row);
  }
  body.replaceChildren(rows);
}

function renderClusters(clusters) {
  fill("clusters", Object.entries(clusters), (row, [name, c]) => {
    const discovery = c.discovery || {};
    const state = discovery.state || c.state || "unknown";
    row.dataset.cluster = name;
    row.dataset.state = state;
    cell(row, name);
    badge(row, state);
    const gateway = cell(row, c.gateway || "-");
    if (c.gateway_down) {
      gateway.textContent += " ";
      const down = document.createElement("span");
      down.textContent = "down";
      down.className = "state state-down";
      gateway.appendChild(down);
    }
    cell(row, c.weight === undefined ? "-" : c.weight + "%");
    const drain = c.drain;
    if (drain) {
      row.dataset.drain = drain.state;
      badge(row, drain.state + " at " + drain.weight + "%");
    } else {
      cell(row, "-");
    }
    cell(row, discovery.source || (c.state === "static" ? "mesh file" : "-"));
    cell(row, discovery.detail || c.detail || "", "detail");
  });
}

function renderServices(mesh) {
  fill("services", mesh.services, (row, s) => {
    row.dataset.service = s.service;
    row.dataset.servedBy = Object.keys(s.endpoints).join(",");
    cell(row, s.service);
    cell(row, Object.entries(s.endpoints).map(([c, n]) => c + " (" + n + ")").join(", ") || "none");
    cell(row, s.defined_in.join(", ") || "-");
    cell(row, s.clusterset_ip || "-");
    cell(row, s.ports.map((p) => p.name + " " + p.port + "/" + p.protocol).join(", "));
  });
}

function renderProxies(proxies) {
  fill("proxies", proxies, (row, p) => {
    row.dataset.proxy = p.proxy;
    cell(row, p.proxy);
    cell(row, p.cluster || "-");
    cell(row, p.role);
    cell(row, p.mode);
    for (const type of TYPES) {
      const t = p.types[type];
      const td = t ? badge(row, t.state) : cell(row, "-");
      if (t && t.last_nack) td.title = t.last_nack.message;
    }
  });
}

async function refresh() {
  try {
    const [clusters, mesh, proxies] = await Promise.all([
      get("/debug/clusters"),
      get("/debug/mesh"),
      get("/debug/syncz"),
    ]);
    renderClusters(clusters);
    renderServices(mesh);
    renderProxies(proxies);
    const synced = proxies.filter((p) => Object.values(p.types).every((t) => t.state === "SYNCED")).length;
    document.getElementById("summary").textContent =
      Object.keys(clusters).length + " member clusters, " + mesh.services.length + " services, " +
      proxies.length + " proxies (" + synced + " in sync)";
    document.getElementById("version").textContent = mesh.version || "-";
    document.getElementById("updated").textContent = new Date().toLocaleTimeString();
    document.getElementById("error").textContent = "";
  } catch (error) {
    document.getElementById("error").textContent = String(error.message || error);
  }
}

document.getElementById("auth").addEventListener("submit", (event) => {
  event.preventDefault();
  token = document.getElementById("token").value.trim();
  sessionStorage.setItem("isthmus-token", token);
  refresh();
});

refresh();
setInterval(refresh, 1000);
