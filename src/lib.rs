//! crier: an event gateway. Apps publish to Redis (or over HTTP); browsers
//! receive the events over WebSocket or Server-Sent Events, from any number
//! of stateless instances.
//!
//! The data path, one module per box: [`broker`] → [`hub`] → [`transport`],
//! with [`protocol`] defining what goes over the wire, [`policy`] deciding who
//! hears what, and [`server`] assembling it all.

pub mod api;
pub mod app;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod config;
pub mod history;
pub mod http;
pub mod hub;
pub mod lifecycle;
pub mod metrics;
pub mod origin;
pub mod policy;
pub mod protocol;
pub mod server;
pub mod stall;
pub mod transport;

pub use config::Config;
pub use server::{serve, start, Running};

/// This build's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
