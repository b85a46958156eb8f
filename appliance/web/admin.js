// Admin: health, and the site's queues, agents, skills and IVR flows, changed through
// /api/config (each change a new config version, sent with If-Match so two admins never
// overwrite each other). Refusals are shown next to the form, the field at fault marked.
"use strict";

(() => {
  const s = Edgecc.requireRole("admin");
  if (!s) return;
  Edgecc.header(s);
  const { el } = Edgecc;
  const $ = (id) => document.getElementById(id);
  let version = null;   // the installed config version the lists were read at (the ETag)
  let running = null;

  // A change with If-Match; the answer, or an ApiFailure carrying status, message and field.
  async function change(method, path, body) {
    const session = Edgecc.session();
    const headers = { "If-Match": '"' + version + '"' };
    if (session) headers.Authorization = "Bearer " + session.token;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const reply = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const data = await reply.json().catch(() => null);
    if (reply.status === 401) { Edgecc.forget(); location.replace("index.html"); }
    if (!reply.ok) throw new Edgecc.ApiFailure(reply.status, (data && data.error) || reply.statusText, data && data.field);
    version = data.version;
    showVersion();
    $("config-status").textContent = "Saved as version " + data.version + ". The appliance loads it as soon as no call is up.";
    return data;
  }

  function showVersion() {
    $("config-version").textContent = "Config version " + version + (running === null || running === version ? "" : " (running " + running + "; the new one loads when no call is up)");
    $("config-version").dataset.version = version;
  }

  // Show a refusal in `box` and mark the form's input for its field.
  function refused(form, box, e) {
    for (const input of form.querySelectorAll("[data-field]")) { input.removeAttribute("aria-invalid"); input.style.borderColor = ""; }
    box.textContent = e.message;
    box.dataset.status = e.status || "";
    const field = (e.field || "").split(/[.[]/)[0];
    const input = field && form.querySelector('[data-field="' + field + '"]');
    if (input) { input.setAttribute("aria-invalid", "true"); input.style.borderColor = "var(--bad)"; }
    if (e.status === 412) load();  // someone else changed the config: show theirs
  }

  function list(text) { return text.split(",").map((v) => v.trim()).filter(Boolean); }

  // "french:5, billing:3" -> {french: 5, billing: 3}; a bad level is sent as is for the API to name.
  function levels(text) {
    const out = {};
    for (const item of list(text)) {
      const [name, level] = item.split(":").map((v) => v.trim());
      out[name] = /^\d+$/.test(level || "") ? Number(level) : level;
    }
    return out;
  }

  function showLevels(map) { return Object.entries(map || {}).map(([k, v]) => k + ":" + v).join(", "); }

  function number(text) { return text.trim() === "" ? null : Number(text); }

  function recordValue(text) {
    const t = text.trim().toLowerCase();
    if (t === "yes" || t === "true") return true;
    if (t === "no" || t === "false") return false;
    return /^\d+$/.test(t) ? Number(t) : t;
  }

  function confirmButton(label, action) {
    const button = el("button", { type: "button", class: "secondary" }, label);
    button.addEventListener("click", async () => {
      if (button.dataset.armed !== "1") { button.dataset.armed = "1"; button.textContent = "Confirm " + label.toLowerCase(); return; }
      await action();
    });
    return button;
  }

  async function health() {
    try {
      const h = await Edgecc.api("GET", "/health");
      const sip = Object.entries(h.sip).map(([t, a]) => t + " " + a.host + ":" + a.port).join(", ");
      $("health").textContent = "Site " + h.site + ": " + h.status + ", up " + Edgecc.seconds(h.uptime_s) + "; SIP " + sip + (h.trunk ? "; carrier trunk " + h.trunk : "");
      $("health").dataset.status = h.status;
      running = h.config_version;
      if (version !== null) showVersion();
    } catch (e) { $("health").textContent = "unreachable: " + e.message; $("health").dataset.status = "down"; }
  }

  // ------------------------------------------------------------------ queues

  // "30:1, 60:0:french+billing" -> [{after: 30, lower_by: 1}, {after: 60, lower_by: 0, drop: ["french", "billing"]}];
  // what does not parse is sent as is, for the API to name.
  function relaxSteps(text) {
    return list(text).map((item) => {
      const [after, lower, drop] = item.split(":").map((v) => v.trim());
      const step = { after: /^\d+(\.\d+)?$/.test(after) ? Number(after) : after };
      if (lower !== undefined && lower !== "") step.lower_by = /^\d+$/.test(lower) ? Number(lower) : lower;
      if (drop) step.drop = drop.split("+").map((v) => v.trim()).filter(Boolean);
      return step;
    });
  }

  function showRelax(steps) {
    return (steps || []).map((r) => r.after + ":" + (r.lower_by || 0) + (r.drop && r.drop.length ? ":" + r.drop.join("+") : "")).join(", ");
  }

  function showOverflow(q) {
    const when = [];
    if (q.max_length !== null && q.max_length !== undefined) when.push("over " + q.max_length + " waiting");
    if (q.max_estimated_wait !== null && q.max_estimated_wait !== undefined) when.push("est. wait over " + q.max_estimated_wait + " s");
    if (q.join_empty && q.join_empty !== "never") when.push("join " + q.join_empty);
    if (q.leave_empty && q.leave_empty !== "never") when.push("leave " + q.leave_empty);
    if (!when.length) return "—";
    return when.join(", ") + " → " + (q.overflow || "end");
  }

  let editing = null;  // the queue being replaced, as read: keys the form has no input for are kept

  function editQueue(q) {
    const form = $("queue-form");
    form.dataset.mode = "replace";
    editing = q;
    $("queue-title").textContent = "Queue " + q.name;
    $("q-name").value = q.name; $("q-name").readOnly = true;
    $("q-strategy").value = q.strategy;
    $("q-members").value = q.members.join(", ");
    $("q-ring").value = q.ring_timeout; $("q-wrap").value = q.wrap_up;
    $("q-max-wait").value = q.max_wait === null ? "" : q.max_wait;
    $("q-record").value = q.record === true ? "yes" : q.record === false ? "no" : q.record;
    $("q-skills").value = showLevels(q.required_skills);
    $("q-relax").value = showRelax(q.relax);
    $("q-penalties").value = showLevels(q.penalties);
    $("q-weights").value = showLevels(q.weights);
    $("q-max-length").value = q.max_length === null || q.max_length === undefined ? "" : q.max_length;
    $("q-max-est-wait").value = q.max_estimated_wait === null || q.max_estimated_wait === undefined ? "" : q.max_estimated_wait;
    $("q-join-empty").value = q.join_empty || "never";
    $("q-leave-empty").value = q.leave_empty || "never";
    $("q-overflow").value = q.overflow || "";
    $("q-rejoin").value = q.rejoin_window || 0;
    $("queue-error").textContent = "";
  }

  function newQueue() {
    const form = $("queue-form");
    form.reset();
    form.dataset.mode = "create";
    editing = null;
    $("q-name").readOnly = false;
    $("queue-title").textContent = "New queue";
  }

  $("queue-new").addEventListener("click", newQueue);
  $("queue-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = $("queue-form");
    const body = Object.assign({}, form.dataset.mode === "create" ? {} : editing || {}, {
      name: $("q-name").value.trim(), strategy: $("q-strategy").value, members: list($("q-members").value),
      ring_timeout: number($("q-ring").value), wrap_up: number($("q-wrap").value), max_wait: number($("q-max-wait").value),
      record: recordValue($("q-record").value), required_skills: levels($("q-skills").value),
      relax: relaxSteps($("q-relax").value), penalties: levels($("q-penalties").value), weights: levels($("q-weights").value),
      max_length: number($("q-max-length").value), max_estimated_wait: number($("q-max-est-wait").value),
      join_empty: $("q-join-empty").value, leave_empty: $("q-leave-empty").value,
      overflow: $("q-overflow").value.trim() || null, rejoin_window: number($("q-rejoin").value) ?? 0 });
    try {
      if (form.dataset.mode === "create") await change("POST", "/api/config/queues", body);
      else await change("PUT", "/api/config/queues/" + encodeURIComponent(body.name), body);
      $("queue-error").textContent = "";
      newQueue();
      await load();
    } catch (e) { refused(form, $("queue-error"), e); }
  });

  // ------------------------------------------------------------------ agents

  function editAgent(a) {
    const form = $("agent-form");
    form.dataset.mode = "replace";
    $("agent-title").textContent = "Agent " + a.user;
    $("a-user").value = a.user; $("a-user").readOnly = true;
    $("a-name").value = a.display_name || ""; $("a-role").value = a.role;
    $("a-queues").value = a.queues.join(", "); $("a-skills").value = showLevels(a.skills);
    $("a-password").value = "";
    $("agent-error").textContent = "";
  }

  function newAgent() {
    const form = $("agent-form");
    form.reset();
    form.dataset.mode = "create";
    $("a-user").readOnly = false;
    $("agent-title").textContent = "New agent";
  }

  $("agent-new").addEventListener("click", newAgent);
  $("agent-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = $("agent-form");
    const user = $("a-user").value.trim(), password = $("a-password").value;
    const body = { display_name: $("a-name").value.trim() || null, role: $("a-role").value,
      skills: levels($("a-skills").value), queues: list($("a-queues").value) };
    try {
      if (form.dataset.mode === "create") {
        await change("POST", "/api/config/agents", Object.assign({ user, password }, body));
      } else {
        await change("PUT", "/api/config/agents/" + encodeURIComponent(user), body);
        if (password) await change("POST", "/api/config/agents/" + encodeURIComponent(user) + "/password", { password });
      }
      $("agent-error").textContent = "";
      newAgent();
      await load();
    } catch (e) { refused(form, $("agent-error"), e); }
    finally { $("a-password").value = ""; }  // never kept in the page
  });

  // ------------------------------------------------------------------ skills

  $("skill-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await change("POST", "/api/config/skills", { name: $("s-name").value.trim(), description: $("s-description").value.trim() || null });
      $("skill-error").textContent = "";
      $("skill-form").reset();
      await load();
    } catch (e) { refused($("skill-form"), $("skill-error"), e); }
  });

  // ------------------------------------------------------------------ lists

  function remover(path, box, form) {
    return async () => {
      try { await change("DELETE", path); box.textContent = ""; await load(); }
      catch (e) { refused(form, box, e); }
    };
  }

  async function load() {
    try {
      const [queues, agents, skills, flows] = await Promise.all(["queues", "agents", "skills", "flows"].map(
        (what) => Edgecc.api("GET", "/api/config/" + what)));
      version = Math.min(queues.version, agents.version, skills.version, flows.version);
      showVersion();
      $("queues").replaceChildren(...queues.queues.map((q) => {
        const edit = el("button", { type: "button", class: "secondary" }, "Edit");
        edit.addEventListener("click", () => editQueue(q));
        return el("tr", { "data-queue": q.name },
          el("td", {}, q.name), el("td", {}, q.strategy), el("td", {}, q.members.join(", ") || "—"),
          el("td", {}, q.ring_timeout + " s"), el("td", {}, q.wrap_up + " s"),
          el("td", {}, q.max_wait === null ? "none" : q.max_wait + " s"),
          el("td", {}, q.record === true ? "yes" : q.record === false ? "no" : q.record + " %"),
          el("td", {}, showLevels(q.required_skills) || "—"), el("td", {}, showOverflow(q)),
          el("td", {}, edit, " ", confirmButton("Delete", remover("/api/config/queues/" + encodeURIComponent(q.name), $("queue-error"), $("queue-form")))));
      }));
      $("agents").replaceChildren(...agents.agents.map((a) => {
        const edit = el("button", { type: "button", class: "secondary" }, "Edit");
        edit.addEventListener("click", () => editAgent(a));
        return el("tr", { "data-agent": a.user },
          el("td", {}, a.user), el("td", {}, a.display_name || "—"), el("td", {}, a.role),
          el("td", {}, a.queues.join(", ") || "—"), el("td", {}, showLevels(a.skills) || "—"),
          el("td", {}, edit, " ", confirmButton("Delete", remover("/api/config/agents/" + encodeURIComponent(a.user), $("agent-error"), $("agent-form")))));
      }));
      $("skills").replaceChildren(...skills.skills.map((k) => el("tr", { "data-skill": k.name },
        el("td", {}, k.name), el("td", {}, k.description || "—"), el("td", {}, showLevels(k.agents) || "—"),
        el("td", {}, showLevels(k.queues) || "—"),
        el("td", {}, confirmButton("Delete", remover("/api/config/skills/" + encodeURIComponent(k.name), $("skill-error"), $("skill-form")))))));
      $("flow-list").textContent = flows.flows.join(", ") || "none";
    } catch (e) { $("queues").replaceChildren(el("tr", {}, el("td", { class: "error" }, e.message))); }
  }

  // ------------------------------------------------------------------ IVR flows

  async function flowText() {
    const file = $("flow-file").files[0];
    $("flow-problems").replaceChildren();
    if (!file) { $("flow-result").textContent = "Choose a file first."; return null; }
    return file.text();
  }

  $("flow-check").addEventListener("click", async () => {
    const text = await flowText();
    if (text === null) return;
    try {
      const r = await Edgecc.api("POST", "/api/config/flows/check", { yaml: text });
      $("flow-result").textContent = r.valid ? "Valid: flows " + r.flows.join(", ") + "." : r.problems.length + " problem(s):";
      $("flow-problems").replaceChildren(...r.problems.map((p) => el("li", {},
        (p.line ? "line " + p.line + ": " : "") + (p.flow ? "flow " + p.flow + " " : "") + (p.node ? "node " + p.node + ": " : "") + p.message)));
    } catch (e) { $("flow-result").textContent = e.message; }
  });

  $("flow-install").addEventListener("click", async () => {
    const text = await flowText();
    if (text === null) return;
    try {
      const r = await change("PUT", "/api/config/flows", { yaml: text });
      $("flow-result").textContent = "Installed flows " + r.flows.join(", ") + " as version " + r.version + ".";
      await load();
    } catch (e) {
      // Every problem of the file, each with its line and key.
      $("flow-result").textContent = "Not installed:";
      $("flow-problems").replaceChildren(...e.message.split("; ").map((m) => el("li", {}, m)));
      if (e.status === 412) load();
    }
  });

  health();
  load();
  setInterval(health, 10000);
})();
