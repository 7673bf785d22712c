//! The wire protocols clients speak. Each file is framing only: it turns
//! client frames into calls on a [`crate::session::Session`] and the
//! session's events into bytes. A new wire protocol is one more file here.

pub(crate) mod deflate;
pub(crate) mod pusher;
pub(crate) mod rfc6455;
pub(crate) mod sse;
pub(crate) mod websocket;
pub(crate) mod ws;
