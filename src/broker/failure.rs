//! What a Redis error means to the broker, decided in one place.
//!
//! redis-rs gives a server's refusal a kind for most error codes
//! (`READONLY`, `NOPERM`, `LOADING`, …) but folds every plain `ERR` into
//! one kind, so the few `ERR` replies crier acts on (a command or
//! subcommand Redis does not have, a function it does not hold) are told
//! apart here by the start of their detail, the words Redis puts after the
//! code. Nothing else in the broker reads an error's text.

/// What went wrong, as far as the broker's decisions go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RedisFailure {
    /// `ERR unknown command`: Redis lacks the command (functions before 7).
    NoSuchCommand,
    /// `ERR unknown subcommand`: Redis lacks the subcommand.
    NoSuchSubcommand,
    /// `ERR Function not found`: the library is not loaded.
    NoSuchFunction,
    /// `READONLY`: the server is a replica now.
    ReadOnly,
    /// `NOPERM`: the ACL user may not run the command or touch the key.
    NoPermission,
    /// Worth retrying soon: the connection broke or timed out, or Redis is
    /// loading its data or asks to try again.
    Transient,
    /// Anything else.
    Other,
}

impl RedisFailure {
    /// Redis has no such command or subcommand, or the ACL user may not
    /// run it: crier cannot ask this way.
    pub(crate) fn refused(self) -> bool {
        matches!(
            self,
            RedisFailure::NoSuchCommand
                | RedisFailure::NoSuchSubcommand
                | RedisFailure::NoPermission
        )
    }
}

/// Classifies `e` by its kind, its error code and, for a plain `ERR`, the
/// start of its detail.
pub(crate) fn classify(e: &redis::RedisError) -> RedisFailure {
    use redis::{ErrorKind, ServerErrorKind};
    match e.kind() {
        ErrorKind::Server(ServerErrorKind::ReadOnly) => return RedisFailure::ReadOnly,
        ErrorKind::Server(ServerErrorKind::NoPerm) => return RedisFailure::NoPermission,
        ErrorKind::Server(ServerErrorKind::BusyLoading | ServerErrorKind::TryAgain) => {
            return RedisFailure::Transient
        }
        _ => {}
    }
    if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
        return RedisFailure::Transient;
    }
    if e.code() != Some("ERR") {
        return RedisFailure::Other;
    }
    let detail = e.detail().unwrap_or_default();
    if detail.starts_with("unknown command") {
        RedisFailure::NoSuchCommand
    } else if detail.starts_with("unknown subcommand") {
        RedisFailure::NoSuchSubcommand
    } else if detail.starts_with("Function not found") {
        RedisFailure::NoSuchFunction
    } else {
        RedisFailure::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error redis-rs makes of `reply`, a server's error line.
    fn reply(line: &str) -> redis::RedisError {
        let value = redis::parse_redis_value(format!("-{line}\r\n").as_bytes())
            .expect("an error reply parses");
        value
            .extract_error()
            .expect_err("an error reply is an error")
    }

    #[test]
    fn server_replies_are_classified_by_code_and_detail() {
        let cases = [
            (
                "ERR unknown command 'FCALL', with args beginning with: 'crier_publish' ",
                RedisFailure::NoSuchCommand,
            ),
            (
                "ERR unknown command `FUNCTION`, with args beginning with: `LIST`, ",
                RedisFailure::NoSuchCommand,
            ),
            (
                "ERR unknown subcommand 'LIST'. Try FUNCTION HELP.",
                RedisFailure::NoSuchSubcommand,
            ),
            ("ERR Function not found", RedisFailure::NoSuchFunction),
            (
                "READONLY You can't write against a read only replica.",
                RedisFailure::ReadOnly,
            ),
            (
                "NOPERM User app has no permissions to run the 'function|list' command",
                RedisFailure::NoPermission,
            ),
            (
                "LOADING Redis is loading the dataset in memory",
                RedisFailure::Transient,
            ),
            (
                "TRYAGAIN Multiple keys request during rehashing of slot",
                RedisFailure::Transient,
            ),
            (
                "ERR wrong number of arguments for 'fcall' command",
                RedisFailure::Other,
            ),
            // The words only count where Redis puts them: first, after ERR.
            (
                "ERR Error running script: unknown command",
                RedisFailure::Other,
            ),
            (
                "WRONGTYPE Operation against a key holding the wrong kind of value",
                RedisFailure::Other,
            ),
        ];
        for (line, want) in cases {
            assert_eq!(classify(&reply(line)), want, "{line}");
        }
    }

    #[test]
    fn broken_connections_are_transient() {
        let io = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert_eq!(classify(&io), RedisFailure::Transient);
        let reset =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(classify(&reset), RedisFailure::Transient);
    }

    #[test]
    fn refused_means_absent_or_forbidden() {
        assert!(RedisFailure::NoSuchCommand.refused());
        assert!(RedisFailure::NoSuchSubcommand.refused());
        assert!(RedisFailure::NoPermission.refused());
        assert!(!RedisFailure::NoSuchFunction.refused());
        assert!(!RedisFailure::Transient.refused());
    }
}
