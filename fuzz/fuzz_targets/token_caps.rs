//! Token parsing and capability matching: any token text is verified or
//! refused without a panic; any `caps` claim parses or is refused; and caps
//! are sound — when a filter is granted, every concrete channel the filter
//! matches is granted too (a cap can never leak more through a wildcard).
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchboard::core::auth::{Caps, KeyConfig, Op, OpsSpec, Verifier};
use switchboard_proto::topic::filter_matches;

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let key = KeyConfig {
            kid: Some("k1".into()),
            alg: "HS256".into(),
            secret: Some("fuzz-secret-fuzz-secret-fuzz-secret".into()),
            ..Default::default()
        };
        Verifier::new(&[key], None, 0).expect("key")
    })
}

/// A concrete channel the filter matches: `+` → a level, `#` → two levels.
fn instance(filter: &str) -> String {
    filter.split('/').map(|l| match l {
        "+" => "x",
        "#" => "x/y",
        other => other,
    }).collect::<Vec<_>>().join("/")
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut parts = text.splitn(3, '\n');
    let (token, caps_json, filter) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let _ = verifier().verify(token);
    let Ok(claim) = serde_json::from_str::<BTreeMap<String, OpsSpec>>(caps_json) else { return };
    let Ok(caps) = Caps::from_claim(&claim) else { return };
    for op in [Op::Subscribe, Op::Publish, Op::Presence, Op::History] {
        if caps.allows(op, filter) {
            let channel = instance(filter);
            if filter_matches(filter, &channel) {
                assert!(caps.allows(op, &channel), "{op:?} granted on {filter:?} but not on {channel:?}");
            }
        }
    }
});
