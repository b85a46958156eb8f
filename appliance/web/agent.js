// The agent desk: the agent's state (log in, pause with a reason, unpause, log out) through
// /api/agents, the current call and its screen-pop data from the live events, and the call's
// disposition (/api/agents/{agent}/disposition); reasons and codes from /api/config/desk.
"use strict";

(() => {
  const s = Edgecc.requireRole("agent");
  if (!s) return;
  Edgecc.header(s);
  const { el } = Edgecc;
  const $ = (id) => document.getElementById(id);
  const agentInput = $("agent");
  agentInput.value = localStorage.getItem("edgecc.agent") || (/^[0-9]+$/.test(s.name) ? s.name : "");
  const offered = new Map();   // call_id -> call.offered data (caller, dialled, flow)
  let current = null;          // the agent's call: {call_id, caller, queue, state}
  let lastCall = null;
  const mine = new Set();      // ids of calls that named this agent (to reload when they end)

  function agent() { return agentInput.value.trim(); }

  function showState(view) {
    const state = $("state");
    const name = view && view.state ? view.state : "unknown";
    state.textContent = name;
    state.dataset.state = name;
    state.className = "pill " + name;
    // A call outside the queues (click-to-dial, outbound, a transfer to the agent) shows as
    // on-call with what it is; the pause reason (if paused meanwhile) stays visible.
    const notes = [];
    if (view && view.outside > 0) notes.push(view.outside > 1 ? view.outside + " outside calls" : "outside call");
    if (view && view.reason) notes.push(view.reason);
    $("reason").textContent = notes.length ? "(" + notes.join(", ") + ")" : "";
    state.dataset.outside = view && view.outside > 0 ? String(view.outside) : "0";
  }

  async function load() {
    if (!agent()) return;
    // A refresh leaves the message of the last click alone: the next click clears it.
    try { showState(await Edgecc.api("GET", "/api/agents/" + encodeURIComponent(agent()))); }
    catch (e) { $("error").textContent = e.message; }
  }

  async function options() {
    try {
      const o = await Edgecc.api("GET", "/api/config/desk");
      $("pause-reason").replaceChildren(...Object.entries(o.pause_reasons || {}).map(([code, name]) => el("option", { value: code }, name)));
      $("disposition").replaceChildren(...Object.entries(o.dispositions || {}).map(([code, name]) => el("option", { value: code }, name)));
    } catch (e) { /* the lists stay empty; the buttons say why when pressed */ }
  }

  async function act(action) {
    $("error").textContent = "";
    const body = action === "pause" ? { reason: $("pause-reason").value || null } : {};
    for (const b of document.querySelectorAll("[data-action]")) b.disabled = true;
    try {
      showState(await Edgecc.api("POST", "/api/agents/" + encodeURIComponent(agent()) + "/" + action, body));
    } catch (e) {
      $("error").textContent = e.message;
    } finally {
      for (const b of document.querySelectorAll("[data-action]")) b.disabled = false;
    }
  }

  function showCall() {
    const box = $("call"), pop = $("screen-pop");
    if (!current) { box.textContent = "No call."; box.className = "muted"; pop.replaceChildren(); return; }
    box.className = "";
    box.textContent = current.state + " — " + (current.caller || "unknown caller") + (current.queue ? " via " + current.queue : "");
    box.dataset.callId = current.call_id;
    const data = Object.assign({}, offered.get(current.call_id) || {}, current.pop || {});
    pop.replaceChildren(...Object.entries(data).filter(([k]) => k !== "at" && k !== "seq")
      .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, typeof v === "object" ? JSON.stringify(v) : v)]));
  }

  function onEvent(msg) {
    const d = msg.data || {}, topic = msg.topic;
    if (topic === "call.offered") { offered.set(d.call_id, d); if (offered.size > 500) offered.delete(offered.keys().next().value); }
    if (topic.startsWith("agent.") && d.agent === agent()) load();
    // Calls outside the queues (call.dialling of a click-to-dial, a transfer ringing the
    // agent) change the state shown too: reload on any call event naming the agent, and when
    // one of those calls ends.
    if (topic.startsWith("call.") && (d.agent === agent() || d.target === agent())) {
      mine.add(d.call_id);
      if (mine.size > 200) mine.delete(mine.values().next().value);
      load();
    } else if (topic === "call.ended" && mine.delete(d.call_id)) {
      load();
    }
    if ((topic === "call.ringing" || topic === "queue.connect") && d.agent === agent()) {
      const o = offered.get(d.call_id) || {};
      current = { call_id: d.call_id, caller: o.caller || d.caller, queue: d.queue, state: topic === "call.ringing" ? "ringing" : "on call" };
      lastCall = d.call_id;
      showCall();
      load();
    }
    if ((topic === "call.ended" || topic === "queue.complete" || topic === "queue.abandon") && current && d.call_id === current.call_id) {
      current = null;
      showCall();
      load();
    }
  }

  for (const b of document.querySelectorAll("[data-action]")) b.addEventListener("click", () => act(b.dataset.action));
  agentInput.addEventListener("change", () => { localStorage.setItem("edgecc.agent", agent()); load(); });
  $("do-disposition").addEventListener("click", async () => {
    const call = (current && current.call_id) || lastCall;
    if (!call) { $("disposition-result").textContent = "No call to record an outcome for."; return; }
    try {
      await Edgecc.api("POST", "/api/agents/" + encodeURIComponent(agent()) + "/disposition", { call_id: call, code: $("disposition").value });
      $("disposition-result").textContent = "Saved.";
    } catch (e) { $("disposition-result").textContent = e.message; }
  });
  Edgecc.events(onEvent, (state) => {
    $("live").textContent = state === "live" ? "live" : "reconnecting";
    $("live").className = "pill " + (state === "live" ? "available" : "paused");
  });
  options();
  Edgecc.api("GET", "/api/me").then((me) => {
    if (me.agent) { agentInput.value = me.agent; agentInput.readOnly = s.role === "agent"; }
    load();
  }, () => load());
})();
