// The login page: name, password and (admins, supervisors) the TOTP code.
"use strict";

(() => {
  const form = document.getElementById("login");
  const field = (id) => document.getElementById(id);
  const error = document.getElementById("error");
  const existing = Edgecc.session();
  if (existing && existing.expires_at * 1000 > Date.now()) location.replace(Edgecc.home(existing.role));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    const body = { name: field("name").value.trim(), password: field("password").value };
    const code = field("totp").value.trim();
    if (code) body.totp = code;
    document.getElementById("submit").disabled = true;
    try {
      const reply = await Edgecc.api("POST", "/api/login", body);
      Edgecc.save({ token: reply.token, name: reply.name, role: reply.role, expires_at: reply.expires_at });
      location.replace(Edgecc.home(reply.role));
    } catch (e) {
      error.textContent = e.message;
      field("password").value = "";
      field("totp").value = "";
    } finally {
      document.getElementById("submit").disabled = false;
    }
  });
})();
