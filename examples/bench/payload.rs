//! Realistic JSON events for `--payload-json`: what apps publish to crier,
//! different every time, so that compression is measured on data like
//! theirs rather than on padding.
//!
//! Three kinds, in turn (or one, with `--json-kind`):
//! - `order`: an order record on a status change; products come from a
//!   catalogue, so a product's SKU and price are the catalogue's, and ids,
//!   quantities, customers and times vary;
//! - `log`: a batch of lines from a remote shell installing packages (the
//!   install-log stream crier was built for), with versions, sizes and
//!   timestamps that vary;
//! - `status`: a server's health report: load, memory, disks and services
//!   with figures that vary.
//!
//! Every message starts with `{"t":MICROS,"n":N,` so the clients can
//! measure latency and order whatever the kind.

/// Which events `--payload-json` publishes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// The three kinds in turn.
    Mix,
    Order,
    Log,
    Status,
}

impl Kind {
    pub fn parse(text: &str) -> Option<Kind> {
        Some(match text {
            "mix" => Kind::Mix,
            "order" => Kind::Order,
            "log" => Kind::Log,
            "status" => Kind::Status,
            _ => return None,
        })
    }
}

/// A JSON event of about `size` bytes (at least one line, item or service):
/// message `n` of `channel`, sent at `t` µs.
pub fn event(kind: Kind, t: u64, n: usize, channel: usize, size: usize) -> String {
    let mut rng = Rng::new(n, channel);
    let kind = match kind {
        Kind::Mix => [Kind::Order, Kind::Log, Kind::Status][(n + channel) % 3],
        one => one,
    };
    match kind {
        Kind::Order | Kind::Mix => order(&mut rng, t, n, size),
        Kind::Log => log(&mut rng, t, n, channel, size),
        Kind::Status => status(&mut rng, t, n, channel, size),
    }
}

/// xorshift64: the same events for the same `n` and channel in every run.
struct Rng(u64);

impl Rng {
    fn new(n: usize, channel: usize) -> Rng {
        Rng((n as u64 + 1)
            .wrapping_mul(6364136223846793005)
            .wrapping_add(channel as u64 * 1442695040888963407)
            | 1)
    }

    fn below(&mut self, m: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % m
    }

    fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.below(from.len() as u64) as usize]
    }
}

fn order(rng: &mut Rng, t: u64, n: usize, size: usize) -> String {
    /// (SKU, name, unit price in cents)
    const CATALOGUE: [(&str, &str, u64); 8] = [
        ("CB-1000-ESP", "Espresso beans 1kg", 2450),
        ("GR-0058-BUR", "Burr grinder", 18900),
        ("JG-0600-MLK", "Milk jug 600ml", 1890),
        ("FL-0100-PPR", "Paper filters (100)", 495),
        ("TM-0058-STL", "Tamper 58mm", 3400),
        ("CL-0020-TAB", "Cleaning tablets", 1299),
        ("SC-0002-DIG", "Digital scale 0.1g", 4590),
        ("KT-0900-GOO", "Gooseneck kettle 0.9l", 7900),
    ];
    const NAMES: [&str; 8] = [
        "Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken", "Radia", "Linus",
    ];
    const STATUS: [&str; 5] = ["paid", "packed", "shipped", "out_for_delivery", "delivered"];
    let mut items = Vec::new();
    let mut total = 0;
    while items.iter().map(String::len).sum::<usize>() + 380 < size || items.is_empty() {
        let (sku, name, price) = rng.pick(&CATALOGUE);
        let qty = 1 + rng.below(4);
        total += qty * price;
        items.push(format!(
            r#"{{"sku":"{sku}","name":"{name}","qty":{qty},"unit_price":{}.{:02},"warehouse":"eu-west-{}"}}"#,
            price / 100,
            price % 100,
            1 + rng.below(3)
        ));
    }
    let name = rng.pick(&NAMES);
    format!(
        r#"{{"t":{t},"n":{n},"type":"order.updated","order":{{"id":"ord_{:012x}","status":"{}","customer":{{"id":"cus_{:08x}","name":"{name}","email":"{}@example.com","tier":"{}"}},"items":[{}],"currency":"EUR","total":{}.{:02},"shipping":{{"carrier":"{}","tracking":"{:010}"}},"updated_at":"2026-12-07T{:02}:{:02}:{:02}Z"}}}}"#,
        rng.below(1 << 48),
        rng.pick(&STATUS),
        rng.below(1 << 32),
        name.to_lowercase(),
        rng.pick(&["standard", "gold", "platinum"]),
        items.join(","),
        total / 100,
        total % 100,
        rng.pick(&["DHL", "UPS", "DPD", "PostNL"]),
        rng.below(10_000_000_000),
        rng.below(24),
        rng.below(60),
        rng.below(60),
    )
}

