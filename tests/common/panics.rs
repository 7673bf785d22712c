//! Makes a panic inside crier fail the test that caused it.
//!
//! In-process crier instances run on the test's runtime: a panic in a
//! connection task is caught by tokio, printed into the test's captured
//! output, and — the test passing — never seen. Every [`super::crier::Instance`]
//! installs this hook, which records every panic raised outside the tests'
//! own code; the instance's `Drop` then fails the test if crier panicked
//! while it ran. (The child-process instances check their log instead.)

use std::sync::{Mutex, Once};

static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Installs the hook (once per test binary).
pub fn watch() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let location = info.location().map(|l| l.to_string()).unwrap_or_default();
            // A test's own assertions and helpers live under tests/.
            if !location.starts_with("tests/") {
                let message = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                record(format!("panicked at {location}: {message}"));
            }
            previous(info);
        }));
    });
}

fn record(line: String) {
    PANICS.lock().unwrap_or_else(|e| e.into_inner()).push(line);
}

/// How many panics were recorded so far.
pub fn count() -> usize {
    PANICS.lock().unwrap_or_else(|e| e.into_inner()).len()
}

/// Fails the calling test if crier panicked since `before` (a [`count`]).
pub fn assert_none_since(before: usize) {
    if std::thread::panicking() {
        return;
    }
    let panics = PANICS.lock().unwrap_or_else(|e| e.into_inner());
    if panics.len() > before {
        panic!(
            "crier panicked while this test ran: {:?}",
            &panics[before..]
        );
    }
}

/// Fails the calling test if a crier child process logged a panic.
pub fn assert_log_clean(log: &str) {
    if std::thread::panicking() {
        return;
    }
    if let Some(line) = log.lines().find(|l| l.contains("panicked at")) {
        panic!("the crier process panicked: {line}");
    }
}
