// The web page: plain DOM over the service's JSON routes (GET /info, POST /recommend with trace and explain,
// GET /similar-items, POST /events). Every string from the data goes through textContent, never HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;          // GET /info
let shown = null;         // the last answer: {user_id, items, trace, ...}
let previousTop = null;   // item ids of the list before the last recorded event, to show what changed

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method, headers: body ? {"Content-Type": "application/json"} : {}, body: body ? JSON.stringify(body) : undefined,
  });
  const data = await response.json().catch(() => ({error: `${response.status} ${response.statusText}`}));
  if (!response.ok) throw new Error(data.error || `${response.status}`);
  return data;
}

function status(text, kind = "") {
  $("status").textContent = text;
  $("status").className = kind;
}

const fmt = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const day = (ts) => (ts === null ? "sent now" : new Date(ts * 1000).toISOString().slice(0, 10));

// ------------------------------------------------------------------ the form
function request() {
  const user = $("user_id").value.trim();
  const recent = $("recent_items").value.split(/[\s,]+/).filter(Boolean);
  const genres = [...$("genres_any").selectedOptions].map((o) => o.value);
  const year = (id) => ($(id).value === "" ? null : Number($(id).value));
  const filters = {};
  if (genres.length) filters.genres_any = genres;
  if (year("year_min") !== null) filters.year_min = year("year_min");
  if (year("year_max") !== null) filters.year_max = year("year_max");
  const body = {k: Number($("k").value) || 10, exclude_seen: $("exclude_seen").checked, explain: true, trace: true};
  if (user) body.user_id = user;
  if (recent.length) body.recent_items = recent;
  if (Object.keys(filters).length) body.filters = filters;
  return body;
}

function remember(body) {
  const params = new URLSearchParams();
  if (body.user_id) params.set("user_id", body.user_id);
  if (body.recent_items) params.set("recent_items", body.recent_items.join(","));
  history.replaceState(null, "", params.toString() ? `?${params}` : location.pathname);
}

async function recommend(event) {
  if (event) { event.preventDefault(); previousTop = null; }
  const body = request();
  if (!body.user_id && !body.recent_items) { status("Type a user id, or recent item ids for a new user.", "error"); return; }
  remember(body);
  status("…");
  try {
    shown = await api("POST", "recommend", body);
  } catch (err) {
    status(err.message, "error");
    return;
  }
  render(shown);
}

// ------------------------------------------------------------------ rendering
function render(answer) {
  const top = answer.items.map((item) => item.item_id);
  const changed = previousTop ? top.filter((id) => !previousTop.includes(id)).length : null;
  status(answer.fallback ? "No history and no features: the most popular items (fallback)."
         : changed === null ? `${answer.items.length} items for ${answer.user_id ?? "a new user"}` +
           (Object.keys(answer.assignments).length
             ? ` (experiments: ${Object.entries(answer.assignments).map(([e, v]) => `${e} = ${v}`).join(", ")}).` : ".")
         : `Event recorded. ${changed} new item(s) in the top ${top.length}; the list below marks them.`, "ok");
  renderTimings(answer.timings_ms);
  renderHistory(answer.trace);
  renderCandidates(answer.trace.candidates);
  renderRanked(answer.items);
}

function renderTimings(timings) {
  const total = Object.values(timings).reduce((a, b) => a + b, 0);
  $("timings").replaceChildren(...Object.entries(timings).map(([stage, ms]) =>
    el("span", {class: "chip", title: "milliseconds in this stage"}, `${stage.replace("_", " ")} ${fmt(ms, 2)} ms`)),
    el("span", {class: "chip total"}, `total ${fmt(total, 2)} ms`));
}

function renderHistory(trace) {
  $("history_count").textContent = `(${trace.history_length}, most recent first)`;
  $("history").replaceChildren(...trace.history.map((h) =>
    el("li", {class: "item", "data-item": h.item_id, onclick: () => detail(h.item_id, h.title)},
       el("span", {class: "title"}, h.title),
       el("span", {class: "meta stars", title: h.rating === null ? "no rating" : `rated ${h.rating}`},
          h.rating === null ? "" : "★".repeat(Math.max(0, Math.round(h.rating)))),
       el("span", {class: "meta muted"}, day(h.timestamp)))));
}

function renderCandidates(candidates) {
  $("candidate_count").textContent = `(${candidates.length}, recall order)`;
  $("candidates").replaceChildren(...candidates.map((c) =>
    el("li", {class: `item ${c.rank === null ? "" : "picked"}`, "data-item": c.item_id,
              title: c.rank === null ? "not in the top-K" : `re-ranked to #${c.rank + 1}`, onclick: () => detail(c.item_id, c.title)},
       el("span", {class: "title"}, c.title),
       el("span", {class: `badge ${c.source}`, title: `candidate source: ${c.source}`}, c.source === "two-tower" ? "tower" : c.source),
       el("span", {class: "meta", title: "recall score (user · item vectors)"}, fmt(c.recall_score)),
       el("span", {class: "meta muted", title: "re-ranker score"}, c.ranking_score === null ? "" : fmt(c.ranking_score)))));
}

