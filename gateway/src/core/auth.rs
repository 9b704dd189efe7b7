//! Connection tokens and capabilities.
//!
//! A connection token is a JWT (HS256, RS256, ES256 or EdDSA) whose claims
//! name the client (`sub`), bound its life (`exp`, `nbf`, `iat`), and grant
//! operations per channel pattern (`caps`, MQTT filter syntax):
//!
//! ```json
//! {"sub": "device-7", "exp": 1764349200,
//!  "caps": {"sensors/7/#": ["publish"], "chat/+": "subscribe,presence,history"}}
//! ```
//!
//! [`Verifier`] checks a token against the configured keys: the header's
//! `kid` picks the key (several keys allow rotation), the key's configured
//! algorithm must be the header's (so an RSA public key can never be used
//! as an HMAC secret, and `alg: none` is never accepted), and `exp` is
//! required. A token with an `aud` claim is accepted only when one of its
//! values is a configured audience (`[auth] audience`; none configured:
//! every token with `aud` is refused, as meant for another service); a
//! token without `aud` is accepted either way. [`Caps`] answers "may this client do `op` on this channel or
//! filter" — the same answer for every protocol, asked by the router.
//!
//! A client that presents no credentials at all (no token, no client
//! certificate) is refused, unless `[auth] anonymous_caps` is set: then it
//! gets those caps ([`Verifier::anonymous_caps`]), like a broker's
//! anonymous ACL. A token that fails verification is refused either way.
//!
//! Capability rules:
//!
//! | cap pattern | grants | does not grant |
//! |---|---|---|
//! | `chat/+` | `chat/a`, filter `chat/+` | `chat/a/b`, filter `chat/#`, `$presence/chat/a` |
//! | `chat/#` | `chat`, `chat/a/b`, filters `chat/+`, `chat/#` | `chatter`, filter `#` |
//! | `#` | every non-`$` channel and filter | `$...` channels |
//! | `$aws/#` | `$aws/things/1`, filter `$aws/+/1` | `aws/x` |
//!
//! A filter is granted only when the pattern covers every channel the
//! filter could match; as in MQTT (§4.7.2), a pattern starting with a
//! wildcard reaches no `$` name, so `$` channels are granted by patterns
//! that name their first level. Presence events (`$presence/<channel>`
//! subscriptions, `presence: true`) need the `presence` operation on the
//! base channel; no pattern grants a reserved name (`$SYS`, `$share`,
//! `$presence`: [`crate::core::channel::RESERVED_LEVELS`]). This module does no I/O and keeps no
//! state; it does not decide what open (dev) mode allows — [`Caps::all`] is
//! that decision, made by the router's configuration.

use std::collections::BTreeMap;
use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::core::channel::{PRESENCE_PREFIX, SHARE_PREFIX, is_reserved, validate_filter};

/// Why a token or a key configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token where one is required.
    #[error("a connection token is required")]
    Missing,
    /// Not a JWT, bad signature, unknown algorithm, expired, not yet valid…
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The header's `kid` names no configured key.
    #[error("unknown key id {0:?}")]
    UnknownKey(String),
    /// The claims are not what a connection token carries.
    #[error("invalid claims: {0}")]
    Claims(String),
    /// A key in the configuration cannot be used.
    #[error("key configuration: {0}")]
    Config(String),
}

/// An operation a capability grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Receive messages.
    Subscribe,
    /// Send messages.
    Publish,
    /// Enter/leave presence, see presence events and members.
    Presence,
    /// Read history.
    History,
}

impl Op {
    fn bit(self) -> u8 {
        match self {
            Op::Subscribe => 1,
            Op::Publish => 2,
            Op::Presence => 4,
            Op::History => 8,
        }
    }

    /// Parses `subscribe`, `publish`, `presence`, `history`.
    pub fn parse(name: &str) -> Option<Op> {
        match name.trim() {
            "subscribe" => Some(Op::Subscribe),
            "publish" => Some(Op::Publish),
            "presence" => Some(Op::Presence),
            "history" => Some(Op::History),
            _ => None,
        }
    }

