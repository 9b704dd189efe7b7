//! Helpers shared by the token-auth tests: a gateway in `[auth] mode =
//! "token"` with one key of every algorithm (HS256 inline, RS256 inline,
//! ES256 from a file, EdDSA from a JWKS file; test keys in `tests/keys/`),
//! token minting (valid and every kind of forgery), and the MQTT pieces no
//! client library sends: a CONNECT with a password and the MQTT 5
//! Authentication Method / Data, and AUTH packets.
//!
//! The raw packet helpers live in `common_mqtt`, which a binary using this
//! module declares too.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use switchboard::core::auth::KeyConfig;
use switchboard::edge::config::{AuthMode, Config};
use switchboard_tests::TestGateway;

use crate::common_mqtt::{RawPacket, mqtt_str, packet, varint};

/// The HS256 secret of key `k1`.
pub const SECRET: &str = "test-secret-test-secret-test-secret!";
/// The REST API key.
pub const API_KEY: &str = "server-key";

/// Unix seconds.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `tests/keys/NAME`.
pub fn key_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("keys").join(name)
}

fn key_text(name: &str) -> String {
    std::fs::read_to_string(key_path(name)).unwrap_or_else(|e| panic!("test key {name}: {e}"))
}

/// Connection-token claims: `sub`, `exp` = now + `ttl` seconds, `caps`.
pub fn claims(sub: &str, ttl: i64, caps: Value) -> Value {
    json!({"sub": sub, "iat": now(), "exp": now() as i64 + ttl, "caps": caps})
}

/// Signs `claims` with `alg`, naming `kid` in the header.
pub fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&h, claims, key).expect("encode a test token")
}

/// An HMAC key from a secret.
fn hmac(secret: &[u8]) -> EncodingKey {
    EncodingKey::from_secret(secret).expect("HMAC test key")
}

/// HS256 with key `k1`.
pub fn hs(claims: &Value) -> String {
    sign(Algorithm::HS256, Some("k1"), &hmac(SECRET.as_bytes()), claims)
}

/// RS256 with key `rs1`.
pub fn rs(claims: &Value) -> String {
    let key = EncodingKey::from_rsa_pem(key_text("rsa_private.pem").as_bytes()).expect("RSA test key");
    sign(Algorithm::RS256, Some("rs1"), &key, claims)
}

/// ES256 with key `es1`.
pub fn es(claims: &Value) -> String {
    let key = EncodingKey::from_ec_pem(key_text("ec_private.pem").as_bytes()).expect("EC test key");
    sign(Algorithm::ES256, Some("es1"), &key, claims)
}

/// EdDSA with key `ed1` (configured through the JWKS file).
pub fn ed(claims: &Value) -> String {
    let key = EncodingKey::from_ed_pem(key_text("ed_private.pem").as_bytes()).expect("Ed25519 test key");
    sign(Algorithm::EdDSA, Some("ed1"), &key, claims)
}

