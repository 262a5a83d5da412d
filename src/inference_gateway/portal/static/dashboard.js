// The usage dashboard: signs in with an API key or the admin token, reads the usage API and
// draws stacked bar charts in plain SVG. The credential lives in sessionStorage (gone with
// the tab) and travels only in the Authorization header, never in a URL.
"use strict";

const TOKEN = "inference-gateway.usage-token";
const API = "/v1/organization";
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2f5fd0", "#e07a1f", "#2a9d6f", "#c2417a", "#7a5bd0", "#8c8c1f",
                "#1f8ca8", "#a8551f", "#5d6678"];
const MOST_SERIES = COLORS.length;  // the rest is drawn as "other"
const RANGES = {  // bucket width, buckets, and how far back from the current bucket
  "24h": { width: "1h", seconds: 3600, buckets: 24 },
  "7d": { width: "1d", seconds: 86400, buckets: 7 },
  "30d": { width: "1d", seconds: 86400, buckets: 30 },
};

const $ = (id) => document.getElementById(id);
const state = { scope: null, view: null };

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function call(path, params) {
  const url = new URL(API + path, window.location.origin);
  for (const [name, value] of params) url.searchParams.append(name, value);
  const response = await fetch(url, {
    headers: { Authorization: "Bearer " + sessionStorage.getItem(TOKEN) },
    cache: "no-store",
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = body.error && body.error.message ? body.error.message : response.statusText;
    throw new ApiError(response.status, message);
  }
  return body;
}

// Every page of a bucketed query, followed through next_page.
async function allPages(path, params) {
  const buckets = [];
  let page = null;
  do {
    const body = await call(path, page ? [...params, ["page", page]] : params);
    buckets.push(...body.data);
    page = body.has_more ? body.next_page : null;
  } while (page);
  return buckets;
}

function period() {
  const range = RANGES[$("range").value];
  const now = Math.floor(Date.now() / 1000);
  const current = now - (now % range.seconds);
  return { ...range, start: current - (range.buckets - 1) * range.seconds, end: now };
}

function filters() {
  const org = $("org").value.trim();
  return state.scope.admin && org ? [["organization_ids", org]] : [];
}

const number = (n) => Number(n).toLocaleString("en-US");

function short(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(1).replace(/\.0$/, "") + "G";
  if (n >= 1e6) return (n / 1e6).toFixed(1).replace(/\.0$/, "") + "M";
  if (n >= 1e3) return (n / 1e3).toFixed(1).replace(/\.0$/, "") + "k";
  return String(Math.round(n));
}

function when(seconds, width) {
  const iso = new Date(seconds * 1000).toISOString();
  return width === "1h" ? iso.slice(5, 10) + " " + iso.slice(11, 16) : iso.slice(0, 10);
}

const seriesName = (result, group) => {
  const value = result[group];
  return value === null || value === undefined ? "(none)" : String(value);
};

// Buckets and series for the charts: the biggest series by tokens, the rest as "other".
function buildView(buckets, group, family, width) {
  const tokens = (r) => r.input_tokens + (family === "completions" ? r.output_tokens : 0);
  const totals = new Map();
  for (const bucket of buckets) {
    for (const r of bucket.results) {
      const name = seriesName(r, group);
      totals.set(name, (totals.get(name) || 0) + tokens(r));
    }
  }
  let series = [...totals.keys()].sort((a, b) => totals.get(b) - totals.get(a) || a.localeCompare(b));
  const kept = new Set(series.slice(0, series.length > MOST_SERIES ? MOST_SERIES - 1 : MOST_SERIES));
  if (kept.size < series.length) series = [...kept, "other"];
  const rows = buckets.map((bucket) => {
    const values = new Map();
    for (const r of bucket.results) {
      const name = kept.has(seriesName(r, group)) ? seriesName(r, group) : "other";
      const v = values.get(name) || { tokens: 0, requests: 0 };
      values.set(name, { tokens: v.tokens + tokens(r), requests: v.requests + r.num_model_requests });
    }
    return { start: bucket.start_time, values };
  });
  return { buckets, rows, series, group, family, width };
}

function svg(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (parent) parent.appendChild(node);
  return node;
}

// The distance between two grid lines: 1, 2 or 5 times a power of ten, a whole number, about
// a quarter of the highest bar.
function tickStep(highest) {
  const rough = Math.max(highest / 4, 1);
  const power = Math.pow(10, Math.floor(Math.log10(rough)));
  return [1, 2, 5, 10].map((m) => m * power).find((step) => step >= rough);
}

function drawChart(chart, view, metric) {
  const W = 760, H = 240, left = 56, right = 10, top = 12, bottom = 26;
  chart.replaceChildren();
  chart.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const stacks = view.rows.map((row) => view.series.map((s) => (row.values.get(s) || {})[metric] || 0));
  const highest = Math.max(0, ...stacks.map((stack) => stack.reduce((a, b) => a + b, 0)));
  if (highest === 0) {
    svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, chart)
      .textContent = "No usage in this period";
    return;
  }
  const step = tickStep(highest);
  const ceiling = step * Math.ceil(highest / step);
  const plot = H - top - bottom;
  for (let tick = 0; tick <= ceiling; tick += step) {
    const y = top + plot * (1 - tick / ceiling);
    svg("line", { x1: left, x2: W - right, y1: y, y2: y, class: "grid" }, chart);
    svg("text", { x: left - 6, y: y + 4, "text-anchor": "end", class: "axis" }, chart)
      .textContent = short(tick);
  }
  const slot = (W - left - right) / view.rows.length;
  const bar = Math.max(1, slot * 0.75);
  const every = Math.ceil(view.rows.length / 8);
  view.rows.forEach((row, i) => {
    const x = left + i * slot + (slot - bar) / 2;
    let y = top + plot;
    stacks[i].forEach((value, j) => {
      if (!value) return;
      const height = (plot * value) / ceiling;
      y -= height;
      const rect = svg("rect", { x, y, width: bar, height, fill: COLORS[j % COLORS.length],
                                 "data-series": view.series[j], "data-value": value }, chart);
      svg("title", {}, rect).textContent =
        `${view.series[j]}, ${when(row.start, view.width)}: ${number(value)}`;
    });
    if (i % every === 0) {
      svg("text", { x: x + bar / 2, y: H - 8, "text-anchor": "middle", class: "axis" }, chart)
        .textContent = when(row.start, view.width);
    }
  });
}

