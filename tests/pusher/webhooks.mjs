// A Pusher app's webhook endpoint, as an app writes it with the
// unmodified `pusher` server SDK: every request is checked with
// `pusher.webhook({ headers, rawBody }).isValid()` under the app's secret
// (and, to show the check can fail, under a wrong one). Prints one JSON
// line per request, after one with the port it listens on. Answers with
// STATUS (200 unless set), or with the status last written to its stdin
// (503: the app is down). Driven by tests/events.rs.
import http from 'node:http';
import readline from 'node:readline';
import Pusher from 'pusher';

const { APP_ID: appId, KEY: key, SECRET: secret } = process.env;
let status = Number(process.env.STATUS || 200);
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  status = Number(line.trim());
  console.log(JSON.stringify({ status }));
});
const right = new Pusher({ appId, key, secret });
const wrong = new Pusher({ appId, key, secret: 'not-the-app-secret-at-all' });

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const rawBody = Buffer.concat(chunks).toString('utf8');
    const webhook = right.webhook({ headers: req.headers, rawBody });
    const valid = webhook.isValid();
    const invalidWithWrongSecret = !wrong.webhook({ headers: req.headers, rawBody }).isValid();
    console.log(JSON.stringify({
      answered: status,
      valid,
      invalidWithWrongSecret,
      events: valid ? webhook.getEvents() : JSON.parse(rawBody).events,
      time_ms: valid ? webhook.getTime().getTime() : null,
    }));
    res.writeHead(status);
    res.end();
  });
});
server.listen(Number(process.env.PORT || 0), '127.0.0.1', () => {
  console.log(JSON.stringify({ port: server.address().port }));
});
