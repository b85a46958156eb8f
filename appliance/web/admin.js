// Admin: health, the queues, the agents and the queues they answer, and IVR flow checks.
"use strict";

(() => {
  const s = Edgecc.requireRole("admin");
  if (!s) return;
  Edgecc.header(s);
  const { el } = Edgecc;
  const $ = (id) => document.getElementById(id);

  async function health() {
    try {
      const h = await Edgecc.api("GET", "/health");
      const sip = Object.entries(h.sip).map(([t, a]) => t + " " + a.host + ":" + a.port).join(", ");
      $("health").textContent = "Site " + h.site + ": " + h.status + ", up " + Edgecc.seconds(h.uptime_s) + "; SIP " + sip + (h.trunk ? "; carrier trunk " + h.trunk : "");
      $("health").dataset.status = h.status;
    } catch (e) { $("health").textContent = "unreachable: " + e.message; $("health").dataset.status = "down"; }
  }

  async function site() {
    try {
      const c = await Edgecc.api("GET", "/api/config/site");
      $("queues").replaceChildren(...c.queues.map((q) => el("tr", { "data-queue": q.name },
        el("td", {}, q.name), el("td", {}, q.strategy), el("td", {}, q.members.join(", ") || "—"),
        el("td", {}, q.ring_timeout + " s"), el("td", {}, q.wrap_up + " s"),
        el("td", {}, q.max_wait === null ? "none" : q.max_wait + " s"), el("td", {}, q.record ? "yes" : "no"))));
      $("agents").replaceChildren(...c.agents.map((a) => el("tr", { "data-agent": a.user },
        el("td", {}, a.user), el("td", {}, a.display_name || "—"), el("td", {}, a.role),
        el("td", {}, a.queues.join(", ") || "—"))));
    } catch (e) { $("queues").replaceChildren(el("tr", {}, el("td", { class: "error" }, e.message))); }
  }

  $("flow-check").addEventListener("click", async () => {
    const file = $("flow-file").files[0];
    $("flow-problems").replaceChildren();
    if (!file) { $("flow-result").textContent = "Choose a file first."; return; }
    try {
      const r = await Edgecc.api("POST", "/api/config/flows/check", { yaml: await file.text() });
      $("flow-result").textContent = r.valid ? "Valid: flows " + r.flows.join(", ") + "." : r.problems.length + " problem(s):";
      $("flow-problems").replaceChildren(...r.problems.map((p) => el("li", {},
        (p.line ? "line " + p.line + ": " : "") + (p.flow ? "flow " + p.flow + " " : "") + (p.node ? "node " + p.node + ": " : "") + p.message)));
    } catch (e) { $("flow-result").textContent = e.message; }
  });

  health();
  site();
  setInterval(health, 10000);
})();