    /// The claim name.
    pub fn name(self) -> &'static str {
        match self {
            Op::Subscribe => "subscribe",
            Op::Publish => "publish",
            Op::Presence => "presence",
            Op::History => "history",
        }
    }
}

/// Operations as they appear in a `caps` claim: a list or a comma string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OpsSpec {
    /// `["subscribe", "publish"]`.
    List(Vec<String>),
    /// `"subscribe,publish"`.
    Csv(String),
}

impl OpsSpec {
    fn bits(&self) -> Result<u8, AuthError> {
        let names: Vec<&str> = match self {
            OpsSpec::List(v) => v.iter().map(String::as_str).collect(),
            OpsSpec::Csv(s) => s.split(',').filter(|p| !p.trim().is_empty()).collect(),
        };
        names.iter().try_fold(0u8, |acc, n| {
            Op::parse(n).map(|op| acc | op.bit()).ok_or_else(|| AuthError::Claims(format!("unknown operation {n:?}")))
        })
    }
}

/// What a client may do, by channel pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caps {
    /// Open mode: everything the router allows anyone.
    all: bool,
    rules: Vec<(String, u8)>,
}

/// Whether `pattern` covers every channel `filter` can match.
fn covers(pattern: &str, filter: &str) -> bool {
    // No wildcard pattern reaches a `$` name (MQTT §4.7.2).
    if filter.starts_with('$') && pattern.starts_with(['+', '#']) {
        return false;
    }
    let mut p = pattern.split('/');
    let mut f = filter.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(pl), Some(fl)) if pl == fl && fl != "+" => {}
            (None, None) => return true,
            // `a/#` also covers `a` itself.
            (Some(_), None) => return pattern.ends_with("/#") && p.next().is_none() && is_parent(pattern, filter),
            _ => return false,
        }
    }
}

/// True when `pattern` is `filter/#`.
fn is_parent(pattern: &str, filter: &str) -> bool {
    pattern.strip_suffix("/#") == Some(filter)
}

impl Caps {
    /// Everything (open mode).
    pub fn all() -> Caps {
        Caps { all: true, rules: Vec::new() }
    }

    /// Nothing.
    pub fn none() -> Caps {
        Caps { all: false, rules: Vec::new() }
    }

    /// From a `caps` claim; patterns must be valid filters.
    pub fn from_claim(claim: &BTreeMap<String, OpsSpec>) -> Result<Caps, AuthError> {
        let mut rules = Vec::with_capacity(claim.len());
        for (pattern, ops) in claim {
            validate_filter(pattern).map_err(|e| AuthError::Claims(format!("cap pattern {pattern:?}: {e}")))?;
            rules.push((pattern.clone(), ops.bits()?));
        }
        Ok(Caps { all: false, rules })
    }

    /// Whether `op` is granted on everything `filter` (a channel name or an
    /// MQTT filter, possibly `$share/...` or `$presence/...`) can reach.
    pub fn allows(&self, op: Op, filter: &str) -> bool {
        if self.all {
            return true;
        }
        let filter = filter.strip_prefix(SHARE_PREFIX).and_then(|r| r.split_once('/')).map_or(filter, |(_, f)| f);
        // Presence events of a channel are the presence operation on it.
        let (op, filter) = match filter.strip_prefix(PRESENCE_PREFIX) {
            Some(base) => (Op::Presence, base),
            None => (op, filter),
        };
        if is_reserved(filter) {
            return false;
        }
        self.rules.iter().any(|(pattern, bits)| bits & op.bit() != 0 && covers(pattern, filter))
    }
}

/// The identity and rights a verified token carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `sub`: the client id.
    pub client_id: String,
    /// `caps`.
    pub caps: Caps,
    /// `exp`, Unix seconds.
    pub expires_at: u64,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    caps: BTreeMap<String, OpsSpec>,
    #[serde(default)]
    aud: Option<Audience>,
}