function renderRanked(items) {
  $("ranked").replaceChildren(...items.map((item, position) => {
    const move = item.recall_rank === null ? null : item.recall_rank - position;
    const fresh = previousTop && !previousTop.includes(item.item_id);
    return el("li", {class: `item ${fresh ? "fresh" : ""}`, "data-item": item.item_id, onclick: () => detail(item.item_id, item.title, item)},
      el("span", {class: "title"}, item.title),
      el("span", {class: "meta", title: item.ranking_score === null ? "popularity" : "re-ranker score"},
         item.ranking_score === null ? `pop ${fmt(item.popularity, 0)}` : fmt(item.ranking_score)),
      el("span", {class: `move ${move > 0 ? "up" : move < 0 ? "down" : ""}`,
                  title: "places moved by the re-ranker (from its recall rank)"},
         move === null ? "" : move > 0 ? `▲${move}` : move < 0 ? `▼${-move}` : "="),
      fresh ? el("span", {class: "badge fresh"}, "new") : "",
      el("button", {type: "button", class: "event", title: "record that this user liked the item (POST /events)",
                    onclick: (e) => { e.stopPropagation(); recordEvent(item); }}, "♥ event"));
  }));
}

// ------------------------------------------------------------------ item detail: explain features + similar items
async function detail(itemId, title, item = null) {
  $("detail_title").textContent = title;
  $("detail_hint").textContent = `item ${itemId}`;
  $("features_title").hidden = !item?.features;
  $("features").replaceChildren(...Object.entries(item?.features ?? {}).map(([name, value]) =>
    el("tr", {}, el("td", {}, name), el("td", {class: "num"}, typeof value === "number" ? fmt(value) : value))));
  $("similar_title").hidden = false;
  try {
    const similar = await api("GET", `similar-items/${encodeURIComponent(itemId)}?k=10`);
    $("similar").replaceChildren(...similar.items.map((s) =>
      el("li", {class: "item", "data-item": s.item_id, onclick: () => detail(s.item_id, s.title)},
         el("span", {class: "title"}, s.title), el("span", {class: "meta"}, fmt(s.recall_score)))));
  } catch (err) {
    $("similar").replaceChildren(el("li", {class: "error"}, err.message));
  }
}

// ------------------------------------------------------------------ events
async function recordEvent(item) {
  const user = shown?.user_id;
  if (!user) { status("Events need a user id: type one above.", "error"); return; }
  const rating = info ? info.rating_scale.max : null;
  try {
    await api("POST", "events", {user_id: user, item_id: item.item_id, rating});
  } catch (err) {
    status(`event not recorded: ${err.message}`, "error");
    return;
  }
  previousTop = shown.items.map((i) => i.item_id);
  await recommend();
}

// ------------------------------------------------------------------ experiments
const interval = (pair) => `[${fmt(pair[0])}, ${fmt(pair[1])}]`;

async function renderExperiments() {
  const running = (await api("GET", "experiments")).experiments;
  $("experiments_box").hidden = running.length === 0;
  const tables = [];
  for (const exp of running) {
    const report = await api("GET", `experiments/${encodeURIComponent(exp.name)}`);
    const head = el("tr", {}, ...["variant", "users", "impressions", "clicks", "CTR", "vs control", "p"].map((h) => el("th", {}, h)));
    const rows = report.variants.map((v) => el("tr", {"data-variant": v.name}, el("td", {}, v.name), el("td", {}, v.users),
      el("td", {}, v.impressions), el("td", {}, v.clicks), el("td", {}, `${fmt(v.ctr.value)} ${interval(v.ctr.interval)}`),
      el("td", {}, v.vs_control ? `${fmt(v.vs_control.difference)} ${interval(v.vs_control.interval)}` : "control"),
      el("td", {}, v.vs_control ? fmt(v.vs_control.p_value) : "")));
    const notes = [];
    if (report.sample_ratio?.mismatch) notes.push("sample ratio mismatch: the split is broken, do not trust the comparison");
    if (report.interleave) {
      const i = report.interleave;
      notes.push(`wins ${i.a} ${i.wins_a} · ${i.b} ${i.wins_b} · ties ${i.ties}; ${i.b}'s preference ` +
                 `${fmt(i.preference_b.difference)} ${interval(i.preference_b.interval)}, p ${fmt(i.preference_b.p_value)}`);
    }
    tables.push(el("div", {class: "experiment", "data-experiment": exp.name},
      el("h3", {}, `${exp.name} (${exp.mode})`), el("table", {}, head, ...rows), ...notes.map((n) => el("p", {class: "muted"}, n))));
  }
  $("experiments").replaceChildren(...tables);
}

// ------------------------------------------------------------------ start
async function start() {
  try {
    info = await api("GET", "info");
    $("bundle").textContent = `bundle ${info.bundle_version} · ${info.items} items · ${info.users} users · ` +
      `ranker ${info.ranker ?? "none"} · ${info.candidates} candidates`;
    $("known_users").replaceChildren(...info.example_users.map((u) => el("option", {value: u})));
    $("genres_any").replaceChildren(...info.genres.map((g) => el("option", {value: g}, g)));
    if (info.years.min !== null) { $("year_min").placeholder = info.years.min; $("year_max").placeholder = info.years.max; }
  } catch (err) {
    status(`the service is not ready: ${err.message}`, "error");
  }
  $("ask").addEventListener("submit", recommend);
  renderExperiments().catch((err) => status(`experiments: ${err.message}`, "error"));
  const params = new URLSearchParams(location.search);
  if (params.get("user_id")) $("user_id").value = params.get("user_id");
  if (params.get("recent_items")) $("recent_items").value = params.get("recent_items");
  if (params.get("user_id") || params.get("recent_items")) await recommend();
}

start();
