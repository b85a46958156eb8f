// Shared by every page: the session token, API calls in the API's error shape, the live
// event stream (/api/events) with bounded reconnects, and the page header.
"use strict";

const Edgecc = (() => {
  const KEY = "edgecc.session";
  const RANK = { agent: 1, supervisor: 2, admin: 3 };

  function session() {
    try { return JSON.parse(sessionStorage.getItem(KEY) || "null"); } catch (e) { return null; }
  }

  function save(value) { sessionStorage.setItem(KEY, JSON.stringify(value)); }

  function forget() { sessionStorage.removeItem(KEY); }

  class ApiFailure extends Error {
    constructor(status, message, field) { super(message); this.status = status; this.field = field; }
  }

  async function api(method, path, body) {
    const s = session();
    const headers = {};
    if (s) headers.Authorization = "Bearer " + s.token;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const reply = await fetch(path, { method, headers,
      body: body === undefined ? undefined : JSON.stringify(body) });
    if (reply.status === 401 && s) { forget(); location.replace("index.html"); }
    if (reply.status === 204) return null;
    const type = reply.headers.get("content-type") || "";
    const data = type.includes("json") ? await reply.json() : await reply.blob();
    if (!reply.ok) throw new ApiFailure(reply.status, (data && data.error) || reply.statusText,
                                        data && data.field);
    return data;
  }

  // The page for a role after login.
  function home(role) { return role === "agent" ? "agent.html" : "wallboard.html"; }

  // Stay on this page only with a session whose role reaches `lowest`.
  function requireRole(lowest) {
    const s = session();
    if (!s || s.expires_at * 1000 < Date.now()) { forget(); location.replace("index.html"); return null; }
    if (RANK[s.role] < RANK[lowest]) { location.replace(home(s.role)); return null; }
    return s;
  }

  function header(s) {
    const who = document.getElementById("who");
    if (who) who.textContent = s.name + " (" + s.role + ")";
    const out = document.getElementById("logout");
    if (out) out.addEventListener("click", async () => {
      try { await api("POST", "/api/logout"); } catch (e) { /* the session ends anyway */ }
      forget();
      location.replace("index.html");
    });
    for (const link of document.querySelectorAll("[data-role]")) {
      link.hidden = RANK[s.role] < RANK[link.dataset.role];
    }
  }

  // Live events: calls onEvent(message) for each hub event, onState("live"|"down").
  // Reconnects after 1, 2, 4 ... 30 s; a "bye" because the token ended goes to the login page.
  function events(onEvent, onState) {
    let delay = 1000;
    let socket = null;
    function connect() {
      const s = session();
      if (!s) return;
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      socket = new WebSocket(scheme + "//" + location.host + "/api/events");
      socket.addEventListener("open", () => socket.send(JSON.stringify({ token: s.token })));
      socket.addEventListener("message", (m) => {
        let msg;
        try { msg = JSON.parse(m.data); } catch (e) { return; }
        if (msg.type === "hello") { delay = 1000; onState("live"); }
        else if (msg.type === "event") onEvent(msg);
        else if (msg.type === "bye" && /token/.test(msg.reason || "")) {
          forget(); location.replace("index.html");
        }
      });
      socket.addEventListener("close", () => {
        onState("down");
        setTimeout(connect, delay);
        delay = Math.min(delay * 2, 30000);
      });
    }
    connect();
    return () => socket && socket.close();
  }

  function text(el, value) { el.textContent = value === null || value === undefined ? "—" : String(value); }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  function seconds(s) {
    s = Math.max(0, Math.round(s || 0));
    return Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
  }

  return { api, session, save, forget, home, requireRole, header, events, text, el, seconds, ApiFailure };
})();
