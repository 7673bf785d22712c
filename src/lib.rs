//! crier: an event gateway. Apps publish to Redis (or over HTTP); browsers
//! receive the events over WebSocket or Server-Sent Events, from any number
//! of stateless instances.
//!
//! The data path, one module per box: `broker` → `hub` → `session` →
//! `transport`, with `protocol` defining what goes over the wire, `policy`
//! deciding who hears what, and [`server`] assembling it all;
//! docs/architecture.md draws the whole map. Public is only what the
//! binary uses: [`config`], [`cli`], [`server`] and [`fdlimit`] (the
//! open-file limit raised at start). The integration and fuzz tests reach
//! the internals they need through one `#[doc(hidden)]` module, `testing`,
//! which is not an API.

// The compiler finds what nothing uses: every item is only as visible as
// its users need, and everything public is documented.
#![warn(unreachable_pub, missing_docs)]

pub(crate) mod api;
pub(crate) mod app;
pub(crate) mod auth;
pub(crate) mod broker;
pub mod cli;
pub mod config;
pub(crate) mod events;
pub mod fdlimit;
pub(crate) mod history;
pub(crate) mod http;
pub(crate) mod hub;
pub(crate) mod lifecycle;
pub(crate) mod limits;
pub(crate) mod link;
pub(crate) mod metrics;
pub(crate) mod origin;
pub(crate) mod outbound;
pub(crate) mod policy;
pub(crate) mod presence;
pub(crate) mod protocol;
pub(crate) mod pusher;
pub(crate) mod redis_client;
pub(crate) mod refusal;
pub mod server;
pub(crate) mod session;
pub(crate) mod stall;
#[doc(hidden)]
pub mod testing;
pub(crate) mod transport;

pub use config::Config;
pub use server::{serve, start, Running};

/// This build's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
