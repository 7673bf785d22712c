// crier's session webhook ([auth.webhook] in docs/authentication.md) in an
// Express 5 app with express-session: crier forwards the browser's
// `_myapp_session` cookie to POST /crier/session and the app answers who
// that is.
//   PORT=3000 EVENTS_URL=http://127.0.0.1:8080 node webhook-express.mjs
// (EVENTS_URL, not CRIER_*: crier reads every CRIER_* variable as its
// configuration and refuses one it does not know.)
// crier.toml:
//   [auth.webhook]
//   url = "http://127.0.0.1:3000/crier/session"
//   forward_cookies = ["_myapp_session"]
import express from "express";
import session from "express-session";

const PORT = Number(process.env.PORT ?? process.argv[2] ?? 3000);
const EVENTS_URL = process.env.EVENTS_URL ?? process.argv[3] ?? "http://127.0.0.1:8080";
const LOGIN_HOURS = 8;

// Stand-ins for your user database: who exists, and their teams (each
// `team:<name>` channel is granted to a `subscribe = "claim"` rule).
const TEAMS = { alice: ["red"], bob: ["blue"] };

const app = express();
app.use(express.json());
app.use(session({
  name: "_myapp_session",          // crier: forward_cookies = ["_myapp_session"]
  secret: process.env.SESSION_SECRET ?? "change me",
  resave: false,
  saveUninitialized: false,         // no cookie until a login
  // store: the default MemoryStore is for demos; use connect-redis or another store.
  cookie: { httpOnly: true, sameSite: "lax", maxAge: LOGIN_HOURS * 3600 * 1000 },
  // Behind HTTPS: cookie.secure = true (and app.set("trust proxy", 1) behind a proxy).
}));

// A stand-in for a real login form: POST {"user": "alice"}.
app.post("/login", (req, res, next) => {
  const user = String(req.body?.user ?? "");
  if (!Object.hasOwn(TEAMS, user)) return res.status(403).json({ error: "no such user" });
  req.session.regenerate((err) => {   // a new session id on login
    if (err) return next(err);
    req.session.user = user;
    // When this login ends, whatever crier's later checks do to the session.
    req.session.expiresAt = Math.floor(Date.now() / 1000) + LOGIN_HOURS * 3600;
    res.json({ user });
  });
});

// Destroying the session is what ends crier's connections: its next check
// (every `recheck`) gets 401 and closes them.
app.post("/logout", (req, res, next) => {
  req.session.destroy((err) => {
    if (err) return next(err);
    res.clearCookie("_myapp_session").json({ ok: true });
  });
});

// The webhook: crier sends the cookie, `X-Forwarded-For: <client ip>` and
// `X-Crier-Origin: <the page's origin>` (also in the JSON body).
app.post("/crier/session", (req, res) => {
  const { user, expiresAt } = req.session;
  console.log(`crier asked: user=${user ?? "-"} origin=${req.get("x-crier-origin") ?? "-"}`);
  if (!user || expiresAt <= Date.now() / 1000) return res.status(401).json({ error: "not logged in" });
  res.json({
    user,                                          // `user:{user}` rules
    channels: TEAMS[user].map((team) => `team:${team}`),
    expires_at: expiresAt,                         // Unix seconds
  });
});

// A page on the app's origin listening to crier on another one: the cookie
// goes along with `withCredentials` (crier: allowed_origins = [this origin]).
app.get("/", (req, res) => {
  res.type("html").send(`<!doctype html>
<meta charset="utf-8"><title>crier webhook demo</title>
<p><button id="login">Log in as alice</button> <button id="logout">Log out</button></p>
<pre id="log"></pre>
<script>
const CRIER = ${JSON.stringify(EVENTS_URL).replaceAll("<", "\\u003c")};
const demo = (window.demo = { sse: [], ws: [], close() {} });
const show = (transport, what) => {
  demo[transport].push(what);
  document.getElementById("log").textContent += transport + ": " + JSON.stringify(what) + "\\n";
};

async function login(user) {
  const r = await fetch("/login", { method: "POST", headers: { "content-type": "application/json" },
                                    body: JSON.stringify({ user }) });
  return r.ok;
}
const logout = () => fetch("/logout", { method: "POST" });

// Listens to one channel over both transports, showing what arrives.
function listen(channel) {
  demo.close();
  demo.sse = [];
  demo.ws = [];
  const es = new EventSource(CRIER + "/sse?channel=" + encodeURIComponent(channel),
                             { withCredentials: true });
  es.onopen = () => show("sse", { open: true });
  es.onmessage = (e) => show("sse", JSON.parse(e.data));
  es.addEventListener("expired", () => { show("sse", { expired: true }); es.close(); });
  // Refused (401/403): EventSource gives up, without a status to show.
  es.onerror = () => es.readyState === EventSource.CLOSED && show("sse", { refused: true });

  const ws = new WebSocket(CRIER.replace(/^http/, "ws") + "/ws");
  ws.onopen = () => ws.send(JSON.stringify({ type: "subscribe", channel, id: 1 }));
  ws.onmessage = (e) => show("ws", JSON.parse(e.data));
  ws.onclose = (e) => show("ws", { closed: e.code, reason: e.reason }); // 4001: logged out
  demo.close = () => { es.close(); ws.onclose = null; ws.close(); };
}

document.getElementById("login").onclick = async () => (await login("alice")) && listen("user:alice");
document.getElementById("logout").onclick = logout;
</script>
`);
});

const server = app.listen(PORT, "127.0.0.1", () => {
  console.log(`listening on ${server.address().port}`);
});
