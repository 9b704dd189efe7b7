//! The `Switchboard-Signature` header: an HMAC-SHA256, keyed with the
//! endpoint's secret, over the Unix time of the attempt, a dot and the
//! exact body bytes.
//!
//! ```text
//! Switchboard-Signature: t=1717171717,v1=5f2b…(64 hex digits)
//! v1 = hex(HMAC-SHA256(secret, "1717171717" + "." + body))
//! ```
//!
//! The time is signed with the body so a receiver can refuse an old
//! request replayed by whoever captured it (docs/webhooks.md suggests a
//! five-minute tolerance); the delivery id in the body lets it drop a
//! second copy of an event it already handled. Each attempt is signed at
//! its own time, so a retry an hour later still passes that check.
//!
//! The `v1=` prefix names the scheme, so a later one can be sent beside it
//! while receivers move over. [`verify`] is what a Rust receiver needs
//! (the tests use their own HMAC, not this, to check [`sign`]).

use aws_lc_rs::hmac;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "switchboard-signature";

/// The signature of `body` sent at Unix second `t`: the header's value.
pub fn sign(secret: &[u8], t: u64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(t.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("t={t},v1={}", crate::edge::tls::hex(ctx.sign().as_ref()))
}

/// Why a signature is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No `t=` or no `v1=`, or they do not parse.
    #[error("malformed signature header")]
    Malformed,
    /// The signed time is further than the tolerance from now.
    #[error("signed at {t}, more than the tolerance away from now ({now})")]
    Stale {
        /// The signed time.
        t: u64,
        /// The receiver's time.
        now: u64,
    },
    /// No `v1` value matches the body.
    #[error("no signature matches the body")]
    Mismatch,
}

/// Checks a `Switchboard-Signature` header against `body` (the raw bytes
/// as received), at Unix second `now`, refusing a time more than
/// `tolerance_secs` away. Any of several `v1=` values may match (the
/// comparison is in constant time).
pub fn verify(secret: &[u8], header: &str, body: &[u8], now: u64, tolerance_secs: u64) -> Result<(), SignatureError> {
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v.parse::<u64>().map_err(|_| SignatureError::Malformed)?),
            Some(("v1", v)) => sigs.push(unhex(v).ok_or(SignatureError::Malformed)?),
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    if sigs.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if t.abs_diff(now) > tolerance_secs {
        return Err(SignatureError::Stale { t, now });
    }
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut signed = Vec::with_capacity(body.len() + 21);
    signed.extend_from_slice(t.to_string().as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(body);
    if sigs.iter().any(|s| hmac::verify(&key, &signed, s).is_ok()) { Ok(()) } else { Err(SignatureError::Mismatch) }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed vector, computed independently with
    /// `printf '%s' '1700000000.{"id":"x"}' | openssl dgst -sha256 -hmac 'whsec-0123456789abcdef'`
    /// (the example in docs/webhooks.md).
    #[test]
    fn signs_the_time_a_dot_and_the_body() {
        let got = sign(b"whsec-0123456789abcdef", 1_700_000_000, br#"{"id":"x"}"#);
        assert_eq!(got, format!("t=1700000000,v1={}", OPENSSL_VECTOR));
    }

    const OPENSSL_VECTOR: &str = "ffcc3087b2ccc7bc8c7614f2a2500a2cb8605108d6b4bb72c037de4f60d0bd08";

    #[test]
    fn verify_accepts_its_own_and_refuses_changes() {
        let secret = b"whsec-0123456789abcdef";
        let body = br#"{"type":"connect"}"#;
        let h = sign(secret, 1000, body);
        assert_eq!(verify(secret, &h, body, 1000, 300), Ok(()));
        assert_eq!(verify(secret, &h, body, 1300, 300), Ok(()));
        assert_eq!(verify(secret, &h, body, 1301, 300), Err(SignatureError::Stale { t: 1000, now: 1301 }));
        assert_eq!(verify(secret, &h, br#"{"type":"connecT"}"#, 1000, 300), Err(SignatureError::Mismatch));
        assert_eq!(verify(b"another-secret-of-16", &h, body, 1000, 300), Err(SignatureError::Mismatch));
        // The time is signed: moving it breaks the signature.
        let moved = h.replace("t=1000", "t=1001");
        assert_eq!(verify(secret, &moved, body, 1000, 300), Err(SignatureError::Mismatch));
        // A second scheme value beside it (rotation) is fine.
        let two = format!("{h},v1={}", "00".repeat(32));
        assert_eq!(verify(secret, &two, body, 1000, 300), Ok(()));
        for bad in ["", "t=1000", "v1=00", "t=x,v1=00", "t=1000,v1=0g", "t=1000,v1=abc"] {
            assert_eq!(verify(secret, bad, body, 1000, 300), Err(SignatureError::Malformed), "{bad:?}");
        }
    }
}
