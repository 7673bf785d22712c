//! crier's fleet benchmark: several crier instances on one Redis (or a
//! 3-shard Redis Cluster), their clients spread over them from several
//! client processes, measured per instance and for the whole fleet.
//!
//! ```sh
//! cargo build --release --bin crier --example fleet
//! ./target/release/examples/fleet --instances 4 --clients-per-instance 19000 [--cluster]
//! ```
//!
//! It starts Redis on free loopback ports, `--instances` crier processes
//! (the release binary, `target/release/crier` or `$BENCH_CRIER_BIN`, each
//! with its own config and `127.0.0.1:0`), and client worker processes
//! (this binary again, `--worker …`, see `fleet/worker.rs`). Client `i`
//! opens one SSE stream on instance `i % N` listening to three channels:
//! the broadcast channel `fleet.b`, its own `fleet.u.{i}`, and one of a
//! few shared history channels `fleet.h.{k}`. Then, each phase reported
//! as markdown:
//!
//! - **connections**: per instance, SSE connections (crier's
//!   `crier_connections` gauge) and resident memory before and with the
//!   clients;
//! - **broadcast**: one `PUBLISH` to `fleet.b`: every client must get it;
//!   latency publish → client (the payload carries the time);
//! - **users**: one publication to each client's own channel, paced at
//!   `--user-rate` per second in total;
//! - **restart**: a rolling restart of every instance with drain on, while
//!   a publisher publishes with history (`FCALL crier_publish`) on the
//!   history channels: every client must get every sequence number of its
//!   history channel once, in order, and the moments clients were told to
//!   reconnect, and reconnected, are reported by second of the drain.
//!
//! Why the restart starts each replacement before stopping the old
//! instance (Kubernetes' `maxSurge: 1, maxUnavailable: 0`, what
//! docs/operations.md prescribes) rather than stopping it and starting it
//! again on its port: an instance here can hold at most ~19,936 clients
//! (20,000 file descriptors per process, a hard limit, less crier's
//! reserve), so with 19,000 on each of four instances the other three have
//! room for ~2,800 of the 19,000 leaving; the rest would wait for the
//! restart. The clients reconnect through a balancer in each worker
//! process (least-connections by default, so the leaving clients go to the
//! replacement; `--balance roundrobin` sends them to the full instances
//! too, which answer 503 at their limit). A refused client backs off as
//! docs/integration.md's `crierSSE` does (0.5–1 s, doubling to 30 s).
//!
//! Why a few shared history channels rather than one per user: a
//! client's reconnect loses nothing only if what was published while it
//! was away is replayed from history. On per-user channels, at a rate this
//! machine carries for 76,000 of them, a client would rarely have a
//! message published during its own second of reconnecting, so the check
//! would prove little; on a shared channel every publication reaches
//! thousands of clients, and each one that was away gets it by replay (the
//! report counts them), on the Cluster from each of the three shards.
//! The default rate, 0.25 per second on each of 8 channels, is 19,000
//! deliveries a second for the fleet: at 1 per second (76,000) the clients,
//! crier and the kernel's loopback keep both cores of the 2-core machine
//! this was written on busy before anything restarts.
//!
//! Everything runs on loopback, is bounded in count and time, and stops by
//! itself; every child is killed when the run ends, panics or is
//! interrupted. The clients share the machine's cores with crier and
//! Redis: latencies are a floor, not what separate machines would give.

// A benchmark tool stops at the first thing it cannot do.
#![allow(clippy::expect_used, clippy::panic)]

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

#[path = "fleet/hist.rs"]
mod hist;
#[path = "bench/http.rs"]
mod http;
#[path = "fleet/procs.rs"]
mod procs;
#[path = "fleet/publish.rs"]
mod publish;
#[path = "fleet/worker.rs"]
mod worker;

use procs::{Crier, CrierSettings, Redis};
use publish::Publisher;

/// Sockets one worker process may hold: below the 20,000 descriptors a
/// process gets here, with room for a reconnecting stream's overlap.
const MAX_CLIENTS_PER_WORKER: usize = 19_000;

/// crier keeps this many descriptors for itself (src/fdlimit.rs).
const CRIER_FD_RESERVE: u64 = 64;

