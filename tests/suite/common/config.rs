//! Test configurations as values: a tree (`serde_json::Value`) merged with
//! each test's overlay and written as YAML by the crate's YAML library, so
//! a test says `node.set("api.request_timeout", "2s")` or passes
//! `json!({"api": {...}})` instead of patching indented text.

use serde_json::{Map, Value, json};

/// Merges `overlay` into `base`: mappings key by key (recursively), any
/// other value replaces what was there; a `null` removes the key.
pub fn merge(base: &mut Value, overlay: Value) {
    merge_into(base, overlay, false);
}

/// `overlays` merged in order into one overlay (a `null` in one stays, to
/// remove its key from the tree the result is merged into).
pub fn merged(overlays: impl IntoIterator<Item = Value>) -> Value {
    let mut tree = json!({});
    for overlay in overlays {
        merge_into(&mut tree, overlay, true);
    }
    tree
}

fn merge_into(base: &mut Value, overlay: Value, keep_nulls: bool) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                if value.is_null() && !keep_nulls {
                    base.remove(&key);
                } else if let Some(slot) = base.get_mut(&key) {
                    merge_into(slot, value, keep_nulls);
                } else {
                    let mut fresh = if value.is_object() {
                        json!({})
                    } else {
                        Value::Null
                    };
                    merge_into(&mut fresh, value, keep_nulls);
                    base.insert(key, fresh);
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

/// The overlay that sets the dotted `path` (`api.events.max_idle`) to
/// `value`.
pub fn at(path: &str, value: impl Into<Value>) -> Value {
    path.rsplit('.').fold(value.into(), |inner, key| {
        let mut map = Map::new();
        map.insert(key.to_string(), inner);
        Value::Object(map)
    })
}

/// The value at the dotted `path`, if any.
pub fn get<'a>(tree: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(tree, |node, key| node.get(key))
}

/// The tree as keepd reads it.
pub fn to_yaml(tree: &Value) -> String {
    serde_norway::to_string(tree).expect("a configuration tree serialises")
}

/// `api.rate_limits` high enough that only tests of the limits meet them.
pub fn unlimited_rates() -> Value {
    json!({"api": {"rate_limits": {
        "auth_per_minute": 100000,
        "account_per_second": 100000,
        "account_burst": 100000,
        "address_per_second": 100000,
        "address_burst": 100000,
    }}})
}

#[test]
fn overlays_merge_key_by_key_and_null_removes() {
    let mut tree = json!({"api": {"listen": "127.0.0.1:0", "rate_limits": {"a": 1, "b": 2}}});
    merge(
        &mut tree,
        merged([
            at("api.rate_limits.b", 3),
            json!({"api": {"listen": null}, "log": {"level": "debug"}}),
        ]),
    );
    assert_eq!(
        tree,
        json!({"api": {"rate_limits": {"a": 1, "b": 3}}, "log": {"level": "debug"}})
    );
    assert_eq!(get(&tree, "api.rate_limits.b"), Some(&json!(3)));
    let yaml = to_yaml(&json!({"tls": {"min_version": "1.3"}, "n": 5, "s": "2s"}));
    let back: Value = serde_norway::from_str(&yaml).unwrap();
    assert_eq!(
        back,
        json!({"tls": {"min_version": "1.3"}, "n": 5, "s": "2s"}),
        "{yaml}"
    );
}
