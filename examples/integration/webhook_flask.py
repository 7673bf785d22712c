"""crier's session webhook ([auth.webhook] in docs/authentication.md) in a
Flask app with Flask's own signed-cookie session: crier forwards the
browser's `_myapp_session` cookie to POST /crier/session and the app answers
who that is.

    PORT=5000 python3 webhook_flask.py

crier.toml:

    [auth.webhook]
    url = "http://127.0.0.1:5000/crier/session"
    forward_cookies = ["_myapp_session"]
"""

import os
import secrets
import sys
import time

from flask import Flask, jsonify, request, session
from werkzeug.serving import make_server

LOGIN_SECONDS = 8 * 3600

# Stand-ins for your user database: who exists, and their teams (each
# `team:<name>` channel is granted to a `subscribe = "claim"` rule).
TEAMS = {"alice": ["red"], "bob": ["blue"]}

# Flask's session lives in the cookie itself: logging out deletes the
# browser's copy, but any other copy (crier holds one per open connection)
# stays valid. So the app keeps its live logins on the server (your database
# or Redis in production; a dict here) and logout removes the record: crier's
# next check (every `recheck`) gets 401 and closes the connections.
LOGINS = {}  # login id -> (user, expires_at)

app = Flask(__name__)
app.config.update(
    SECRET_KEY=os.environ.get("SECRET_KEY", "change me"),
    SESSION_COOKIE_NAME="_myapp_session",  # crier: forward_cookies = ["_myapp_session"]
    SESSION_COOKIE_HTTPONLY=True,
    SESSION_COOKIE_SAMESITE="Lax",
    # Behind HTTPS: SESSION_COOKIE_SECURE=True.
)


@app.post("/login")
def login():
    """A stand-in for a real login form: POST user=alice."""
    user = request.form.get("user", "")
    if user not in TEAMS:
        return jsonify(error="no such user"), 403
    login_id = secrets.token_urlsafe(32)
    LOGINS[login_id] = (user, int(time.time()) + LOGIN_SECONDS)
    session.clear()
    session["login"] = login_id
    return jsonify(user=user)


@app.post("/logout")
def logout():
    LOGINS.pop(session.pop("login", None), None)
    return jsonify(ok=True)


@app.post("/crier/session")
def crier_session():
    """The webhook: crier sends the cookie, `X-Forwarded-For: <client ip>` and
    `X-Crier-Origin: <the page's origin>` (also in the JSON body)."""
    user, expires_at = LOGINS.get(session.get("login"), (None, 0))
    if user is None or expires_at <= time.time():
        return jsonify(error="not logged in"), 401
    return jsonify(
        user=user,  # `user:{user}` rules
        channels=[f"team:{team}" for team in TEAMS[user]],
        expires_at=expires_at,  # Unix seconds
    )


if __name__ == "__main__":
    # Werkzeug's server, threaded (crier may ask several things at once);
    # in production run the app under gunicorn or uWSGI instead.
    port = int(os.environ.get("PORT", sys.argv[1] if len(sys.argv) > 1 else 5000))
    server = make_server("127.0.0.1", port, app, threaded=True)
    print(f"listening on {server.server_port}", flush=True)
    server.serve_forever()