#[derive(Debug, Clone)]
struct Args {
    instances: usize,
    clients_per_instance: usize,
    cluster: bool,
    workers: Option<usize>,
    broadcast: bool,
    users: bool,
    restart: bool,
    user_rate: u64,
    history_channels: usize,
    /// Publications per second on each history channel.
    history_rate: f64,
    grace: u64,
    drain: u64,
    least_connections: bool,
}

fn usage(why: &str) -> ! {
    eprintln!(
        "fleet: {why}\nusage: fleet [--instances N] [--clients-per-instance N] [--cluster] \
         [--workers N] [--phase all|broadcast|users|restart] [--user-rate MSGS_PER_SEC] \
         [--history-channels N] [--history-rate MSGS_PER_SEC_PER_CHANNEL] [--grace SECS] \
         [--drain SECS] [--balance leastconn|roundrobin]"
    );
    std::process::exit(2)
}

fn parse_args(argv: &[String]) -> Args {
    let mut a = Args {
        instances: 4,
        clients_per_instance: 19_000,
        cluster: false,
        workers: None,
        broadcast: true,
        users: true,
        restart: true,
        user_rate: 2_000,
        history_channels: 8,
        history_rate: 0.25,
        grace: 5,
        drain: 10,
        least_connections: true,
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--instances" => {
                a.instances = value().parse().unwrap_or_else(|_| usage("--instances N"))
            }
            "--clients-per-instance" => {
                a.clients_per_instance = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--clients-per-instance N"))
            }
            "--cluster" => a.cluster = true,
            "--workers" => {
                a.workers = Some(value().parse().unwrap_or_else(|_| usage("--workers N")))
            }
            "--phase" => {
                let phase = value();
                (a.broadcast, a.users, a.restart) = match phase.as_str() {
                    "all" => (true, true, true),
                    "broadcast" => (true, false, false),
                    "users" => (false, true, false),
                    "restart" => (false, false, true),
                    _ => usage("--phase all|broadcast|users|restart"),
                }
            }
            "--user-rate" => {
                a.user_rate = value().parse().unwrap_or_else(|_| usage("--user-rate N"))
            }
            "--history-channels" => {
                a.history_channels = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--history-channels N"))
            }
            "--history-rate" => {
                a.history_rate = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--history-rate N"))
            }
            "--grace" => a.grace = value().parse().unwrap_or_else(|_| usage("--grace SECS")),
            "--drain" => a.drain = value().parse().unwrap_or_else(|_| usage("--drain SECS")),
            "--balance" => {
                a.least_connections = match value().as_str() {
                    "leastconn" => true,
                    "roundrobin" => false,
                    _ => usage("--balance leastconn|roundrobin"),
                }
            }
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    if a.instances == 0 || a.clients_per_instance == 0 || a.user_rate == 0 {
        usage("counts and rates must be > 0");
    }
    if a.history_channels == 0 || a.history_rate <= 0.0 || a.drain == 0 {
        usage("--history-channels, --history-rate and --drain must be > 0");
    }
    a
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("--worker") {
        let args = worker::WorkerArgs::parse(&argv[1..]).unwrap_or_else(|| usage("bad --worker"));
        return worker::main(args);
    }
    let args = parse_args(&argv);
    // The coordinator's own children inherit its limits: raise the soft
    // limit to the hard one (crier raises its own too).
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // Interrupted, or past its time: the run's future is dropped, and
    // with it every child (kill_on_drop).
    let limit = Duration::from_secs(1800);
    let code = runtime.block_on(async {
        tokio::select! {
            code = run(args) => code,
            _ = interrupted() => { eprintln!("fleet: interrupted, stopping every child"); 130 }
            _ = tokio::time::sleep(limit) => { eprintln!("fleet: over {limit:?}, stopping"); 124 }
        }
    });
    drop(runtime);
    std::process::exit(code);
}

