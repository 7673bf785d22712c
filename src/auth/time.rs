//! Credential times — a token's `exp`, `nbf` and `iat`, a session's expiry —
//! parsed once into a checked [`SystemTime`].
//!
//! RFC 7519 makes a NumericDate a JSON number of seconds that may have a
//! fraction, so integers and floats are both accepted. Everything the rest
//! of crier does with these times (deadlines, `expiring` notices) must not
//! overflow, so a time outside 1970..=9999 is refused here, as a bad
//! credential, and never reaches clock arithmetic.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// 9999-12-31T23:59:59Z, the latest time a credential may name.
pub(super) const LATEST_SECS: u64 = 253_402_300_799;

/// A NumericDate (seconds since the epoch, integer or float).
pub(super) fn from_secs(value: &Value) -> Option<SystemTime> {
    checked(value, Unit::Secs)
}

/// Milliseconds since the epoch (what session stores such as
/// express-session write when they store a number).
pub(super) fn from_millis(value: &Value) -> Option<SystemTime> {
    checked(value, Unit::Millis)
}

#[derive(Clone, Copy)]
enum Unit {
    Secs,
    Millis,
}

fn checked(value: &Value, unit: Unit) -> Option<SystemTime> {
    let Value::Number(n) = value else {
        return None;
    };
    let offset = match (n.as_u64(), unit) {
        (Some(whole), Unit::Secs) => Duration::from_secs(whole),
        (Some(whole), Unit::Millis) => Duration::from_millis(whole),
        (None, Unit::Secs) => Duration::try_from_secs_f64(n.as_f64()?).ok()?,
        (None, Unit::Millis) => Duration::try_from_secs_f64(n.as_f64()? / 1000.0).ok()?,
    };
    if offset.as_secs() > LATEST_SECS {
        return None;
    }
    UNIX_EPOCH.checked_add(offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn secs(t: SystemTime) -> f64 {
        t.duration_since(UNIX_EPOCH)
            .expect("after epoch")
            .as_secs_f64()
    }

    #[test]
    fn integers_and_floats_are_numeric_dates() {
        assert_eq!(from_secs(&json!(1_700_000_000)).map(secs), Some(1.7e9));
        assert_eq!(
            from_secs(&json!(1_700_000_000.5)).map(secs),
            Some(1_700_000_000.5)
        );
        assert_eq!(
            from_millis(&json!(1_700_000_000_250u64)).map(secs),
            Some(1_700_000_000.25)
        );
        assert_eq!(from_millis(&json!(1.5e12)).map(secs), Some(1.5e9));
        assert_eq!(
            from_secs(&json!(LATEST_SECS)).map(secs),
            Some(LATEST_SECS as f64)
        );
    }

    #[test]
    fn out_of_range_and_non_numbers_are_refused() {
        for bad in [
            json!(LATEST_SECS + 1),
            json!(9_223_372_036_854_775_808u64),
            json!(u64::MAX),
            json!(1e300),
            json!(-1),
            json!(-0.5),
            json!("1700000000"),
            json!(null),
            json!([1]),
        ] {
            assert_eq!(from_secs(&bad), None, "{bad}");
        }
        assert_eq!(from_millis(&json!(u64::MAX)), None);
        assert_eq!(from_millis(&json!(-5)), None);
    }
}
