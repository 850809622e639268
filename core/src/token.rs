//! What can be read from a service-account token without verifying it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;

/// The `exp` claim of a JWT, read WITHOUT verifying the signature: only good for
/// deciding when to look again (the shim re-reading its token file) or for bounding how
/// long something derived from a verified answer may be kept (the broker's token cache).
/// A forged value can at worst cause an early look.
pub fn unverified_exp(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(exp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", b(r#"{"alg":"RS256"}"#), b(claims))
    }

    #[test]
    fn exp_is_read_and_anything_else_is_none() {
        assert_eq!(
            unverified_exp(&jwt(r#"{"exp":1700000000,"sub":"x"}"#)),
            UNIX_EPOCH.checked_add(Duration::from_secs(1_700_000_000))
        );
        assert_eq!(unverified_exp(&jwt(r#"{"sub":"x"}"#)), None);
        assert_eq!(unverified_exp(&jwt(r#"{"exp":"soon"}"#)), None);
        assert_eq!(unverified_exp("not-a-jwt"), None);
        assert_eq!(unverified_exp("a.!!!.c"), None);
    }
}
