//! Open-file limits: every connection is a file descriptor, and a process
//! out of descriptors can accept nothing, not even the liveness probe that
//! would otherwise restart it (dropping every client).
//!
//! - [`raise`]: at start the soft `RLIMIT_NOFILE` goes up to the hard
//!   limit. Container runtimes commonly start processes with a soft limit
//!   of 1,024 and Kubernetes has no per-pod ulimit, so crier does it itself.
//! - [`warning`]: a hard limit below `limits.max_connections` plus crier's
//!   own needs ([`reserve`]) is said at start and by `crier check-config`.
//! - [`Budget`]: the accept loop keeps [`reserve`] descriptors free. An
//!   accepted socket holds a [`Slot`] for as long as it is open; a socket
//!   accepted when every slot is taken is served by a minimal handler that
//!   answers `/healthz` and `/readyz` and refuses the rest with 503, so the
//!   probes keep answering at the limit.
//!
//! This module never logs; it says what it found and the caller logs it.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Config;

/// Descriptors crier keeps for itself beyond its client connections: the
/// standard streams, the runtime's, the listener, Redis connections
/// (pub/sub, commands, the session store, cluster nodes), JWKS fetches,
/// `/proc` reads for `/metrics`, and the [`OVERFLOW`] connections that
/// answer probes at the limit. The webhook's `max_concurrency` comes on
/// top (see [`reserve`]).
pub(crate) const RESERVE: u64 = 64;

/// Connections accepted beyond the budget and answered by the minimal
/// handler at once; more are closed as soon as they are accepted. Part of
/// [`RESERVE`].
pub(crate) const OVERFLOW: usize = 16;

/// What `RLIMIT_NOFILE` was and is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The soft limit before [`raise`] (equal to `soft` when unchanged).
    pub before: u64,
    /// The soft limit: what the process may open.
    pub soft: u64,
    /// The hard limit: how far the soft limit may go.
    pub hard: u64,
}

/// The current limits, unchanged. `None` where they cannot be read.
pub fn current() -> Option<Limits> {
    let (soft, hard) = rlimit::Resource::NOFILE.get().ok()?;
    Some(Limits {
        before: soft,
        soft,
        hard,
    })
}

/// Raises the soft limit to the hard limit. On failure (or where the
/// limits cannot be read) the limits stay as they were and the error is
/// returned for the caller to log.
pub fn raise() -> Result<Limits, String> {
    let (soft, hard) = rlimit::Resource::NOFILE
        .get()
        .map_err(|e| format!("cannot read the open-file limit: {e}"))?;
    if soft >= hard {
        return Ok(Limits {
            before: soft,
            soft,
            hard,
        });
    }
    // `increase_nofile_limit` knows the platforms' ceilings (macOS caps
    // the soft limit below an unlimited hard limit).
    let raised = rlimit::increase_nofile_limit(hard)
        .map_err(|e| format!("cannot raise the open-file limit from {soft} to {hard}: {e}"))?;
    Ok(Limits {
        before: soft,
        soft: raised,
        hard,
    })
}

/// Descriptors crier needs besides one per client connection.
pub(crate) fn reserve(config: &Config) -> u64 {
    let webhook = config
        .auth
        .webhook
        .as_ref()
        .map_or(0, |hook| hook.max_concurrency as u64);
    RESERVE + webhook
}

/// What to tell the operator when the hard limit cannot hold
/// `limits.max_connections` connections and crier's own needs.
pub fn warning(config: &Config, limits: &Limits) -> Option<String> {
    let reserve = reserve(config);
    let wanted = config.limits.max_connections as u64;
    let needed = wanted.saturating_add(reserve);
    (limits.hard < needed).then(|| {
        format!(
            "the open-file limit (hard {hard}) is below limits.max_connections ({wanted}) plus \
             {reserve} for crier itself: at most {can} connections can be open at once, and \
             the rest are refused with 503. Raise the hard limit to at least {needed} (`ulimit \
             -Hn`, systemd LimitNOFILE=, docker --ulimit nofile=) or lower \
             limits.max_connections to {can}",
            hard = limits.hard,
            can = limits.hard.saturating_sub(reserve),
        )
    })
}