/// An `aud` claim: one string or a list (RFC 7519 §4.1.3).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn values(&self) -> &[String] {
        match self {
            Audience::One(a) => std::slice::from_ref(a),
            Audience::Many(v) => v,
        }
    }
}

/// One verification key from configuration. Exactly one of the key sources
/// must be set; `alg` is the only algorithm the key accepts.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Key id matched against the token header's `kid` (optional when only
    /// one key is configured).
    pub kid: Option<String>,
    /// `HS256`, `RS256`, `ES256` or `EdDSA`.
    pub alg: String,
    /// HMAC secret, inline (HS256).
    pub secret: Option<String>,
    /// Name of an environment variable holding the HMAC secret (HS256).
    pub secret_env: Option<String>,
    /// PEM public key, inline (RS256, ES256, EdDSA).
    pub public_key: Option<String>,
    /// Path of a PEM public key file (RS256, ES256, EdDSA).
    pub public_key_file: Option<String>,
}

impl KeyConfig {
    /// The HMAC secret of an HS256 key (inline, or from `secret_env`).
    fn hmac_secret(&self) -> Result<String, AuthError> {
        match (&self.secret, &self.secret_env) {
            (Some(s), _) => Ok(s.clone()),
            (_, Some(var)) => std::env::var(var)
                .map_err(|_| AuthError::Config(format!("key {:?}: environment variable {var} is not set", self.kid))),
            _ => Err(AuthError::Config(format!("key {:?} has no secret", self.kid))),
        }
    }
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Checks connection tokens against the configured keys.
pub struct Verifier {
    keys: Vec<Key>,
    leeway: u64,
    /// Caps of devices authenticated by a client certificate alone, with
    /// `{client_id}` in patterns standing for the certificate's id.
    cert_caps: BTreeMap<String, OpsSpec>,
    /// The audiences this gateway answers to; a token's `aud` must name
    /// one (empty: a token with `aud` is refused).
    audience: Vec<String>,
    /// What a client without any credentials may do; `None`: it is refused.
    anonymous: Option<std::sync::Arc<Caps>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<_> = self.keys.iter().map(|k| (k.kid.clone(), k.alg)).collect();
        f.debug_struct("Verifier")
            .field("keys", &kids)
            .field("leeway", &self.leeway)
            .field("audience", &self.audience)
            .finish()
    }
}

fn parse_alg(name: &str) -> Result<Algorithm, AuthError> {
    match name {
        "HS256" => Ok(Algorithm::HS256),
        "RS256" => Ok(Algorithm::RS256),
        "ES256" => Ok(Algorithm::ES256),
        "EdDSA" => Ok(Algorithm::EdDSA),
        other => Err(AuthError::Config(format!("unsupported algorithm {other:?} (use HS256, RS256, ES256 or EdDSA)"))),
    }
}