async fn interrupted() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// One client worker process and its command pipe.
struct Worker {
    /// Held for `kill_on_drop`; its CPU time is read from /proc.
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Worker {
    fn start(args: &worker::WorkerArgs) -> Worker {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .arg("--worker")
            .args(args.to_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start a worker");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Worker {
            child,
            stdin,
            stdout,
        }
    }

    async fn send(&mut self, command: &str) {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .expect("a worker's stdin");
    }

    async fn answer(&mut self) -> Value {
        let line = self
            .stdout
            .next_line()
            .await
            .expect("a worker's stdout")
            .expect("a worker exited");
        let rest = line
            .strip_prefix("ok")
            .unwrap_or_else(|| panic!("worker: {line}"));
        serde_json::from_str(rest.trim()).unwrap_or(Value::Null)
    }
}

/// Sends `command` to every worker, then collects their answers.
async fn all(workers: &mut [Worker], command: &str) -> Vec<Value> {
    for w in workers.iter_mut() {
        w.send(command).await;
    }
    let mut answers = Vec::with_capacity(workers.len());
    for w in workers.iter_mut() {
        answers.push(w.answer().await);
    }
    answers
}

fn sum(answers: &[Value], key: &str) -> u64 {
    answers.iter().map(|a| a[key].as_u64().unwrap_or(0)).sum()
}

fn merged(answers: &[Value], key: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for a in answers {
        let counts: Vec<u64> = a[key]
            .as_array()
            .map(|v| v.iter().map(|x| x.as_u64().unwrap_or(0)).collect())
            .unwrap_or_default();
        hist::merge(&mut out, &counts);
    }
    out
}

/// Attempts that got no stream, all workers together, by what went wrong.
fn failures(answers: &[Value]) -> std::collections::BTreeMap<String, u64> {
    let mut all = std::collections::BTreeMap::new();
    for a in answers {
        for (why, n) in a["failures"].as_object().into_iter().flatten() {
            *all.entry(why.clone()).or_default() += n.as_u64().unwrap_or(0);
        }
    }
    all
}

/// `p50 / p99 / max` in milliseconds, of merged log buckets.
fn percentiles(buckets: &[u64]) -> String {
    format!(
        "{} / {} / {} ms",
        ms(hist::quantile_ms(buckets, 0.5)),
        ms(hist::quantile_ms(buckets, 0.99)),
        ms(hist::max_ms(buckets))
    )
}

fn ms(x: f64) -> String {
    match x {
        x if x.is_nan() => "—".into(),
        x if x < 10.0 => format!("{x:.2}"),
        x => format!("{x:.0}"),
    }
}

fn mib(bytes: f64) -> String {
    format!("{:.1}", bytes / 1_048_576.0)
}

/// Polls every worker's `stats` until `done` holds of them or `limit`
/// passes; the last answers.
async fn stats_until(
    workers: &mut [Worker],
    limit: Duration,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let answers = all(workers, "stats").await;
        if done(&answers) || Instant::now() >= deadline {
            return answers;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The run's processes' CPU seconds at one moment, to tell what a phase
/// cost: the clients share the cores with crier and Redis.
struct CpuMark {
    crier: std::collections::HashMap<usize, f64>,
    redis: f64,
    clients: f64,
    /// This process (the coordinator and its publisher).
    coordinator: f64,
    machine: MachineTicks,
    at: Instant,
}

/// The whole machine's CPU ticks from /proc/stat: busy (softirq apart)
/// and all. Loopback TCP is processed in softirq, which Linux charges to
/// no process, so the processes' own figures miss it.
#[derive(Default, Clone, Copy)]
struct MachineTicks {
    busy: u64,
    softirq: u64,
    total: u64,
}

impl MachineTicks {
    fn now() -> MachineTicks {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|t| t.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal …
        let get = |i: usize| ticks.get(i).copied().unwrap_or(0);
        MachineTicks {
            busy: get(0) + get(1) + get(2) + get(5) + get(7),
            softirq: get(6),
            total: (0..8).map(get).sum(),
        }
    }
}

impl CpuMark {
    fn now(instances: &[Crier], redis: &Redis, workers: &[Worker]) -> CpuMark {
        CpuMark {
            crier: instances.iter().map(|c| (c.id, c.cpu_seconds())).collect(),
            redis: redis.nodes.iter().map(|n| n.cpu_seconds()).sum(),
            clients: workers
                .iter()
                .map(|w| procs::cpu_seconds(w.child.id()))
                .sum(),
            coordinator: procs::cpu_seconds(Some(std::process::id())),
            machine: MachineTicks::now(),
            at: Instant::now(),
        }
    }

    /// What was spent since this mark, as a report line's value; `exited`
    /// holds instances that stopped meanwhile, with their last CPU
    /// figure.
    fn spent(
        &self,
        instances: &[Crier],
        exited: &[(usize, f64)],
        redis: &Redis,
        workers: &[Worker],
    ) -> (f64, String) {
        let now = CpuMark::now(instances, redis, workers);
        let crier: f64 = now
            .crier
            .iter()
            .chain(exited.iter().map(|(id, cpu)| (id, cpu)))
            .map(|(id, cpu)| cpu - self.crier.get(id).copied().unwrap_or(0.0))
            .sum();
        let secs = now.at.duration_since(self.at).as_secs_f64();
        let (redis, clients) = (now.redis - self.redis, now.clients - self.clients);
        let ours = crier + redis + clients + now.coordinator - self.coordinator;
        // Ticks are 1/100 s, summed over the cores.
        let busy = now.machine.busy.saturating_sub(self.machine.busy) as f64 / 100.0;
        let softirq = now.machine.softirq.saturating_sub(self.machine.softirq) as f64 / 100.0;
        let total = now.machine.total.saturating_sub(self.machine.total).max(1) as f64 / 100.0;
        let text = format!(
            "{crier:.1} / {redis:.1} / {clients:.1} s in {secs:.1} s; the machine {:.0} % busy \
             + {:.0} % softirq, of which {:.1} s not this run's processes",
            100.0 * busy / total,
            100.0 * softirq / total,
            (busy - ours).max(0.0),
        );
        (crier, text)
    }
}

/// The line a phase reports its CPU on.
const CPU_LINE: &str =
    "CPU: crier (fleet) / Redis / client processes, in wall time; the machine (both cores)";

async fn run(args: Args) -> i32 {
    let total = args.instances * args.clients_per_instance;
    let workers_n = args
        .workers
        .unwrap_or_else(|| total.div_ceil(16_000))
        .max(1);
    if total.div_ceil(workers_n) > MAX_CLIENTS_PER_WORKER {
        usage(&format!(
            "{total} clients over {workers_n} workers is more than {MAX_CLIENTS_PER_WORKER} \
             sockets in one process: give more --workers"
        ));
    }
    if workers_n > 250 {
        usage("at most 250 workers (source addresses 127.W.0.x each)");
    }
    let hard = rlimit::Resource::NOFILE.get().map(|(_, h)| h).unwrap_or(0);
    let max_connections = hard.saturating_sub(CRIER_FD_RESERVE) as usize;
    if args.clients_per_instance > max_connections {
        usage(&format!(
            "an instance can hold at most {max_connections} connections here (open-file hard \
             limit {hard}, less crier's {CRIER_FD_RESERVE})"
        ));
    }
    let mut failed = false;

    let mut redis = if args.cluster {
        Redis::cluster().await
    } else {
        Redis::single().await
    };
    let settings = CrierSettings {
        max_connections,
        grace: args.grace,
        drain: args.drain,
    };
    let mut instances = Vec::new();
    for id in 0..args.instances {
        instances.push(Crier::start(id, id, &redis, &settings).await);
    }
    let mut idle = Vec::new();
    for c in &instances {
        idle.push(c.connections_and_rss().await.1);
    }
    let publisher = Publisher::connect(&redis).await;

    // The clients: worker w holds clients [w·per, (w+1)·per).
    let per = total.div_ceil(workers_n);
    let mut workers = Vec::new();
    for w in 0..workers_n {
        let first = w * per;
        let count = per.min(total - first.min(total));
        if count == 0 {
            break;
        }
        workers.push(Worker::start(&worker::WorkerArgs {
            first,
            count,
            instances: instances.iter().map(|c| c.addr).collect(),
            source: Ipv4Addr::new(127, 2 + w as u8, 0, 0),
            history_channels: args.history_channels,
            least_connections: args.least_connections,
        }));
    }
    let mark = CpuMark::now(&instances, &redis, &workers);
    let started = Instant::now();
    let answers = all(&mut workers, "connect").await;
    let connect_secs = started.elapsed().as_secs_f64();
    let (_, connect_cpu) = mark.spent(&instances, &[], &redis, &workers);
    let open = sum(&answers, "open");
    // Let the instances' Redis subscriptions and allocations settle.
    tokio::time::sleep(Duration::from_secs(2)).await;

    println!(
        "## crier fleet: {} instances × {} SSE clients ({total}), {}, {} client processes",
        args.instances,
        args.clients_per_instance,
        if args.cluster {
            "3-shard Redis Cluster"
        } else {
            "one Redis"
        },
        workers.len()
    );
    println!();
    println!("Clients with an open stream: {open} of {total}, in {connect_secs:.1} s.");
    println!();
    println!("{CPU_LINE}, while they connected: {connect_cpu}.");
    for (why, n) in failures(&all(&mut workers, "stats").await) {
        println!();
        println!("Attempts that got no stream: {n} × `{why}`.");
    }
    println!();
    println!(
        "| instance | SSE connections | RSS idle MiB | RSS with clients MiB | KiB per connection |"
    );
    println!("|---|---|---|---|---|");
    let (mut fleet_conns, mut fleet_idle, mut fleet_rss) = (0.0, 0.0, 0.0);
    for (c, idle) in instances.iter().zip(&idle) {
        let (conns, rss) = c.connections_and_rss().await;
        println!(
            "| #{} | {conns:.0} | {} | {} | {:.1} |",
            c.id,
            mib(*idle),
            mib(rss),
            (rss - idle) / conns / 1024.0
        );
        fleet_conns += conns;
        fleet_idle += idle;
        fleet_rss += rss;
    }
    println!(
        "| fleet | {fleet_conns:.0} | {} | {} | {:.1} |",
        mib(fleet_idle),
        mib(fleet_rss),
        (fleet_rss - fleet_idle) / fleet_conns / 1024.0
    );
    if open < total as u64 {
        eprintln!("fleet: only {open} of {total} clients connected");
        failed = true;
    }
    // What the fleet costs doing nothing: each stream gets a heartbeat
    // every `sse.heartbeat` (15 s), 5,000 writes a second for 76,000.
    let mark = CpuMark::now(&instances, &redis, &workers);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (idle_cpu, idle_text) = mark.spent(&instances, &[], &redis, &workers);
    let idle_rate = idle_cpu / 10.0;
    println!();
    println!("{CPU_LINE}, 10 s idle (heartbeats only): {idle_text}.");

    if args.broadcast {
        failed |= broadcast(&publisher, &instances, &redis, &mut workers, total).await;
    }
    if args.users {
        failed |= users(
            &args,
            &publisher,
            &instances,
            &redis,
            &mut workers,
            total,
            idle_rate,
        )
        .await;
    }
    if args.restart {
        failed |= restart(
            &args,
            &publisher,
            &redis,
            &settings,
            &mut instances,
            &mut workers,
            total,
        )
        .await;
    }

    let warnings: u64 = instances
        .iter()
        .map(|c| c.warnings.load(Ordering::Relaxed))
        .sum();
    if warnings > 0 {
        println!();
        println!("crier logged {warnings} warnings or errors (the first ones are on stderr).");
    }
    // crier first: 76,000 clients leaving at once would keep the
    // instances busy (and logging) while they are torn down.
    for c in &mut instances {
        c.kill().await;
    }
    drop(workers);
    redis.stop().await;
    i32::from(failed)
}

/// One publication to every client.
async fn broadcast(
    publisher: &Publisher,
    instances: &[Crier],
    redis: &Redis,
    workers: &mut [Worker],
    total: usize,
) -> bool {
    let mark = CpuMark::now(instances, redis, workers);
    let payload = format!(r#"{{"k":"b","t":{}}}"#, now_micros());
    publisher
        .publish("fleet.b", &payload)
        .await
        .expect("publish the broadcast");
    let answers = stats_until(workers, Duration::from_secs(60), |a| {
        sum(a, "with_broadcast") >= total as u64
    })
    .await;
    let (_, cpu) = mark.spent(instances, &[], redis, workers);
    let got = sum(&answers, "with_broadcast");
    let extra = sum(&all(workers, "check").await, "extra_broadcasts");
    println!();
    println!("### Broadcast: one `{}` to every client", publisher.plain());
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| clients reached / lost / duplicates | {got} / {} / {extra} |",
        total as u64 - got
    );
    println!(
        "| latency p50 / p99 / max (publish → client) | {} |",
        percentiles(&merged(&answers, "broadcast_latency"))
    );
    println!("| {CPU_LINE} | {cpu} |");
    got < total as u64 || extra > 0
}

/// One publication to each client's own channel, paced.
async fn users(
    args: &Args,
    publisher: &Publisher,
    instances: &[Crier],
    redis: &Redis,
    workers: &mut [Worker],
    total: usize,
    idle_rate: f64,
) -> bool {
    let mark = CpuMark::now(instances, redis, workers);
    // Ticks of 10 ms, each publishing its share concurrently (one round
    // trip on one Redis; one per shard on a Cluster).
    let per_tick = (args.user_rate as f64 / 100.0).max(1.0);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let started = Instant::now();
    let mut next = 0usize;
    let mut owed = 0.0;
    let mut errors = 0u64;
    while next < total {
        tick.tick().await;
        owed += per_tick;
        let batch = (owed as usize).min(total - next);
        owed -= batch as f64;
        let sends = (next..next + batch).map(|i| {
            let channel = format!("fleet.u.{i}");
            let payload = format!(r#"{{"k":"u","t":{}}}"#, now_micros());
            async move { publisher.publish(&channel, &payload).await }
        });
        errors += futures_util::future::join_all(sends)
            .await
            .iter()
            .filter(|r| r.is_err())
            .count() as u64;
        next += batch;
    }
    let publish_secs = started.elapsed().as_secs_f64();
    let answers = stats_until(workers, Duration::from_secs(60), |a| {
        sum(a, "with_user") >= total as u64
    })
    .await;
    let (crier_cpu, cpu) = mark.spent(instances, &[], redis, workers);
    let got = sum(&answers, "with_user");
    let extra = sum(&all(workers, "check").await, "extra_user");
    println!();
    println!(
        "### Per-user channels: one `{}` to each of {total} channels at {} msg/s",
        publisher.plain(),
        args.user_rate
    );
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| published | {total} in {publish_secs:.1} s ({:.0} msg/s){} |",
        total as f64 / publish_secs,
        if errors > 0 {
            format!(", {errors} failed")
        } else {
            String::new()
        }
    );
    println!(
        "| clients reached / lost / duplicates | {got} / {} / {extra} |",
        total as u64 - got
    );
    println!(
        "| latency p50 / p99 / max (publish → client) | {} |",
        percentiles(&merged(&answers, "user_latency"))
    );
    println!("| {CPU_LINE} | {cpu} |");
    // The idle fleet's heartbeats are not the deliveries' doing.
    let above_idle = crier_cpu - idle_rate * publish_secs;
    println!(
        "| crier CPU per delivery, above idle | {:.1} µs |",
        above_idle.max(0.0) * 1e6 / got.max(1) as f64
    );
    got < total as u64 || extra > 0 || errors > 0
}

/// Publishes `{"k":"h","s":N,"t":…}` on every history channel, N = 1, 2, …,
/// `rate` times a second, until `stop`; `last` is the last N published on
/// every channel (each publication retried until Redis takes it, so no
/// number is skipped).
fn history_publisher(
    publisher: Publisher,
    channels: usize,
    rate: f64,
    stop: Arc<AtomicBool>,
    last: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        let mut retries = 0;
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            seq += 1;
            let sends = (0..channels).map(|k| {
                let publisher = publisher.clone();
                async move {
                    let channel = format!("fleet.h.{k}");
                    let mut retries = 0;
                    loop {
                        let payload = format!(r#"{{"k":"h","s":{seq},"t":{}}}"#, now_micros());
                        match publisher.publish_with_history(&channel, &payload).await {
                            Ok(()) => return retries,
                            Err(e) if retries < 100 => {
                                eprintln!("fleet: FCALL crier_publish {channel}: {e}; again");
                                retries += 1;
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            Err(e) => panic!("FCALL crier_publish {channel}: {e}"),
                        }
                    }
                }
            });
            retries += futures_util::future::join_all(sends)
                .await
                .iter()
                .sum::<u64>();
            last.store(seq, Ordering::Relaxed);
        }
        retries
    })
}

/// Rolling restart of every instance, with drain, under history traffic.
#[allow(clippy::too_many_arguments)]
async fn restart(
    args: &Args,
    publisher: &Publisher,
    redis: &Redis,
    settings: &CrierSettings,
    instances: &mut [Crier],
    workers: &mut [Worker],
    total: usize,
) -> bool {
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicU64::new(0));
    let before = all(workers, "stats").await;
    let messages_before = sum(&before, "history_messages");
    let task = history_publisher(
        publisher.clone(),
        args.history_channels,
        args.history_rate,
        Arc::clone(&stop),
        Arc::clone(&last),
    );
    // Every client must have its first history message before anything
    // restarts: from there on, each must get every one.
    let answers = stats_until(workers, Duration::from_secs(60), |a| {
        sum(a, "with_history") >= total as u64
    })
    .await;
    let ready = sum(&answers, "with_history");
    // What the history traffic alone costs, before anything restarts.
    let steady = CpuMark::now(instances, redis, workers);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (_, steady) = steady.spent(instances, &[], redis, workers);
    redis.reset_stats().await;
    let mark = CpuMark::now(instances, redis, workers);
    let mut exited = Vec::new();
    let started = Instant::now();
    let mut rows = Vec::new();
    let first_new = instances.iter().map(|c| c.id).max().unwrap_or(0) + 1;
    for (slot, current) in instances.iter_mut().enumerate() {
        // The replacement first, ready and in the balancers…
        let fresh = Crier::start(first_new + slot, slot, redis, settings).await;
        all(workers, &format!("up {} {}", fresh.id, fresh.addr)).await;
        let mut old = std::mem::replace(current, fresh);
        // …then the old one out of them, and told to shut down.
        all(workers, &format!("down {}", old.id)).await;
        let sigterm = Instant::now();
        let drain_start = now_micros() + settings.grace * 1_000_000;
        all(workers, &format!("drain {} {drain_start}", old.id)).await;
        old.sigterm().await;
        let limit = Duration::from_secs(settings.grace + settings.drain + 15);
        let (code, last_cpu) = old.wait_exit(limit).await;
        exited.push((old.id, last_cpu));
        rows.push((
            slot,
            old.id,
            current.id,
            sigterm.elapsed().as_secs_f64(),
            code,
        ));
    }
    let restart_secs = started.elapsed().as_secs_f64();
    // A few more seconds of publishing after the last restart, then every
    // client must catch up with the last number.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let publish_retries = task.await.expect("the history publisher");
    let final_seq = last.load(Ordering::Relaxed);
    let finals: Vec<String> = (0..args.history_channels)
        .map(|_| final_seq.to_string())
        .collect();
    let check_command = format!("check {}", finals.join(" "));
    let deadline = Instant::now() + Duration::from_secs(30);
    let checked = loop {
        let checked = all(workers, &check_command).await;
        if sum(&checked, "lost") == 0 || Instant::now() >= deadline {
            break checked;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let (crier_cpu, cpu) = mark.spent(instances, &exited, redis, workers);
    let commands = redis.command_stats().await;
    let answers = all(workers, "stats").await;
    let lost = sum(&checked, "lost");
    let disorder = sum(&checked, "disorder");
    let history_gaps = sum(&checked, "history_gaps");
    let never = sum(&checked, "never");

    println!();
    println!(
        "### Rolling restart of every instance, drain on (grace {} s, drain {} s), history traffic",
        settings.grace, settings.drain
    );
    println!();
    println!(
        "Each replacement is started and ready before its predecessor gets SIGTERM \
         (maxSurge 1); clients reconnect through a {} balancer over the ready instances, \
         resuming with `Last-Event-ID`.",
        if args.least_connections {
            "least-connections"
        } else {
            "round-robin"
        }
    );
    println!();
    println!("| slot | old → new instance | SIGTERM → exit | exit code |");
    println!("|---|---|---|---|");
    for (slot, old, new, secs, code) in &rows {
        let code = code.map_or("killed (no exit in time)".into(), |c| c.to_string());
        println!("| {slot} | #{old} → #{new} | {secs:.1} s | {code} |");
    }
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| history publisher | {} channels × {} msg/s, `FCALL crier_publish`, numbers 1…{final_seq} ({publish_retries} retried) |",
        args.history_channels, args.history_rate
    );
    println!("| clients with a history message before the first restart | {ready} of {total} |");
    println!("| {CPU_LINE}, 5 s of history traffic before the first restart | {steady} |");
    println!("| all {} restarts | {restart_secs:.1} s |", rows.len());
    println!(
        "| history messages delivered | {} |",
        sum(&answers, "history_messages") - messages_before
    );
    println!(
        "| … of which published before the client's resumed stream opened (replayed) | {} |",
        sum(&answers, "replayed") - sum(&before, "replayed")
    );
    println!(
        "| history: not received by the end (lost, or not reconnected) / duplicates or out of order / `gap` notices | {lost} / {disorder} / {history_gaps} |"
    );
    if never > 0 {
        println!("| clients that never got a history message | {never} |");
    }
    println!(
        "| streams told to reconnect (drain) / ended otherwise | {} / {} |",
        sum(&answers, "drained"),
        sum(&answers, "ended_otherwise")
    );
    println!(
        "| reconnect attempts refused (503) / failed | {} / {} |",
        sum(&answers, "refused"),
        sum(&answers, "failed")
    );
    for (why, n) in &failures(&answers) {
        println!("| … of which `{why}` | {n} |");
    }
    println!(
        "| clients with an open stream at the end | {} of {total} |",
        sum(&answers, "open")
    );
    println!(
        "| `gap` notices on the channels without history (expected: two per reconnect, broadcast and user channel) | {} |",
        sum(&answers, "other_gaps")
    );
    println!(
        "| a client's time without a stream (end → reopened, `retry:` wait included) p50 / p99 / max | {} |",
        percentiles(&merged(&answers, "downtime"))
    );
    println!(
        "| history latency p50 / p99 / max (publish → client, replays included) | {} |",
        percentiles(&merged(&answers, "history_latency"))
    );
    println!("| {CPU_LINE} | {cpu} |");
    println!(
        "| crier CPU per stream that moved | {:.0} µs |",
        crier_cpu * 1e6 / sum(&answers, "drained").max(1) as f64
    );
    println!();
    println!("Redis during the restarts, the commands that took most of its time:");
    println!();
    println!("| command | calls | µs per call | total s |");
    println!("|---|---|---|---|");
    for (name, calls, usec) in commands.iter().take(8) {
        println!(
            "| {name} | {calls} | {:.1} | {:.2} |",
            *usec as f64 / (*calls).max(1) as f64,
            *usec as f64 / 1e6
        );
    }
    println!();
    println!("Reconnects by second of the drain (0 = `grace` after SIGTERM), all instances:");
    println!();
    println!("| second | told to reconnect | reconnected |");
    println!("|---|---|---|");
    let told = merged(&answers, "told");
    let reopened = merged(&answers, "reopened");
    for b in 0..told.len().max(reopened.len()) {
        let (t, r) = (
            told.get(b).copied().unwrap_or(0),
            reopened.get(b).copied().unwrap_or(0),
        );
        if t == 0 && r == 0 {
            continue;
        }
        let (from, to) = hist::second_range(b);
        let label = match b {
            0 => format!("< {to}"),
            b if b + 1 == hist::SECOND_BUCKETS => format!("≥ {from}"),
            _ => format!("{from}–{to}"),
        };
        println!("| {label} | {t} | {r} |");
    }
    println!();
    println!("Instances after the restart:");
    println!();
    println!("| slot | instance | SSE connections | RSS MiB |");
    println!("|---|---|---|---|");
    for c in instances.iter() {
        let (conns, rss) = c.connections_and_rss().await;
        println!("| {} | #{} | {conns:.0} | {} |", c.slot, c.id, mib(rss));
    }
    let bad_exit = rows.iter().any(|r| r.4 != Some(0));
    lost > 0 || disorder > 0 || history_gaps > 0 || never > 0 || bad_exit
}