/// The accept loop's share of the descriptors: see the module
/// documentation.
pub(crate) struct Budget {
    slots: Arc<Semaphore>,
    overflow: Arc<Semaphore>,
}

/// One open socket's share of the [`Budget`]. Shared by everything that
/// holds the socket (the connection task, then the stream's task), and
/// given back when the last of them lets go.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    _permit: Arc<OwnedSemaphorePermit>,
}

/// What the accept loop does with a socket it just accepted.
pub(crate) enum Admit {
    /// Serve it as usual.
    Serve(Slot),
    /// Out of slots: answer probes, refuse the rest; the permit bounds how
    /// many such sockets are open at once.
    Overflow(OwnedSemaphorePermit),
    /// Out of slots and of overflow room: close it at once.
    Close,
}

impl Budget {
    /// The budget of a process whose soft limit is `soft` and that keeps
    /// `reserve` descriptors for itself (at least one slot, whatever the
    /// limit).
    pub(crate) fn new(soft: u64, reserve: u64) -> Self {
        let slots = soft
            .saturating_sub(reserve)
            .clamp(1, Semaphore::MAX_PERMITS as u64);
        Self {
            slots: Arc::new(Semaphore::new(usize::try_from(slots).unwrap_or(1))),
            overflow: Arc::new(Semaphore::new(OVERFLOW)),
        }
    }

    /// Takes a slot for a socket just accepted, if one is free.
    pub(crate) fn admit(&self) -> Admit {
        if let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() {
            return Admit::Serve(Slot {
                _permit: Arc::new(permit),
            });
        }
        match Arc::clone(&self.overflow).try_acquire_owned() {
            Ok(permit) => Admit::Overflow(permit),
            Err(_) => Admit::Close,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warning_names_the_limit_and_what_to_do() {
        let mut config = Config::default();
        config.limits.max_connections = 20_000;
        let low = Limits {
            before: 1024,
            soft: 10_000,
            hard: 10_000,
        };
        let said = warning(&config, &low).expect("a warning");
        assert!(said.contains("hard 10000"), "{said}");
        assert!(said.contains("limits.max_connections (20000)"), "{said}");
        assert!(said.contains("at least 20064"), "{said}");
        assert!(said.contains("at most 9936 connections"), "{said}");
        let enough = Limits {
            hard: 20_064,
            ..low
        };
        assert_eq!(warning(&config, &enough), None);
        // The webhook's calls need descriptors too.
        config.auth.webhook = Some(Default::default());
        let said = warning(&config, &enough).expect("webhook needs more");
        assert!(said.contains("plus 128 for crier itself"), "{said}");
    }

    #[test]
    fn slots_run_out_then_overflow_then_close() {
        let budget = Budget::new(66, 64);
        let first = budget.admit();
        let second = budget.admit();
        assert!(matches!(first, Admit::Serve(_)));
        assert!(matches!(second, Admit::Serve(_)));
        let overflow: Vec<Admit> = (0..OVERFLOW).map(|_| budget.admit()).collect();
        assert!(overflow.iter().all(|a| matches!(a, Admit::Overflow(_))));
        assert!(matches!(budget.admit(), Admit::Close));
        // A slot held by two owners comes back when both let go.
        let Admit::Serve(slot) = first else {
            unreachable!()
        };
        let copy = slot.clone();
        drop(slot);
        assert!(matches!(budget.admit(), Admit::Close));
        drop(copy);
        assert!(matches!(budget.admit(), Admit::Serve(_)));
        // A tiny limit still leaves one slot.
        assert!(matches!(Budget::new(10, 64).admit(), Admit::Serve(_)));
    }
}