/// `claims` signed once with each configured algorithm, named by algorithm
/// and key source.
pub fn every_algorithm(claims: &Value) -> [(&'static str, String); 4] {
    [("HS256 inline", hs(claims)), ("RS256 inline", rs(claims)), ("ES256 file", es(claims)), ("EdDSA JWKS", ed(claims))]
}

/// A valid HS256 token for `sub`, living `ttl` seconds, with `caps`.
pub fn token(sub: &str, ttl: i64, caps: Value) -> String {
    hs(&claims(sub, ttl, caps))
}

/// base64url without padding (RFC 4648 §5), as JWT segments are.
fn b64(v: &Value) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = v.to_string().into_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// An unsigned token (`alg: none`) naming key `k1`.
pub fn alg_none(claims: &Value) -> String {
    format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT", "kid": "k1"})), b64(claims))
}

/// The HS/RS confusion attack: HS256, signed with the RS256 key's public
/// PEM as the HMAC secret, naming the RS256 key `rs1`.
pub fn hs_rs_confusion(claims: &Value) -> String {
    let pem = key_text("rsa_public.pem");
    sign(Algorithm::HS256, Some("rs1"), &hmac(pem.as_bytes()), claims)
}

/// Every way a token can be refused, with a name: no token, expired, not
/// yet valid, wrong signature, `alg: none`, HS/RS confusion, unknown `kid`,
/// no `exp`, no `kid` while several keys are configured, not a JWT. Each
/// would otherwise be valid for `sub`.
pub fn bad_tokens(sub: &str, caps: &Value) -> Vec<(&'static str, String)> {
    let good = claims(sub, 60, caps.clone());
    let mut expired = good.clone();
    expired["exp"] = json!(now() - 120);
    let mut not_yet = good.clone();
    not_yet["nbf"] = json!(now() + 600);
    let mut no_exp = good.clone();
    no_exp.as_object_mut().expect("object").remove("exp");
    let wrong_secret = hmac(b"another-secret-another-secret-another");
    vec![
        ("no token", String::new()),
        ("expired", hs(&expired)),
        ("not yet valid (nbf)", hs(&not_yet)),
        ("wrong signature", sign(Algorithm::HS256, Some("k1"), &wrong_secret, &good)),
        ("alg: none", alg_none(&good)),
        ("HS/RS key confusion", hs_rs_confusion(&good)),
        ("unknown kid", sign(Algorithm::HS256, Some("k9"), &hmac(SECRET.as_bytes()), &good)),
        ("no exp", hs(&no_exp)),
        ("no kid, several keys", sign(Algorithm::HS256, None, &hmac(SECRET.as_bytes()), &good)),
        ("not a JWT", "not-a-token".into()),
    ]
}

/// Token auth with one key per algorithm, no clock leeway, an API key.
pub fn token_auth(cfg: &mut Config) {
    cfg.auth.mode = AuthMode::Token;
    cfg.auth.leeway = Duration::ZERO;
    cfg.auth.keys = vec![
        KeyConfig { kid: Some("k1".into()), alg: "HS256".into(), secret: Some(SECRET.into()), ..Default::default() },
        KeyConfig {
            kid: Some("rs1".into()),
            alg: "RS256".into(),
            public_key: Some(key_text("rsa_public.pem")),
            ..Default::default()
        },
        KeyConfig {
            kid: Some("es1".into()),
            alg: "ES256".into(),
            public_key_file: Some(key_path("ec_public.pem").display().to_string()),
            ..Default::default()
        },
    ];
    cfg.auth.jwks_file = key_path("jwks.json").display().to_string();
    cfg.rest.api_keys = vec![API_KEY.into()];
}

/// A gateway with [`token_auth`].
pub async fn gateway() -> anyhow::Result<TestGateway> {
    TestGateway::start_with(token_auth).await
}

/// A gateway with [`token_auth`], then `tweak`.
pub async fn gateway_with(tweak: impl FnOnce(&mut Config)) -> anyhow::Result<TestGateway> {
    TestGateway::start_with(|cfg| {
        token_auth(cfg);
        tweak(cfg);
    })
    .await
}

// ---------------------------------------------------------------------------
// MQTT packets no client library sends.

/// An MQTT 5 property holding a string or binary.
fn prop(id: u8, value: &[u8], out: &mut Vec<u8>) {
    out.push(id);
    mqtt_str(value, out);
}

/// A clean-start CONNECT (`level` 4 or 5) with a password, and for MQTT 5
/// optionally the Authentication Method (0x15) and Data (0x16).
pub fn connect_with(
    level: u8,
    client_id: &str,
    keep_alive: u16,
    password: Option<&str>,
    method: Option<&str>,
    data: Option<&str>,
) -> Vec<u8> {
    let mut b = Vec::new();
    mqtt_str(b"MQTT", &mut b);
    b.push(level);
    b.push(if password.is_some() { 0xC2 } else { 0x02 });
    b.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        let mut props = Vec::new();
        if let Some(m) = method {
            prop(0x15, m.as_bytes(), &mut props);
        }
        if let Some(d) = data {
            prop(0x16, d.as_bytes(), &mut props);
        }
        varint(props.len(), &mut b);
        b.extend(props);
    }
    mqtt_str(client_id.as_bytes(), &mut b);
    if let Some(p) = password {
        mqtt_str(b"user", &mut b);
        mqtt_str(p.as_bytes(), &mut b);
    }
    packet(0x10, &b)
}