fn log(rng: &mut Rng, t: u64, n: usize, channel: usize, size: usize) -> String {
    const PACKAGES: [&str; 10] = [
        "libssl3",
        "ca-certificates",
        "libpq5",
        "postgresql-client-15",
        "nginx-common",
        "libnginx-mod-http-geoip2",
        "python3-minimal",
        "libpython3.11-stdlib",
        "git-man",
        "liberror-perl",
    ];
    let mut lines = Vec::new();
    let mut second = rng.below(60);
    while lines.iter().map(String::len).sum::<usize>() + 150 < size || lines.is_empty() {
        let package = rng.pick(&PACKAGES);
        let version = format!(
            "{}.{}.{}-{}",
            1 + rng.below(3),
            rng.below(20),
            rng.below(10),
            1 + rng.below(5)
        );
        let text = match rng.below(4) {
            0 => format!(
                "Get:{} http://deb.debian.org/debian bookworm/main amd64 {package} amd64 {version} [{} kB]",
                1 + rng.below(90),
                8 + rng.below(4000)
            ),
            1 => format!("Unpacking {package} ({version}) ..."),
            2 => format!("Setting up {package} ({version}) ..."),
            _ => format!("Selecting previously unselected package {package}."),
        };
        second = (second + rng.below(2)) % 60;
        lines.push(format!(
            r#"{{"ts":"2026-12-07T10:14:{second:02}.{:03}Z","stream":"stdout","text":"{text}"}}"#,
            rng.below(1000)
        ));
    }
    format!(
        r#"{{"t":{t},"n":{n},"type":"job.log","job":{{"id":"job_{channel:06}","name":"provision web-{channel}","step":"apt-get install"}},"seq":{n},"lines":[{}]}}"#,
        lines.join(",")
    )
}

fn status(rng: &mut Rng, t: u64, n: usize, channel: usize, size: usize) -> String {
    /// (service, its usual memory in MB)
    const SERVICES: [(&str, u64); 8] = [
        ("nginx", 40),
        ("postgresql", 900),
        ("redis-server", 120),
        ("php-fpm", 300),
        ("node", 250),
        ("sshd", 8),
        ("cron", 3),
        ("node_exporter", 20),
    ];
    let mut services = Vec::new();
    let mut i = 0;
    while services.iter().map(String::len).sum::<usize>() + 420 < size || services.is_empty() {
        let (name, mb) = SERVICES[i % SERVICES.len()];
        i += 1;
        services.push(format!(
            r#"{{"name":"{name}","state":"{}","pid":{},"cpu_pct":{}.{},"rss_mb":{},"restarts":{},"since":"2026-12-0{}T0{}:{:02}:00Z"}}"#,
            if rng.below(20) == 0 { "restarting" } else { "running" },
            300 + rng.below(60000),
            rng.below(40),
            rng.below(10),
            mb + rng.below(mb / 2 + 1),
            rng.below(3),
            1 + rng.below(7),
            rng.below(10),
            rng.below(60),
        ));
    }
    format!(
        r#"{{"t":{t},"n":{n},"type":"server.status","host":"web-{channel}.eu-west-1.internal","uptime_s":{},"load":[{}.{:02},{}.{:02},{}.{:02}],"memory":{{"total_mb":16384,"used_mb":{},"swap_used_mb":{}}},"disks":[{{"mount":"/","size_gb":80,"used_pct":{}}},{{"mount":"/var/lib/postgresql","size_gb":500,"used_pct":{}}}],"services":[{}]}}"#,
        86_400 + rng.below(3_000_000),
        rng.below(4),
        rng.below(100),
        rng.below(4),
        rng.below(100),
        rng.below(4),
        rng.below(100),
        4000 + rng.below(12000),
        rng.below(512),
        20 + rng.below(70),
        20 + rng.below(70),
        services.join(",")
    )
}