function drawLegend(view) {
  const items = view.series.map((name, j) => {
    const item = document.createElement("li");
    const swatch = svg("svg", { width: 12, height: 12, "aria-hidden": "true" });
    svg("rect", { width: 12, height: 12, rx: 2, fill: COLORS[j % COLORS.length] }, swatch);
    item.append(swatch, document.createTextNode(name));
    return item;
  });
  $("legend").replaceChildren(...items);
}

function drawTotals(buckets) {
  const sum = (field) => buckets.reduce(
    (total, b) => total + b.results.reduce((t, r) => t + (r[field] || 0), 0), 0);
  $("total-input").textContent = number(sum("input_tokens"));
  $("total-output").textContent = number(sum("output_tokens"));
  $("total-cached").textContent = number(sum("input_cached_tokens"));
  $("total-requests").textContent = number(sum("num_model_requests"));
}

async function drawCost(p) {
  const buckets = await allPages("/costs", [["start_time", p.start], ["end_time", p.end],
                                            ["limit", 31], ...filters()]);
  const results = buckets.flatMap((b) => b.results);
  $("cost-box").hidden = results.length === 0;
  if (results.length) {
    const total = results.reduce((t, r) => t + r.amount.value, 0);
    $("total-cost").textContent = `${total.toFixed(2)} ${results[0].amount.currency.toUpperCase()}`;
  }
}

