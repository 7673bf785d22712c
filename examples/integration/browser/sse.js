// crier over Server-Sent Events: a plain EventSource, no library.
//
//   const stream = crierSSE("https://events.example.com/sse", ["orders:7", "user:42"], {
//     events: ["order.created"],        // event names to hear (a payload's "type")
//     message: (msg) => render(msg),    // {type:"message", channel, event?, id?, data}
//     refetch: (channel) => reload(channel), // messages were lost: reload that state
//     expiring: (inSecs) => {},         // optional: the session ends soon
//     expired: () => {},                // optional: the session ended
//     open: () => {}, reconnecting: ({ delay }) => {}, // optional: for a status line
//   });
//   stream.close();
//
// Resuming is automatic: when the stream drops, the browser reconnects by
// itself and sends the last cursor as Last-Event-ID; crier replays what the
// history channels missed and sends `gap` for the others. Only when crier
// refuses a reconnect (401 after a logout, 503 when overloaded...) does the
// browser give up; then this opens a new EventSource after a backoff, passing
// the cursor as ?last_event_id=.
window.crierSSE = function (url, channels, handlers) {
  const RESERVED = ["error", "open", "message", "gap", "expiring", "expired", "join", "leave"];
  const h = handlers;
  const query = channels.map((c) => "channel=" + encodeURIComponent(c)).join("&");
  let es = null, cursor = "", failures = 0, timer = null, stopped = false;

  const open = (reopening) => {
    const resume = cursor ? "&last_event_id=" + encodeURIComponent(cursor) : "";
    // withCredentials: send the session cookie to crier on another origin
    // (listed in its allowed_origins). Harmless on the same origin.
    const source = new EventSource(url + "?" + query + resume, { withCredentials: true });
    es = source;
    const on = (name, fn) => source.addEventListener(name, (e) => {
      if (e.lastEventId) cursor = e.lastEventId; // the stream's cursor so far
      fn(JSON.parse(e.data));
    });
    on("message", h.message);                   // payloads without a "type"
    // An event type the EventSource (or crier) uses itself comes as "app.<type>".
    for (const name of h.events || []) on(RESERVED.includes(name) ? "app." + name : name, h.message);
    on("gap", (gap) => h.refetch(gap.channel));
    on("expiring", (notice) => h.expiring && h.expiring(notice.in_secs));
    on("expired", () => h.expired && h.expired()); // the stream ends; the browser retries
    source.onopen = () => {
      failures = 0;
      // A new stream without a cursor cannot know what was missed.
      if (reopening && !resume) channels.forEach((c) => h.refetch(c));
      if (h.open) h.open();
    };
    source.onerror = () => {
      // CONNECTING: the stream dropped; the browser is reconnecting by itself.
      if (stopped || source.readyState !== EventSource.CLOSED) return;
      // CLOSED: crier refused the reconnect. After three refusals in a row,
      // drop the cursor too, in case it is what is refused (400).
      if (++failures >= 3) cursor = "";
      const delay = Math.min(30000, 500 * 2 ** failures) * (0.5 + Math.random() / 2);
      if (h.reconnecting) h.reconnecting({ delay });
      timer = setTimeout(() => open(true), delay);
    };
  };

  open(false);
  return { close() { stopped = true; clearTimeout(timer); es.close(); } };
};
