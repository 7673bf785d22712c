//! The `crier` binary: parse flags, load config, start tracing, serve until
//! SIGTERM, drain, exit. Everything else lives in the library.

use std::process::ExitCode;

use crier::cli::{Cli, Command};
use crier::config::{Config, ConfigError, LogFormat, EX_CONFIG};
use tracing_subscriber::EnvFilter;

/// jemalloc (the `jemalloc` feature, on by default): an idle connection's
/// few small allocations sit in its size classes without a per-allocation
/// header, and the buffers a burst of connections frees are reused or
/// returned, where glibc's arenas kept them (docs/performance.md).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse_args();
    if let Some(Command::Completions { shell, .. }) = cli.command {
        // Needs no configuration: it must work anywhere.
        Cli::completions(shell, &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let config = match cli.load_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("crier: {e}");
            return ExitCode::from(EX_CONFIG as u8);
        }
    };
    if matches!(cli.command, Some(Command::CheckConfig { .. })) {
        print!("{}", config.to_redacted_toml());
        let fds = crier::fdlimit::current();
        let fd_warning = fds.and_then(|limits| crier::fdlimit::warning(&config, &limits));
        for warning in config.warnings().into_iter().chain(fd_warning) {
            eprintln!("crier: warning: {warning}");
        }
        eprintln!("crier: configuration is valid");
        return ExitCode::SUCCESS;
    }
    init_tracing(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crier: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Some(Command::Publish {
                channel,
                payload,
                api,
                api_key,
                ca_file,
            }) => {
                let api = crier::cli::Api {
                    base: api.as_deref(),
                    key: api_key.as_deref(),
                    ca_file: ca_file.as_deref(),
                };
                let said = crier::cli::publish(&config, channel, payload, api).await?;
                eprintln!("crier: {said}");
                Ok(())
            }
            _ => serve(config).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crier: {e:#}");
            // What only building the server's parts finds (a channel
            // pattern, a key file, a Redis URL) is bad configuration too.
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(EX_CONFIG as u8)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    raise_fd_limit();
    // Listen for signals before serving: one that arrives right after the
    // start-up line must drain, not kill the process (the default action).
    let mut signals = Signals::install()?;
    let grace = config.shutdown.grace;
    let running = crier::start(config).await?;
    let first = signals.next().await;
    running.shutdown();
    // Someone at a terminal waits out the grace period (5 s by default)
    // with nothing on screen otherwise: say that there is a way out.
    let again = match first {
        Signal::Interrupt => "press Ctrl-C again",
        Signal::Terminate => "send SIGTERM again",
    };
    tracing::info!(?grace, "shutting down; {again} to exit now");
    // A second signal means "now": skip the drain.
    tokio::select! {
        _ = running.stopped() => {}
        _ = signals.next() => {
            tracing::warn!("second signal: exiting without completing the drain");
        }
    }
    Ok(())
}

/// SIGTERM and SIGINT (Ctrl-C), caught from the moment they are installed.
struct Signals {
    term: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let listen =
            |kind, name| signal(kind).map_err(|e| anyhow::anyhow!("cannot listen for {name}: {e}"));
        Ok(Self {
            term: listen(SignalKind::terminate(), "SIGTERM")?,
            interrupt: listen(SignalKind::interrupt(), "SIGINT")?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => {
                tracing::info!("SIGTERM received");
                Signal::Terminate
            }
            _ = self.interrupt.recv() => {
                tracing::info!("interrupt received");
                Signal::Interrupt
            }
        }
    }
}

/// Which signal asked crier to stop.
enum Signal {
    Terminate,
    Interrupt,
}

/// Raises the open-file soft limit to the hard limit before anything is
/// opened: each connection is a descriptor, and container runtimes often
/// start processes with a soft limit of 1,024 while allowing far more.
/// Whether the hard limit itself is enough is said at start (see
/// `crier::fdlimit::warning`).
fn raise_fd_limit() {
    match crier::fdlimit::raise() {
        Ok(limits) if limits.before < limits.soft => tracing::info!(
            from = limits.before,
            to = limits.soft,
            "open-file limit raised to the hard limit"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("{e}"),
    }
}

/// crier's own `tracing` events only. Dependencies that log through the
/// `log` crate (tungstenite, redis) are deliberately not bridged: at trace
/// level they print frame and command contents, which can hold tokens and
/// session ids, and no secret may reach a log line at any level.
fn init_tracing(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let installed = match config.log.format {
        LogFormat::Json => tracing::subscriber::set_global_default(builder.json().finish()),
        LogFormat::Text => tracing::subscriber::set_global_default(builder.finish()),
    };
    if let Err(e) = installed {
        eprintln!("crier: cannot set up logging: {e}");
    }
}

/// Colours only for a person at a terminal: never into files, pipes or a
/// container runtime's log (`docker logs` would show the escapes), and never
/// when `NO_COLOR` is set to anything (<https://no-color.org>).
fn colour(stream: &impl std::io::IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
