// crier over WebSocket, no library: subscribes, resumes with `since` after a
// reconnect, refetches on `gap`, refreshes its token on `expiring`, and
// reconnects with backoff and jitter (or when a draining instance says).
//
//   const conn = crierWS("wss://events.example.com/ws", ["orders:7", "user:42"], {
//     message: (msg) => render(msg),        // {type:"message", channel, event?, id?, data}
//     refetch: (channel) => reload(channel), // messages were lost: reload that state
//     token: () => fetchToken(),  // optional: a Promise of a JWT, sent as `auth` after
//                                 // connecting and again on `expiring`; without it the
//                                 // session cookie sent with the upgrade identifies the user
//     expired: () => {},          // optional: the credential ended (close 4001)
//     frame: (msg) => {},         // optional: sees every frame (logging)
//     reconnecting: ({ code, delay }) => {}, // optional: for a status line
//   });
//   conn.close();
window.crierWS = function (url, channels, handlers) {
  const h = handlers;
  const last = new Map();      // channel -> last message id seen, or `subscribed` position
  const LOGIN = "auth login", REFRESH = "auth refresh"; // ids no channel name can have
  let ws = null, failures = 0, reconnected = false, stopped = false, timer = null;
  const send = (msg) => ws.readyState === WebSocket.OPEN && ws.send(JSON.stringify(msg));

  const subscribeAll = () => channels.forEach((channel) => {
    const since = last.get(channel);
    // After a reconnect, a channel without a position (no history) cannot be
    // resumed: whatever was published meanwhile is lost.
    if (reconnected && !since) h.refetch(channel);
    send(since ? { type: "subscribe", channel, since, id: channel } : { type: "subscribe", channel, id: channel });
  });
  const authenticate = (id) => Promise.resolve(h.token())
    .then((token) => send({ type: "auth", token, id }))
    .catch((e) => { console.warn("crier: no token:", e); if (id === LOGIN) subscribeAll(); });

  const connect = () => {
    const socket = new WebSocket(url); // the browser sends the app's cookies with it
    ws = socket;
    let drainDelay = null;
    socket.onmessage = (e) => {
      const msg = JSON.parse(e.data);
      if (h.frame) h.frame(msg);
      switch (msg.type) {
        case "welcome":
          failures = 0;
          if (h.token) authenticate(LOGIN); else subscribeAll();
          break;
        case "authenticated":
          if (msg.id === LOGIN) subscribeAll();
          break;
        case "subscribed":
          // Start from the position unless the messages after `since` follow.
          if (msg.position && msg.recovered !== true) last.set(msg.channel, msg.position);
          break;
        case "message":
          if (msg.id) last.set(msg.channel, msg.id);
          h.message(msg);
          break;
        case "gap":                                  // messages were lost
          h.refetch(msg.channel);
          break;
        case "expiring":                             // the credential ends soon
          if (h.token) authenticate(REFRESH);
          break;
        case "reconnect":                            // this instance is draining
          drainDelay = msg.after_ms;
          break;
        case "error":
          console.warn("crier:", msg.code, msg.reason, msg.id ?? "");
          if (msg.id === LOGIN) subscribeAll();      // carry on with the cookie's identity
          break;
      }
    };
    socket.onclose = (e) => {
      if (stopped) return;
      reconnected = true;
      let delay;
      if (e.code === 4001) {                         // credential expired or logged out
        if (h.expired) h.expired();
        if (!h.token) return;                        // a cookie session is over: sign in again
        delay = 0;                                   // reconnect with a fresh token
      } else if (drainDelay !== null) {
        delay = drainDelay;                          // 1012: as the instance asked
      } else {                                       // 1006 network, 1013 too slow, 1001 idle...
        delay = Math.min(30000, 500 * 2 ** failures++) * (0.5 + Math.random() / 2);
      }
      if (h.reconnecting) h.reconnecting({ code: e.code, delay });
      timer = setTimeout(connect, delay);
    };
  };

  connect();
  return { close() { stopped = true; clearTimeout(timer); ws.close(); } };
};