async function drawTop(p) {
  const body = await call("/usage/organizations", [["start_time", p.start], ["end_time", p.end],
                                                  ["limit", 10]]);
  const rows = body.data.map((org) => {
    const row = document.createElement("tr");
    for (const value of [org.organization_id, number(org.input_tokens),
                         number(org.output_tokens), number(org.num_model_requests)]) {
      const cell = document.createElement("td");
      cell.textContent = value;
      row.appendChild(cell);
    }
    row.addEventListener("click", () => {
      $("org").value = org.organization_id;
      load();
    });
    return row;
  });
  $("top-rows").replaceChildren(...rows);
}

async function load() {
  $("error").textContent = "";
  const p = period();
  const family = $("family").value;
  const group = $("group").value;
  try {
    const buckets = await allPages(`/usage/${family}`, [
      ["start_time", p.start], ["end_time", p.end], ["bucket_width", p.width],
      ["limit", p.buckets + 1], ["group_by", group], ...filters()]);
    state.view = buildView(buckets, group, family, p.width);
    drawTotals(buckets);
    drawChart($("tokens-chart"), state.view, "tokens");
    drawChart($("requests-chart"), state.view, "requests");
    drawLegend(state.view);
    await drawCost(p);
    if (state.scope.admin) await drawTop(p);
    $("updated").textContent = `Updated ${new Date().toISOString().slice(11, 19)} UTC`;
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return signOut(error.message);
    $("error").textContent = error.message;
  }
}

// A cell as a spreadsheet reads it: quoted, and never taken for a formula.
function csvCell(value) {
  let text = value === null || value === undefined ? "" : String(value);
  if (/^[=+\-@\t\r]/.test(text)) text = "'" + text;
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function downloadCsv() {
  const view = state.view;
  if (!view) return;
  const lines = [["bucket_start", "bucket_end", view.group, "input_tokens", "output_tokens",
                  "input_cached_tokens", "num_model_requests"].join(",")];
  for (const bucket of view.buckets) {
    for (const r of bucket.results) {
      lines.push([new Date(bucket.start_time * 1000).toISOString(),
                  new Date(bucket.end_time * 1000).toISOString(), r[view.group],
                  r.input_tokens, r.output_tokens || 0, r.input_cached_tokens || 0,
                  r.num_model_requests].map(csvCell).join(","));
    }
  }
  const blob = new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `usage-${view.family}-by-${view.group}.csv`;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

function describe(scope) {
  if (scope.admin) return "Signed in as an operator: every organization";
  return `Signed in as ${scope.organization_id} / ${scope.instance_id} (key ${scope.api_key_id})`;
}

async function signIn(token) {
  sessionStorage.setItem(TOKEN, token);
  try {
    state.scope = await call("/usage/scope", []);
  } catch (error) {
    sessionStorage.removeItem(TOKEN);
    throw error;
  }
  document.body.classList.toggle("admin", state.scope.admin);
  $("who").textContent = describe(state.scope);
  $("signin").hidden = true;
  $("usage").hidden = false;
  $("signout").hidden = false;
  await load();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN);
  state.scope = state.view = null;
  document.body.classList.remove("admin");
  $("who").textContent = "";
  $("usage").hidden = true;
  $("signout").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
}

function start() {
  $("signin").addEventListener("submit", (event) => {
    event.preventDefault();
    const field = $("token");
    const token = field.value.trim();
    field.value = "";
    $("signin-error").textContent = "";
    signIn(token).catch((error) => { $("signin-error").textContent = error.message; });
  });
  $("signout").addEventListener("click", () => signOut());
  for (const id of ["range", "family", "group", "org"]) $(id).addEventListener("change", load);
  $("refresh").addEventListener("click", load);
  $("csv").addEventListener("click", downloadCsv);
  const saved = sessionStorage.getItem(TOKEN);
  if (saved) signIn(saved).catch((error) => signOut(error.message));
}

start();
