// The wallboard: one tile per queue (waiting, longest wait, service level, answered and
// abandoned, its agents by state), agents by state over the site, a chart of callers waiting, the alert banner, the calls in
// progress and the queued callbacks still to make. Figures come from /api/kpi/live, fetched again as soon as an event arrives on
// /api/events; calls in progress from /api/calls, then from the call events themselves.
"use strict";

(() => {
  const s = Edgecc.requireRole("supervisor");
  if (!s) return;
  Edgecc.header(s);
  const { el, text, seconds } = Edgecc;
  const SL_WARN = 0.8, SL_BAD = 0.6, HISTORY = 600;
  const calls = new Map();        // call_id -> call
  const alerts = new Map();       // rule/key -> message
  const history = [];             // [unix seconds, {queue: callers waiting}]
  // One colour per queue, in the order queues were first seen (kept while the page lives).
  const PALETTE = ["#388bfd", "#2ea043", "#d29922", "#f85149", "#a371f7", "#3fb9a0", "#db61a2", "#e3b341"];
  const colours = new Map();
  function colourOf(queue) {
    if (!colours.has(queue)) colours.set(queue, PALETTE[colours.size % PALETTE.length]);
    return colours.get(queue);
  }
  let board = null, boardAt = 0, refreshing = false, again = false;

  async function refresh() {
    if (refreshing) { again = true; return; }
    refreshing = true;
    try {
      board = await Edgecc.api("GET", "/api/kpi/live");
      boardAt = Date.now() / 1000;
      render();
    } catch (e) {
      console.warn("kpi/live", e.message);
    } finally {
      refreshing = false;
      if (again) { again = false; refresh(); }
    }
  }

  function tileClass(q) {
    if (q.service_level === null) return "tile";
    return "tile" + (q.service_level < SL_BAD ? " bad" : q.service_level < SL_WARN ? " warn" : "");
  }

  function render() {
    if (!board) return;
    const tiles = document.getElementById("tiles");
    const elapsed = Date.now() / 1000 - boardAt;
    tiles.replaceChildren(...board.queues.map((q) => el("div", { class: tileClass(q), "data-queue": q.queue },
      el("h2", {}, q.queue),
      el("div", { class: "figure" }, "Waiting", el("b", { "data-figure": "waiting" }, q.waiting)),
      el("div", { class: "figure" }, "Longest wait",
         el("b", { "data-figure": "longest_wait" }, seconds(q.waiting ? q.longest_wait + elapsed : 0))),
      el("div", { class: "figure" }, "Service level",
         el("b", { "data-figure": "service_level" }, q.service_level === null ? "—" : Math.round(q.service_level * 100) + "%")),
      el("div", { class: "figure muted" }, "Answered / abandoned",
         el("span", {}, q.answered + " / " + q.abandoned)),
      el("div", { class: "states", "data-figure": "agents" },
         ...Object.entries(q.agents_by_state || {}).filter(([, n]) => n > 0)
           .map(([state, n]) => el("span", { class: "pill " + state, "data-state": state }, state + " " + n))))));
    if (!board.queues.length) tiles.append(el("p", { class: "muted", id: "no-queues" }, "No calls yet today."));
    const states = document.getElementById("states");
    states.replaceChildren(...Object.entries(board.agents_by_state).map(([state, n]) =>
      el("span", { class: "state", "data-state": state }, state + ": ", el("b", {}, n))));
  }

  function sample() {
    const now = Date.now() / 1000;
    const waiting = {};
    for (const q of board ? board.queues : []) waiting[q.queue] = q.waiting;
    history.push([now, waiting]);
    while (history.length && history[0][0] < now - HISTORY) history.shift();
    draw(now);
    render();
  }

  function legend(queues) {
    const box = document.getElementById("chart-legend");
    const shown = [...box.children].map((c) => c.dataset.queue).join(",");
    if (shown === queues.join(",")) return;
    box.replaceChildren(...queues.map((q) => el("span", { class: "state", "data-queue": q, "data-colour": colourOf(q) },
      el("b", { style: "color:" + colourOf(q) }, "— "), q)));
  }

  function draw(now) {
    const canvas = document.getElementById("chart");
    const g = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height;
    g.clearRect(0, 0, w, h);
    const queues = [...new Set(history.flatMap(([, by]) => Object.keys(by)))].sort();
    const top = Math.max(5, ...history.flatMap(([, by]) => Object.values(by)));
    g.strokeStyle = "#30363d";
    g.fillStyle = "#8b98a5";
    g.font = "12px sans-serif";
    for (let i = 0; i <= 4; i++) {
      const y = h - 10 - (h - 20) * i / 4;
      g.beginPath(); g.moveTo(30, y); g.lineTo(w, y); g.stroke();
      g.fillText(String(Math.round(top * i / 4)), 4, y + 4);
    }
    g.lineWidth = 2;
    for (const queue of queues) {  // one line per queue (0 while it was not listed yet)
      g.strokeStyle = colourOf(queue);
      g.beginPath();
      history.forEach(([t, by], i) => {
        const x = 30 + (w - 30) * (1 - (now - t) / HISTORY);
        const y = h - 10 - (h - 20) * (by[queue] || 0) / top;
        if (i) g.lineTo(x, y); else g.moveTo(x, y);
      });
      g.stroke();
    }
    legend(queues);
  }

  function renderCalls() {
    const now = Date.now() / 1000;
    const rows = [...calls.values()].sort((a, b) => (a.since || 0) - (b.since || 0)).map((c) =>
      el("tr", { "data-call-id": c.call_id },
        el("td", {}, c.caller || "—"), el("td", {}, c.dialled || "—"), el("td", {}, c.queue || "—"),
        el("td", {}, c.agent || "—"), el("td", { "data-figure": "state" }, c.state + (c.held ? " (held)" : "")),
        el("td", {}, seconds(now - (c.since || now)))));
    document.getElementById("calls").replaceChildren(...rows);
    text(document.getElementById("call-count"), calls.size);
  }

  function renderAlerts() {
    const banner = document.getElementById("alerts");
    banner.textContent = [...alerts.values()].join(" · ");
    banner.classList.toggle("on", alerts.size > 0);
  }

  function onCallEvent(topic, d) {
    const id = d.call_id;
    if (!id) return;
    if (topic === "call.ended" || topic === "call.record") { calls.delete(id); return; }
    const call = calls.get(id) || { call_id: id, state: "ivr", since: d.at || Date.now() / 1000 };
    if (topic === "call.offered") Object.assign(call, { caller: d.caller, dialled: d.dialled, state: "ivr" });
    else if (topic === "queue.enter") Object.assign(call, { queue: d.queue, state: "queued", caller: call.caller || d.caller });
    else if (topic === "call.ringing") Object.assign(call, { agent: d.agent, queue: d.queue || call.queue, state: "ringing" });
    else if (topic === "queue.connect") Object.assign(call, { agent: d.agent, state: "connected", since: d.at || call.since });
    else if (topic === "call.hold") call.held = true;
    else if (topic === "call.resume") call.held = false;
    else if (topic === "queue.abandon" || topic === "queue.complete") { calls.delete(id); return; }
    else return;
    calls.set(id, call);
  }

  function renderLink(state) {
    const pill = document.getElementById("link");
    pill.textContent = "cloud: " + (state || "—");
    pill.className = "pill " + ({ online: "available", degraded: "paused", offline: "offline" }[state] || "");
  }

  async function loadLink() {
    try {
      const reply = await fetch("/health");
      renderLink((await reply.json()).link);
    } catch (e) {
      console.warn("link", e.message);
    }
  }

  function onEvent(msg) {
    const topic = msg.topic, d = msg.data || {};
    if (topic === "link.state") renderLink(d.state);
    if (topic.startsWith("call.") || topic.startsWith("queue.")) { onCallEvent(topic, d); renderCalls(); }
    if (topic === "alert" || topic.startsWith("alert.")) {
      const key = (d.rule || "") + "/" + (d.key || "");
      if (d.cleared_at || d.state === "cleared" || topic === "alert.cleared") alerts.delete(key);
      else alerts.set(key, d.message || d.rule || "alert");
      renderAlerts();
    }
    if (topic.startsWith("queue.") || topic.startsWith("agent.") || topic.startsWith("call.")) refresh();
    if (topic.startsWith("callback.")) loadCallbacks();
  }

  async function loadCalls() {
    try {
      const reply = await Edgecc.api("GET", "/api/calls");
      for (const c of reply.calls) calls.set(c.call_id, Object.assign(calls.get(c.call_id) || {}, c));
      renderCalls();
    } catch (e) {
      console.warn("calls", e.message);
    }
  }

  // Queued callbacks (/api/callbacks): refreshed on callback events; a supervisor withdraws
  // one with two clicks (Withdraw, Confirm); one being dialled cannot be (409, shown).
  const armed = new Set();        // callbacks whose Withdraw was clicked once
  async function loadCallbacks() {
    try {
      const reply = await Edgecc.api("GET", "/api/callbacks");
      for (const id of [...armed]) if (!reply.callbacks.some((c) => c.call_id === id)) armed.delete(id);
      const now = Date.now() / 1000;
      document.getElementById("callbacks").replaceChildren(...reply.callbacks.map((c) => {
        // The confirmation survives a refresh of the table (events may redraw it between
        // the two clicks).
        const withdraw = el("button", { type: "button", class: "secondary" }, armed.has(c.call_id) ? "Confirm withdraw" : "Withdraw");
        withdraw.addEventListener("click", async () => {
          if (!armed.has(c.call_id)) { armed.add(c.call_id); withdraw.textContent = "Confirm withdraw"; return; }
          armed.delete(c.call_id);
          const box = document.getElementById("callback-error");
          try {
            await Edgecc.api("DELETE", "/api/callbacks/" + encodeURIComponent(c.call_id));
            box.textContent = "";
          } catch (e) { box.textContent = e.message; }
          loadCallbacks();
        });
        return el("tr", { "data-callback": c.call_id, "data-state": c.state },
          el("td", {}, c.number), el("td", {}, c.queue), el("td", {}, c.position === null ? "—" : String(c.position)),
          el("td", {}, seconds(now - c.requested_at) + " ago"), el("td", {}, String(c.attempts)),
          el("td", {}, c.state.replace("callback-", "") + (c.agent ? " (" + c.agent + ")" : "")),
          el("td", {}, withdraw));
      }));
      text(document.getElementById("callback-count"), reply.callbacks.length);
    } catch (e) {
      console.warn("callbacks", e.message);  // 503: no call control here; the table stays empty
    }
  }

  async function loadAlerts() {
    try {
      const reply = await Edgecc.api("GET", "/api/alerts");
      alerts.clear();
      for (const a of reply.alerts) alerts.set(a.rule + "/" + a.key, a.message);
      renderAlerts();
    } catch (e) {
      console.warn("alerts", e.message);
    }
  }

  Edgecc.events(onEvent, (state) => {
    const live = document.getElementById("live");
    live.textContent = state === "live" ? "live" : "reconnecting";
    live.className = "pill " + (state === "live" ? "available" : "paused");
    if (state === "live") { refresh(); loadCalls(); loadAlerts(); loadLink(); loadCallbacks(); }
  });
  refresh();
  loadCalls();
  loadAlerts();
  loadCallbacks();
  loadLink();
  setInterval(sample, 1000);
  setInterval(renderCalls, 1000);
  setInterval(refresh, 15000);
  setInterval(loadCallbacks, 15000);
})();
