//! How payload bytes travel in JSON, losslessly.
//!
//! A payload is arbitrary bytes. In the JSON mapping it takes exactly one of
//! three fields, chosen by [`classify`]:
//!
//! | payload bytes | JSON field | example |
//! |---|---|---|
//! | a JSON value with no surrounding white space, other than `null`, that parses completely (numbers within `f64`, no lone surrogate escapes, nesting at most 128 deep) | `"data"`, inlined verbatim | `{"t":21.5}` → `"data":{"t":21.5}` |
//! | other valid UTF-8 | `"text"`, a JSON string | `hello` → `"text":"hello"` |
//! | anything else | `"data_b64"`, standard base64 with padding | `\x00\xff` → `"data_b64":"AP8="` |
//!
//! Decoding accepts any of the three and yields the exact bytes, so every
//! payload survives a round trip byte for byte — an MQTT device's binary
//! reading reaches a JSON client intact. `data` is copied verbatim from the
//! frame (not re-serialised), so `{"a": 1}` keeps its space.
//!
//! The rule is decided from the bytes alone, the same way at every hop, so
//! a hostile payload is decided once: `1e999`, `"\ud800"` or JSON nested
//! deeper than 128 is grammatical JSON that parsers refuse or change
//! (serde_json refuses all three; `JSON.parse` turns `1e999` into
//! `Infinity`), so it travels as `text`, a string every parser reads back to
//! the same bytes.

use base64::Engine as _;
use serde_json::value::RawValue;

/// The JSON form a payload takes.
#[derive(Debug, Clone, Copy)]
pub enum PayloadForm<'a> {
    /// The bytes are a JSON value, inlined verbatim as `data`.
    Json(&'a RawValue),
    /// The bytes are UTF-8 text, carried as the string `text`.
    Text(&'a str),
    /// Anything else, carried base64-encoded as `data_b64`.
    Binary,
}

/// Chooses the JSON form of `payload` (see the module docs).
pub fn classify(payload: &[u8]) -> PayloadForm<'_> {
    let Ok(text) = std::str::from_utf8(payload) else {
        return PayloadForm::Binary;
    };
    let starts_like_json = matches!(payload.first(), Some(b'{' | b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f'));
    if starts_like_json
        && let Ok(raw) = serde_json::from_str::<&RawValue>(text)
        && raw.get().len() == text.len()
        && parses_completely(text)
    {
        return PayloadForm::Json(raw);
    }
    PayloadForm::Text(text)
}

/// Whether a JSON parser that checks number ranges, surrogate pairs and
/// depth (serde_json) reads `text` without error: only then is inlining it
/// safe for every client.
fn parses_completely(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text).is_ok()
}

/// Standard base64 with padding, as used by `data_b64`.
pub fn encode_b64(payload: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(payload)
}

/// Decodes `data_b64`.
pub fn decode_b64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    base64::engine::general_purpose::STANDARD.decode(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_table() {
        assert!(matches!(classify(br#"{"t":21.5}"#), PayloadForm::Json(_)));
        assert!(matches!(classify(b"[1,2]"), PayloadForm::Json(_)));
        assert!(matches!(classify(b"42"), PayloadForm::Json(_)));
        assert!(matches!(classify(b"\"hi\""), PayloadForm::Json(_)));
        assert!(matches!(classify(b"true"), PayloadForm::Json(_)));
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for text in ["null", " 42", "42\n", "hello", "", "{bad", "1e999", r#""\ud800""#, r#"{"a":[1e400]}"#, &deep] {
            assert!(matches!(classify(text.as_bytes()), PayloadForm::Text(t) if t == text), "{text:?}");
        }
        assert!(matches!(classify(b"\x00\xff"), PayloadForm::Binary));
        assert_eq!(encode_b64(b"\x00\xff"), "AP8=");
        assert_eq!(decode_b64("AP8=").unwrap(), b"\x00\xff");
    }
}