impl Verifier {
    /// Builds the key set from configuration and an optional JWKS file.
    pub fn new(keys: &[KeyConfig], jwks_file: Option<&Path>, leeway_secs: u64) -> Result<Verifier, AuthError> {
        let mut out = Vec::new();
        for k in keys {
            let alg = parse_alg(&k.alg)?;
            let sources = [&k.secret, &k.secret_env, &k.public_key, &k.public_key_file];
            if sources.iter().filter(|s| s.is_some()).count() != 1 {
                return Err(AuthError::Config(format!(
                    "key {:?}: give exactly one of secret, secret_env, public_key, public_key_file",
                    k.kid
                )));
            }
            let pem = match (&k.public_key, &k.public_key_file) {
                (Some(p), _) => Some(p.clone()),
                (_, Some(path)) => Some(
                    std::fs::read_to_string(path)
                        .map_err(|e| AuthError::Config(format!("key {:?}: cannot read {path}: {e}", k.kid)))?,
                ),
                _ => None,
            };
            let bad = |e: jsonwebtoken::errors::Error| AuthError::Config(format!("key {:?}: {e}", k.kid));
            let key = match (alg, pem) {
                (Algorithm::HS256, None) => {
                    let secret = k.hmac_secret()?;
                    if secret.len() < 32 {
                        return Err(AuthError::Config(format!(
                            "key {:?}: HS256 secrets need at least 32 bytes",
                            k.kid
                        )));
                    }
                    DecodingKey::from_secret(secret.as_bytes()).map_err(bad)?
                }
                (Algorithm::RS256, Some(pem)) => DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(bad)?,
                (Algorithm::ES256, Some(pem)) => DecodingKey::from_ec_pem(pem.as_bytes()).map_err(bad)?,
                (Algorithm::EdDSA, Some(pem)) => DecodingKey::from_ed_pem(pem.as_bytes()).map_err(bad)?,
                (alg, _) => {
                    return Err(AuthError::Config(format!(
                        "key {:?}: {alg:?} needs {}",
                        k.kid,
                        if alg == Algorithm::HS256 { "a secret" } else { "a public key" }
                    )));
                }
            };
            out.push(Key { kid: k.kid.clone(), alg, key });
        }
        if let Some(path) = jwks_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| AuthError::Config(format!("cannot read JWKS {}: {e}", path.display())))?;
            let set: jsonwebtoken::jwk::JwkSet =
                serde_json::from_str(&text).map_err(|e| AuthError::Config(format!("JWKS {}: {e}", path.display())))?;
            for jwk in &set.keys {
                let alg = jwk
                    .common
                    .key_algorithm
                    .and_then(|a| parse_alg(&format!("{a:?}").replace("EdDsa", "EdDSA")).ok())
                    .ok_or_else(|| {
                        AuthError::Config(format!("JWKS key {:?} has no supported \"alg\"", jwk.common.key_id))
                    })?;
                let key = DecodingKey::from_jwk(jwk).map_err(|e| AuthError::Config(format!("JWKS key: {e}")))?;
                out.push(Key { kid: jwk.common.key_id.clone(), alg, key });
            }
        }
        if out.is_empty() {
            return Err(AuthError::Config("token auth needs at least one key".into()));
        }
        Ok(Verifier {
            keys: out,
            leeway: leeway_secs,
            cert_caps: BTreeMap::new(),
            audience: Vec::new(),
            anonymous: None,
        })
    }

    /// The clock skew tolerated on `exp` and `nbf`, seconds: a token is
    /// valid until `exp + leeway`, and so is a session opened with it.
    pub fn leeway_secs(&self) -> u64 {
        self.leeway
    }

    /// Sets the caps of devices that authenticate by client certificate
    /// (MQTTS with mTLS) without a token. Checked here with a sample id so
    /// a bad pattern fails at start.
    pub fn with_cert_caps(mut self, caps: BTreeMap<String, OpsSpec>) -> Result<Verifier, AuthError> {
        self.cert_caps = caps;
        self.cert_caps("device").unwrap_or(Ok(Caps::none()))?;
        Ok(self)
    }

    /// Sets the audiences this gateway answers to (`[auth] audience`): a
    /// token with an `aud` claim is accepted only when one of its values is
    /// among them. Without any, tokens with `aud` are refused (they were
    /// minted for some other service). Tokens without `aud` are unaffected.
    pub fn with_audience(mut self, audience: Vec<String>) -> Result<Verifier, AuthError> {
        if audience.iter().any(|a| a.is_empty()) {
            return Err(AuthError::Config("an audience must not be empty".into()));
        }
        self.audience = audience;
        Ok(self)
    }

    /// Sets the caps of clients that present no credentials at all
    /// (`[auth] anonymous_caps`, a `caps` claim's shape); empty: such
    /// clients are refused. Patterns are checked here.
    pub fn with_anonymous_caps(mut self, caps: &BTreeMap<String, OpsSpec>) -> Result<Verifier, AuthError> {
        self.anonymous = match caps.is_empty() {
            true => None,
            false => Some(std::sync::Arc::new(
                Caps::from_claim(caps).map_err(|e| AuthError::Config(format!("anonymous_caps: {e}")))?,
            )),
        };
        Ok(self)
    }

    /// What a client without credentials may do, or `None` when it is
    /// refused (`[auth] anonymous_caps` not set).
    pub fn anonymous_caps(&self) -> Option<std::sync::Arc<Caps>> {
        self.anonymous.clone()
    }

    /// The caps of a certificate-authenticated device, or `None` when
    /// certificates alone do not authorize (`auth.cert_caps` empty). The id
    /// cannot widen a pattern: certificate ids never hold `+`, `#` or `/`.
    pub fn cert_caps(&self, client_id: &str) -> Option<Result<Caps, AuthError>> {
        if self.cert_caps.is_empty() {
            return None;
        }
        let claim: BTreeMap<String, OpsSpec> =
            self.cert_caps.iter().map(|(p, ops)| (p.replace("{client_id}", client_id), ops.clone())).collect();
        Some(Caps::from_claim(&claim))
    }

    /// A token's `aud` must name one of the configured audiences (RFC 7519
    /// §4.1.3: a recipient that does not identify itself with a value of a
    /// present `aud` must refuse the token).
    fn check_audience(&self, aud: &[String]) -> Result<(), AuthError> {
        if self.audience.is_empty() {
            return Err(AuthError::Claims(format!(
                "the token is meant for audience {aud:?} and this gateway accepts tokens with an aud claim only when \
                 [auth] audience names it"
            )));
        }
        if !aud.iter().any(|a| self.audience.contains(a)) {
            return Err(AuthError::Claims(format!(
                "the token is meant for audience {aud:?}, which is not one [auth] audience accepts"
            )));
        }
        Ok(())
    }

    /// Verifies a token: signature with the key its `kid` names (and that
    /// key's algorithm only), `exp` required, `nbf` honoured, `aud` (when
    /// present) one of the configured audiences, claims parsed.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let key = match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid.as_str()))
                .ok_or_else(|| AuthError::UnknownKey(kid.clone()))?,
            None if self.keys.len() == 1 => &self.keys[0],
            None => return Err(AuthError::Invalid("the token has no kid and several keys are configured".into())),
        };
        if header.alg != key.alg {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} does not match the key's {:?}",
                header.alg, key.alg
            )));
        }
        let mut validation = Validation::new(key.alg);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway;
        // Checked below against `[auth] audience`, with an error that says
        // what to configure (jsonwebtoken's says only "InvalidAudience").
        validation.validate_aud = false;
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let c = data.claims;
        if c.sub.is_empty() || c.sub.len() > 256 {
            return Err(AuthError::Claims("sub must be 1..=256 bytes".into()));
        }
        if let Some(aud) = &c.aud {
            self.check_audience(aud.values())?;
        }
        Ok(Principal { client_id: c.sub, caps: Caps::from_claim(&c.caps)?, expires_at: c.exp })
    }
}

