// The express-session recipe of docs/authentication.md, runnable: an app
// whose logged-in users crier recognises by their session cookie.
//   REDIS_URL=redis://127.0.0.1:6379 PORT=3000 node session-app.mjs
// GET /login logs in user 42 (a stand-in for a real login form).
import express from "express";
import session from "express-session";
import { RedisStore } from "connect-redis"; // connect-redis >= 8: a named export
import { createClient } from "redis";
import passport from "passport";

const redis = createClient({ url: process.env.REDIS_URL ?? "redis://sessions:6379" });
await redis.connect();

const app = express();
app.set("trust proxy", 1); // behind the proxy that ends TLS: secure cookies
app.use(session({
  store: new RedisStore({ client: redis, prefix: "sess:" }), // crier: key = "sess:{id}"
  secret: ["keyboard cat"],        // crier: secrets = ["keyboard cat"]
  resave: false,
  saveUninitialized: false,
  cookie: { httpOnly: true, secure: true, sameSite: "lax",
            domain: ".example.com", maxAge: 24 * 3600 * 1000 },
}));
app.use(passport.initialize());
app.use(passport.session());
passport.serializeUser((user, done) => done(null, user.id)); // -> req.session.passport.user
passport.deserializeUser((id, done) => done(null, { id }));

app.get("/login", (req, res, next) => {
  req.login({ id: 42 }, (err) => (err ? next(err) : res.send("logged in as 42\n")));
});

const server = app.listen(Number(process.env.PORT ?? 3000), "127.0.0.1", () => {
  console.log(`listening on ${server.address().port}`);
});