/// An MQTT 5 AUTH: `reason`, then the method and data properties if given.
pub fn auth_packet(reason: u8, method: Option<&str>, data: Option<&str>) -> Vec<u8> {
    let mut props = Vec::new();
    if let Some(m) = method {
        prop(0x15, m.as_bytes(), &mut props);
    }
    if let Some(d) = data {
        prop(0x16, d.as_bytes(), &mut props);
    }
    let mut b = vec![reason];
    varint(props.len(), &mut b);
    b.extend(props);
    packet(0xF0, &b)
}

/// The reason and Authentication Method of an AUTH from the server.
pub fn parse_auth(p: &RawPacket) -> Option<(u8, Option<String>)> {
    if p.kind() != 15 {
        return None;
    }
    let Some((&reason, rest)) = p.body.split_first() else { return Some((0, None)) };
    // Property length (one byte for the small AUTH the server sends), then
    // properties; the method is 0x15 + a two-byte-length string.
    let props = rest.get(1..).unwrap_or_default();
    let method = match props {
        [0x15, hi, lo, tail @ ..] => {
            let len = usize::from(u16::from_be_bytes([*hi, *lo]));
            tail.get(..len).map(|m| String::from_utf8_lossy(m).into_owned())
        }
        _ => None,
    };
    Some((reason, method))
}

/// A SUBSCRIBE (MQTT 5 with the user properties given) for one filter.
pub fn subscribe_with(level: u8, pkid: u16, filter: &str, qos: u8, user_properties: &[(&str, &str)]) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    if level == 5 {
        let mut props = Vec::new();
        for (k, v) in user_properties {
            props.push(0x26);
            mqtt_str(k.as_bytes(), &mut props);
            mqtt_str(v.as_bytes(), &mut props);
        }
        varint(props.len(), &mut b);
        b.extend(props);
    }
    mqtt_str(filter.as_bytes(), &mut b);
    b.push(qos);
    packet(0x82, &b)
}

/// The codes of a SUBACK (granted QoS or failure reason).
pub fn suback_codes(p: &RawPacket, level: u8) -> Option<Vec<u8>> {
    if p.kind() != 9 {
        return None;
    }
    let rest = p.body.get(2..)?;
    if level == 4 {
        return Some(rest.to_vec());
    }
    // A one-byte property length: the server sends no SUBACK properties.
    let (&props_len, codes) = rest.split_first()?;
    codes.get(usize::from(props_len)..).map(<[u8]>::to_vec)
}

/// The reason of a PUBACK (0 when the short form omits it).
pub fn puback_reason(p: &RawPacket) -> Option<u8> {
    (p.kind() == 4).then(|| p.body.get(2).copied().unwrap_or(0))
}

// ---------------------------------------------------------------------------
// The caps matrix, shared with every protocol's tests.

/// An operation a cap grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    /// Receive messages.
    Subscribe,
    /// Send messages.
    Publish,
    /// Presence enter/leave/members/events.
    Presence,
    /// History reads and rewind.
    History,
}

/// The caps of the matrix token: `chat/+` grants everything on `chat/a` and
/// nothing on `chat/a/b` (nor on `other`); `no-X/x` grants everything but X.
/// An action is allowed on a channel exactly when [`granted`] holds every
/// operation it needs.
pub fn matrix_caps() -> Value {
    json!({
        "chat/+": ["subscribe", "publish", "presence", "history"],
        "no-sub/x": "publish,presence,history",
        "no-pub/x": "subscribe,presence,history",
        "no-pres/x": "subscribe,publish,history",
        "no-hist/x": "subscribe,publish,presence",
    })
}

/// What the matrix token grants on `channel`.
pub fn granted(channel: &str) -> BTreeSet<Op> {
    use Op::{History as H, Presence as Pr, Publish as P, Subscribe as S};
    let all = [S, P, Pr, H];
    let but = |op: Op| all.into_iter().filter(|o| *o != op).collect();
    match channel {
        "chat/a" => all.into(),
        "no-sub/x" => but(S),
        "no-pub/x" => but(P),
        "no-pres/x" => but(Pr),
        "no-hist/x" => but(H),
        _ => BTreeSet::new(),
    }
}

/// The channels of the caps matrix.
pub const CHANNELS: [&str; 7] = ["chat/a", "chat/a/b", "other", "no-sub/x", "no-pub/x", "no-pres/x", "no-hist/x"];