/// Parses a `--cap` argument: `PATTERN=op,op` (e.g. `chat/#=subscribe,publish`).
pub fn parse_cap_arg(arg: &str) -> Result<(String, Vec<String>), AuthError> {
    let (pattern, ops) =
        arg.rsplit_once('=').ok_or_else(|| AuthError::Claims(format!("cap {arg:?} is not PATTERN=op,op")))?;
    validate_filter(pattern).map_err(|e| AuthError::Claims(format!("cap pattern {pattern:?}: {e}")))?;
    let ops: Vec<String> = ops.split(',').map(|o| o.trim().to_string()).filter(|o| !o.is_empty()).collect();
    if ops.is_empty() {
        return Err(AuthError::Claims(format!("cap {arg:?} names no operation")));
    }
    OpsSpec::List(ops.clone()).bits()?;
    Ok((pattern.to_string(), ops))
}

/// Mints a development token with an HS256 key from configuration (the
/// only kind of configured key that can sign: the others are public keys).
pub fn mint(
    key: &KeyConfig,
    sub: &str,
    caps: &BTreeMap<String, Vec<String>>,
    ttl_secs: u64,
    now_secs: u64,
) -> Result<String, AuthError> {
    if key.alg != "HS256" {
        return Err(AuthError::Config(format!(
            "key {:?} is {}: only HS256 keys (shared secrets) can mint tokens here",
            key.kid, key.alg
        )));
    }
    let secret = key.hmac_secret()?;
    if sub.is_empty() || sub.len() > 256 {
        return Err(AuthError::Claims("sub must be 1..=256 bytes".into()));
    }
    let claims = serde_json::json!({"sub": sub, "iat": now_secs, "exp": now_secs + ttl_secs, "caps": caps});
    let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
    header.kid = key.kid.clone();
    let enc =
        jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).map_err(|e| AuthError::Config(e.to_string()))?;
    jsonwebtoken::encode(&header, &claims, &enc).map_err(|e| AuthError::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    }

    fn caps(v: serde_json::Value) -> Caps {
        let claim: BTreeMap<String, OpsSpec> = serde_json::from_value(v).unwrap();
        Caps::from_claim(&claim).unwrap()
    }

    fn hs_verifier() -> Verifier {
        let key = KeyConfig {
            kid: Some("k1".into()),
            alg: "HS256".into(),
            secret: Some(SECRET.into()),
            ..Default::default()
        };
        Verifier::new(&[key], None, 0).unwrap()
    }

    fn hs_token(kid: Option<&str>, claims: serde_json::Value, secret: &str) -> String {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&h, &claims, &EncodingKey::from_secret(secret.as_bytes()).unwrap()).unwrap()
    }

    #[test]
    fn cap_rules_table() {
        let c = caps(json!({"chat/+": ["subscribe", "presence"], "sensors/#": "publish,history"}));
        let yes = [
            (Op::Subscribe, "chat/a"),
            (Op::Subscribe, "chat/+"),
            (Op::Presence, "chat/a"),
            (Op::Subscribe, "$presence/chat/a"),
            (Op::Subscribe, "$share/g/chat/+"),
            (Op::Publish, "sensors"),
            (Op::Publish, "sensors/1/t"),
            (Op::History, "sensors/1"),
        ];
        let no = [
            (Op::Subscribe, "chat/a/b"),
            (Op::Subscribe, "chat/#"),
            (Op::Subscribe, "#"),
            (Op::Publish, "chat/a"),
            (Op::Subscribe, "sensors/1"),
            (Op::Subscribe, "$presence/sensors/1"),
            (Op::Subscribe, "$presence/chat/a/b"),
            (Op::Publish, "sensorsx"),
            (Op::Publish, "$sys/x"),
            (Op::History, "chat/a"),
        ];
        for (op, f) in yes {
            assert!(c.allows(op, f), "{op:?} {f} should be allowed");
        }
        for (op, f) in no {
            assert!(!c.allows(op, f), "{op:?} {f} should be refused");
        }
        let everything = caps(json!({"#": ["subscribe"]}));
        assert!(everything.allows(Op::Subscribe, "a/b"));
        assert!(everything.allows(Op::Subscribe, "#"));
        assert!(!everything.allows(Op::Subscribe, "$presence/a"), "# does not reach $ names");
        assert!(!everything.allows(Op::Subscribe, "$aws/things/1"), "# does not reach $ names");
        let aws = caps(json!({"$aws/#": ["subscribe", "publish"], "$SYS/#": ["subscribe", "publish"]}));
        assert!(aws.allows(Op::Publish, "$aws/things/1"));
        assert!(aws.allows(Op::Subscribe, "$aws/+/1"));
        assert!(!aws.allows(Op::Publish, "aws/things/1"));
        assert!(!aws.allows(Op::Publish, "$SYS/x"), "no pattern grants a reserved name");
        assert!(Caps::all().allows(Op::Publish, "anything"));
        assert!(!Caps::none().allows(Op::Subscribe, "a"));
    }

    #[test]
    fn bad_caps_are_refused() {
        let bad: BTreeMap<String, OpsSpec> = serde_json::from_value(json!({"a/#/b": ["subscribe"]})).unwrap();
        assert!(Caps::from_claim(&bad).is_err());
        let bad: BTreeMap<String, OpsSpec> = serde_json::from_value(json!({"a": ["fly"]})).unwrap();
        assert!(Caps::from_claim(&bad).is_err());
    }

    #[test]
    fn valid_token_gives_principal() {
        let t = hs_token(Some("k1"), json!({"sub": "dev-1", "exp": now() + 60, "caps": {"a/#": "publish"}}), SECRET);
        let p = hs_verifier().verify(&t).unwrap();
        assert_eq!(p.client_id, "dev-1");
        assert!(p.caps.allows(Op::Publish, "a/b"));
        assert!(!p.caps.allows(Op::Subscribe, "a/b"));
    }

    #[test]
    fn refusals() {
        let v = hs_verifier();
        let ok = json!({"sub": "u", "exp": now() + 60});
        assert_eq!(v.verify(""), Err(AuthError::Missing));
        assert!(matches!(v.verify("not.a.jwt"), Err(AuthError::Invalid(_))));
        // Expired, not yet valid, missing exp, wrong signature, unknown kid.
        assert!(matches!(
            v.verify(&hs_token(Some("k1"), json!({"sub": "u", "exp": now() - 120}), SECRET)),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            v.verify(&hs_token(Some("k1"), json!({"sub": "u", "exp": now() + 60, "nbf": now() + 600}), SECRET)),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(v.verify(&hs_token(Some("k1"), json!({"sub": "u"}), SECRET)), Err(AuthError::Invalid(_))));
        assert!(matches!(
            v.verify(&hs_token(Some("k1"), ok.clone(), "another-secret-another-secret-xx")),
            Err(AuthError::Invalid(_))
        ));
        assert_eq!(v.verify(&hs_token(Some("k9"), ok.clone(), SECRET)), Err(AuthError::UnknownKey("k9".into())));
        // alg: none, hand-made.
        use base64::Engine as _;
        let b64 = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let none = format!("{}.{}.", b64(json!({"alg": "none", "typ": "JWT", "kid": "k1"})), b64(ok.clone()));
        assert!(matches!(v.verify(&none), Err(AuthError::Invalid(_))));
        // HS token presented to an RS key slot: algorithm mismatch.
        let rs_header = format!("{}.{}.sig", b64(json!({"alg": "RS256", "kid": "k1"})), b64(ok));
        assert!(matches!(v.verify(&rs_header), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn audience_is_checked_against_the_configured_one() {
        let claims = |aud: serde_json::Value| json!({"sub": "u", "exp": now() + 60, "aud": aud});
        let none = hs_verifier();
        let e = none.verify(&hs_token(Some("k1"), claims(json!("svc")), SECRET)).unwrap_err();
        assert!(matches!(&e, AuthError::Claims(m) if m.contains("[auth] audience")), "{e}");
        assert!(none.verify(&hs_token(Some("k1"), json!({"sub": "u", "exp": now() + 60}), SECRET)).is_ok());

        let v = hs_verifier().with_audience(vec!["switchboard".into(), "rt".into()]).unwrap();
        for ok in [json!("switchboard"), json!("rt"), json!(["other", "rt"])] {
            assert!(v.verify(&hs_token(Some("k1"), claims(ok.clone()), SECRET)).is_ok(), "{ok}");
        }
        for bad in [json!("other"), json!(["a", "b"]), json!([]), json!("Switchboard")] {
            let e = v.verify(&hs_token(Some("k1"), claims(bad.clone()), SECRET)).unwrap_err();
            assert!(matches!(e, AuthError::Claims(_)), "{bad}: {e}");
        }
        assert!(matches!(v.verify(&hs_token(Some("k1"), claims(json!(7)), SECRET)), Err(AuthError::Invalid(_))));
        assert!(v.verify(&hs_token(Some("k1"), json!({"sub": "u", "exp": now() + 60}), SECRET)).is_ok(), "no aud");
        assert!(hs_verifier().with_audience(vec![String::new()]).is_err());
    }

    #[test]
    fn anonymous_caps_are_checked_at_start_and_off_by_default() {
        assert!(hs_verifier().anonymous_caps().is_none(), "no credentials: refused by default");
        let claim: BTreeMap<String, OpsSpec> = serde_json::from_value(json!({"public/#": "subscribe"})).unwrap();
        let anon = hs_verifier().with_anonymous_caps(&claim).unwrap().anonymous_caps().expect("anonymous caps");
        assert!(anon.allows(Op::Subscribe, "public/a/b") && anon.allows(Op::Subscribe, "public/+"));
        assert!(!anon.allows(Op::Publish, "public/a") && !anon.allows(Op::Subscribe, "private/a"));
        assert!(!anon.allows(Op::Subscribe, "#"));
        assert!(hs_verifier().with_anonymous_caps(&BTreeMap::new()).unwrap().anonymous_caps().is_none());
        let bad: BTreeMap<String, OpsSpec> = serde_json::from_value(json!({"a/#/b": "subscribe"})).unwrap();
        assert!(matches!(hs_verifier().with_anonymous_caps(&bad), Err(AuthError::Config(_))));
        let bad: BTreeMap<String, OpsSpec> = serde_json::from_value(json!({"a": "fly"})).unwrap();
        assert!(hs_verifier().with_anonymous_caps(&bad).is_err());
    }

    #[test]
    fn minted_tokens_verify() {
        let key = KeyConfig {
            kid: Some("k1".into()),
            alg: "HS256".into(),
            secret: Some(SECRET.into()),
            ..Default::default()
        };
        let (pattern, ops) = parse_cap_arg("chat/#=subscribe, publish").unwrap();
        let caps: BTreeMap<String, Vec<String>> = [(pattern, ops)].into();
        let t = mint(&key, "alice", &caps, 3600, now()).unwrap();
        let p = hs_verifier().verify(&t).unwrap();
        assert_eq!(p.client_id, "alice");
        assert!(p.caps.allows(Op::Publish, "chat/x/y"));
        assert!(!p.caps.allows(Op::History, "chat/x"));
        assert!(parse_cap_arg("chat/#").is_err());
        assert!(parse_cap_arg("chat/#=").is_err());
        assert!(parse_cap_arg("a/#/b=subscribe").is_err());
        assert!(parse_cap_arg("a=fly").is_err());
        let rs = KeyConfig { alg: "RS256".into(), public_key: Some("x".into()), ..Default::default() };
        assert!(mint(&rs, "a", &caps, 60, now()).is_err());
    }

    #[test]
    fn key_configuration_errors() {
        let short = KeyConfig { alg: "HS256".into(), secret: Some("short".into()), ..Default::default() };
        assert!(Verifier::new(&[short], None, 0).is_err());
        let two = KeyConfig {
            alg: "HS256".into(),
            secret: Some(SECRET.into()),
            public_key: Some("x".into()),
            ..Default::default()
        };
        assert!(Verifier::new(&[two], None, 0).is_err());
        let rs_no_key = KeyConfig { alg: "RS256".into(), secret: Some(SECRET.into()), ..Default::default() };
        assert!(Verifier::new(&[rs_no_key], None, 0).is_err());
        let bad_alg = KeyConfig { alg: "HS512".into(), secret: Some(SECRET.into()), ..Default::default() };
        assert!(Verifier::new(&[bad_alg], None, 0).is_err());
        assert!(Verifier::new(&[], None, 0).is_err());
    }
}
