//! The config contract as operators meet it: defaults, errors with key and
//! line, and the shipped files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use super::*;

const DIGEST: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

/// The errors `src` is refused with, as they are shown.
fn errors_of(src: &str) -> Vec<String> {
    parse(src)
        .unwrap_err()
        .0
        .iter()
        .map(|e| e.to_string())
        .collect()
}

fn parse(src: &str) -> Result<Config, ConfigErrors> {
    Config::parse(src, &|_| None)
}

#[test]
fn empty_file_gives_defaults() {
    let c = parse("").unwrap();
    assert_eq!(c.server.max_body_bytes, 1024 * 1024);
    assert_eq!(c.cache.ttl, Duration::from_secs(30 * 24 * 3600));
    assert_eq!(c.cache.scope, CacheScope::Tenant);
    assert_eq!(c.metering.weights.audio, 2);
    assert!(c.cache.redis_url.is_none());
    assert!(c.upstream.api_key.is_none());
    assert_eq!(c.upstream.models, vec![ONE_PEACE_MODEL.to_string()]);
}

#[test]
fn unknown_key_names_key_and_line() {
    let err = parse("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").unwrap_err();
    let e = &err.0[0];
    assert_eq!(e.line, Some(3));
    assert_eq!(e.key, "server.lisen");
}

#[test]
fn unknown_keys_are_listed_with_every_other_error() {
    let src = format!(
        "[server]\nlisen = 3\nshutdown_grace = \"soon\"\n\n[[tenants]]\nname = \"a\"\nkey_sha256 = [\"{DIGEST}\"]\nrate = {{ per_second = 1, brust = 2 }}\ncolour = \"red\"\n"
    );
    let err = parse(&src).unwrap_err();
    let shown: Vec<String> = err.0.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        shown,
        vec![
            "line 2: server.lisen: unknown key".to_string(),
            "line 3: server.shutdown_grace: `soon` is not a duration (expected number at 0); use e.g. \"30s\", \"5m\", \"30d\"".to_string(),
            "line 8: tenants[0].rate.brust: unknown key".to_string(),
            "line 9: tenants[0].colour: unknown key".to_string(),
        ]
    );
}

#[test]
fn collects_every_semantic_error_with_lines() {
    let src = format!(
        "[cache]\nttl = \"soon\"\nscope = \"team\"\n\n[[tenants]]\nname = \"a\"\nkey_sha256 = [\"{DIGEST}\"]\nrate = {{ per_second = -1, burst = 2 }}\n\n[[tenants]]\nname = \"b\"\nkey_sha256 = [\"xyz\"]\nquota = {{ units = 5, per = \"week\" }}\n"
    );
    let err = parse(&src).unwrap_err();
    let shown: Vec<String> = err.0.iter().map(|e| e.to_string()).collect();
    assert_eq!(err.0.len(), 5, "{shown:#?}");
    assert!(shown[0].starts_with("line 2: cache.ttl:"), "{shown:#?}");
    assert!(shown[1].starts_with("line 3: cache.scope:"), "{shown:#?}");
    assert!(
        shown[2].starts_with("line 8: tenants[0].rate.per_second:"),
        "{shown:#?}"
    );
    assert!(
        shown[3].starts_with("line 12: tenants[1].key_sha256[0]:"),
        "{shown:#?}"
    );
    assert!(
        shown[4].starts_with("line 13: tenants[1].quota.per:"),
        "{shown:#?}"
    );
}

#[test]
fn duplicate_keys_and_names_are_errors() {
    let src = format!(
        "[[tenants]]\nname = \"a\"\nkey_sha256 = [\"{DIGEST}\"]\n[[tenants]]\nname = \"a\"\nkey_sha256 = [\"{DIGEST}\"]\n"
    );
    let err = parse(&src).unwrap_err();
    assert_eq!(err.0.len(), 2, "{err}");
    assert!(err.to_string().contains("defined twice"));
    assert!(err.to_string().contains("already used by tenant `a`"));
}

#[test]
fn full_example_parses() {
    let src = format!(
        r#"
[server]
listen = "0.0.0.0:8080"
metrics_listen = "127.0.0.1:9100"
max_body_bytes = 1048576

[upstream]
base_url = "http://127.0.0.1:9"
api_key_env = "UP_KEY"
timeout = "30s"

[cache]
redis_url = "redis://127.0.0.1:6379"
ttl = "30d"
scope = "shared"

[metering]
weights = {{ text = 1, image = 3, audio = 2 }}

[admin]
token_sha256 = "{DIGEST}"

[[tenants]]
name = "search"
key_sha256 = ["{DIGEST}"]
workspace = "ws-1"
rate = {{ per_second = 20, burst = 40 }}
quota = {{ units = 100000, per = "day" }}
"#
    );
    let c = Config::parse(&src, &|k| (k == "UP_KEY").then(|| "sk-x".into())).unwrap();
    assert_eq!(c.cache.scope, CacheScope::Shared);
    assert_eq!(c.metering.weights.image, 3);
    assert_eq!(c.upstream.api_key.as_ref().unwrap().expose(), "sk-x");
    let t = c.tenant("search").unwrap();
    assert_eq!(
        t.rate,
        Some(RateConfig {
            per_second: 20.0,
            burst: 40
        })
    );
    assert_eq!(
        t.quota,
        Some(QuotaConfig {
            units: 100000,
            per: QuotaPeriod::Day
        })
    );
    assert!(c.admin.is_some());
    assert_eq!(
        c.server.metrics_listen,
        Some("127.0.0.1:9100".parse().unwrap())
    );
}

#[test]
fn state_redis_defaults_to_the_cache_redis() {
    let none = parse("").unwrap();
    assert!(none.state.redis_url.is_none());
    assert!(none.state.same_as_cache(&none.cache));

    let one = parse(
        "[cache]\nredis_url = \"redis://c:6379\"\nredis_cluster = false\nredis_timeout = \"300ms\"\n",
    )
    .unwrap();
    assert_eq!(
        one.state.redis_url.as_ref().map(|u| u.expose()),
        Some("redis://c:6379")
    );
    assert_eq!(one.state.redis_timeout, Duration::from_millis(300));
    assert!(one.state.same_as_cache(&one.cache));

    let two = parse(
        "[cache]\nredis_url = \"redis://c:6379\"\n[state]\nredis_url = \"redis://s1:6379,redis://s2:6379\"\nredis_cluster = true\nredis_timeout = \"1s\"\n",
    )
    .unwrap();
    assert_eq!(
        two.state.redis_url.as_ref().map(|u| u.expose()),
        Some("redis://s1:6379,redis://s2:6379")
    );
    assert!(two.state.redis_cluster && !two.cache.redis_cluster);
    assert_eq!(two.state.redis_timeout, Duration::from_secs(1));
    assert_eq!(two.cache.redis_timeout, Duration::from_millis(250));
    assert!(!two.state.same_as_cache(&two.cache));

    // State in Redis, cache in memory.
    let state_only = parse("[state]\nredis_url = \"redis://s:6379\"\n").unwrap();
    assert!(state_only.cache.redis_url.is_none());
    assert!(state_only.state.redis_url.is_some());

    // A slower timeout for the state alone: another connection to the same Redis.
    let slow = parse("[cache]\nredis_url = \"redis://c:6379\"\n[state]\nredis_timeout = \"1s\"\n")
        .unwrap();
    assert_eq!(slow.state.redis_url, slow.cache.redis_url);
    assert!(!slow.state.same_as_cache(&slow.cache));

    let shown: Vec<String> =
        parse("[cache]\nredis_url = \"redis://c:6379\"\n[state]\nredis_cluster = true\n")
            .map(|_| ())
            .unwrap_err()
            .0
            .iter()
            .map(|e| e.to_string())
            .collect();
    assert!(
        shown.iter().any(|e| e
            == "line 4: state.redis_cluster: applies to state.redis_url, which is not set (the state then uses cache.redis_url and cache.redis_cluster)"),
        "{shown:#?}"
    );
    let shown = errors_of("[state]\nredis_url = \"http://s\"\n");
    assert_eq!(
        shown,
        vec!["line 2: state.redis_url: must be a redis:// or rediss:// URL (with redis_cluster = true, a comma-separated list of them)"]
    );
    let shown = errors_of("[state]\nredis_url = \"redis://a,redis://b\"\n");
    assert_eq!(
        shown,
        vec!["line 2: state.redis_url: lists several nodes; set state.redis_cluster = true for Redis Cluster"]
    );
}

#[test]
fn the_compact_form_is_float32_unless_chosen() {
    use super::CompactForm;
    assert_eq!(parse("").unwrap().cache.compact_form, CompactForm::Float32);
    let digits = parse("[cache]\ncompact_form = \"digits\"\n").unwrap();
    assert_eq!(digits.cache.compact_form, CompactForm::Digits);
    let shown = errors_of("[cache]\ncompact_form = \"f16\"\n");
    assert_eq!(
        shown,
        vec!["line 2: cache.compact_form: must be \"float32\" or \"digits\", got \"f16\""]
    );
}

#[test]
fn the_hot_tier_is_a_part_of_the_memory_cache() {
    assert_eq!(parse("").unwrap().cache.hot_max_bytes, 8 * 1024 * 1024);
    let small = parse("[cache]\nmemory_max_bytes = 1000000\n").unwrap();
    assert_eq!(small.cache.hot_max_bytes, 100_000);
    let none = parse("[cache]\nmemory_max_bytes = 0\n").unwrap();
    assert_eq!(none.cache.hot_max_bytes, 0);
    let off = parse("[cache]\nhot_max_bytes = 0\n").unwrap();
    assert_eq!(off.cache.hot_max_bytes, 0);
    let shown = errors_of("[cache]\nmemory_max_bytes = 1000\nhot_max_bytes = 600\n");
    assert_eq!(
        shown,
        vec!["line 3: cache.hot_max_bytes: is a part of cache.memory_max_bytes (1000) and may be at most half of it, got 600"]
    );
    let shown = errors_of("[cache]\nhot_max_bytes = -1\n");
    assert_eq!(
        shown,
        vec!["line 2: cache.hot_max_bytes: must be >= 0, got -1"]
    );
}

#[test]
fn quota_on_store_error_at_top_level_or_in_limits() {
    let top = parse("quota_on_store_error = \"deny\"\n").unwrap();
    assert_eq!(top.limits.quota_on_store_error, StoreErrorPolicy::Deny);
    let section = parse("[limits]\nquota_on_store_error = \"deny\"\n").unwrap();
    assert_eq!(section.limits.quota_on_store_error, StoreErrorPolicy::Deny);
    let both =
        parse("quota_on_store_error = \"deny\"\n[limits]\nquota_on_store_error = \"allow\"\n");
    assert!(both
        .unwrap_err()
        .to_string()
        .contains("both at the top level"));
    let bad = parse("quota_on_store_error = \"maybe\"\n").unwrap_err();
    assert_eq!(bad.0[0].key, "quota_on_store_error");
    assert_eq!(bad.0[0].line, Some(1));
}

#[test]
fn bad_base_url_is_rejected() {
    let err = parse("[upstream]\nbase_url = \"ftp://x/y\"\n").unwrap_err();
    assert_eq!(err.0[0].key, "upstream.base_url");
    assert_eq!(err.0[0].line, Some(2));
}

#[test]
fn bad_types_are_all_listed_with_key_and_line() {
    let src = "[server]\nmax_body_bytes = \"big\"\nmax_in_flight = \"many\"\n[cache]\nttl = \"soon\"\nredis_cluster = \"yes\"\n[[tenants]]\nname = \"a\"\nkey_sha256 = \"not-a-list\"\nrate = 5\n";
    let err = parse(src).unwrap_err();
    let shown: Vec<String> = err.0.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        shown,
        vec![
            "line 2: server.max_body_bytes: must be an integer, got a string",
            "line 3: server.max_in_flight: must be an integer, got a string",
            "line 5: cache.ttl: `soon` is not a duration (expected number at 0); use e.g. \"30s\", \"5m\", \"30d\"",
            "line 6: cache.redis_cluster: must be true or false, got a string",
            "line 9: tenants[0].key_sha256: must be a list of strings, got a string",
            "line 10: tenants[0].rate: must be a table, got an integer",
        ],
        "{shown:#?}"
    );
}

#[test]
fn wrong_shapes_name_the_item_inside_lists_and_sections() {
    let src = format!(
        "server = 5\n[upstream]\nmodels = [\"a\", 2]\n[[tenants]]\nname = \"a\"\nkey_sha256 = [\n  \"{DIGEST}\",\n  7,\n]\n\"odd key\" = 1\n"
    );
    let err = parse(&src).unwrap_err();
    let shown: Vec<String> = err.0.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        shown,
        vec![
            "line 1: server: must be a table, got an integer",
            "line 3: upstream.models[1]: must be a string, got an integer",
            "line 8: tenants[0].key_sha256[1]: must be a string, got an integer",
            "line 10: tenants[0].\"odd key\": unknown key",
        ],
        "{shown:#?}"
    );
}

#[test]
fn values_say_what_they_accept() {
    let src = "[server]\nshutdown_grace = 30\nlisten = \"localhost:80\"\n[cache]\nscope = 1\nttl = \"0s\"\n[[tenants]]\nname = \"a\"\nkey_sha256 = []\nquota = { units = 1, per = \"week\" }\n";
    let err = parse(src).unwrap_err();
    let shown: Vec<String> = err.0.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        shown,
        vec![
            "line 2: server.shutdown_grace: must be a duration such as \"30s\", got an integer",
            "line 3: server.listen: `localhost:80` is not an address; use IP:PORT, e.g. \"0.0.0.0:8080\"",
            "line 5: cache.scope: must be \"tenant\" or \"shared\", got an integer",
            "line 6: cache.ttl: must be greater than zero",
            "line 9: tenants[0].key_sha256: must list at least one digest",
            "line 10: tenants[0].quota.per: must be \"day\" or \"month\", got \"week\"",
        ],
        "{shown:#?}"
    );
}

#[test]
fn a_file_with_too_many_wrong_keys_is_cut_short() {
    let keys = |n: usize| -> String { (0..n).map(|i| format!("k{i} = {i}\n")).collect() };
    let exactly = parse(&keys(100)).unwrap_err();
    assert_eq!(exactly.0.len(), 100);
    assert!(exactly.0.iter().all(|e| e.message == "unknown key"));
    let err = parse(&keys(150)).unwrap_err();
    assert_eq!(err.0.len(), 101);
    assert_eq!(err.0[0].to_string(), "line 1: k0: unknown key");
    assert_eq!(err.0[99].to_string(), "line 100: k99: unknown key");
    assert!(err.0[100].message.starts_with("more than 100"), "{err}");
}

#[test]
fn a_syntax_error_is_reported_alone_with_its_line() {
    let err = parse("[server]\nlisten = \n").unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert_eq!(err.0[0].key, "");
    assert_eq!(err.0[0].line, Some(2));
}

/// Found by the `config` fuzz target: the TOML parser has no words for a
/// control character in a comment, and the error said nothing.
#[test]
fn a_syntax_error_always_says_what() {
    let err = parse("[server]\n# a comment \u{0} with a NUL\n").unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert_eq!(
        err.0[0].to_string(),
        "line 2: not valid TOML at column 13: unexpected '\\0'"
    );
}

/// Found while writing the `config` fuzz target's invariants (the fuzzer
/// itself did not reach it in its bounded runs): humantime reads durations
/// up to 584 billion years, and `Instant::now() + ttl` panics past 292
/// billion, on every cache insert.
#[test]
fn durations_are_at_most_100_years() {
    let c = parse("[cache]\nttl = \"100y\"\n").unwrap();
    assert_eq!(c.cache.ttl, Duration::from_secs(3_155_760_000));
    assert!(std::time::Instant::now().checked_add(c.cache.ttl).is_some());
    let err =
        parse("[server]\nidle_timeout = \"30s\"\n[cache]\nttl = \"300000000000y\"\n").unwrap_err();
    assert_eq!(err.0.len(), 1, "{err}");
    assert_eq!(
        err.0[0].to_string(),
        "line 4: cache.ttl: `300000000000y` is too long; the longest is 100 years (\"100y\")"
    );
    assert!(parse("[upstream]\ntimeout = \"100y 1s\"\n").is_err());
}

// ---- the shipped files ----

const REFERENCE: &str = include_str!("../../config/embedgate.toml");
const QUICKSTART: &str = include_str!("../../config/quickstart.toml");
const COMPOSE: &str = include_str!("../../deploy/compose/embedgate.toml");

fn env(key: &str) -> Option<String> {
    (key == "DASHSCOPE_API_KEY").then(|| "sk-test".to_string())
}

#[test]
fn shipped_config_files_pass_check_config() {
    for (name, src) in [
        ("config/embedgate.toml", REFERENCE),
        ("config/quickstart.toml", QUICKSTART),
        ("deploy/compose/embedgate.toml", COMPOSE),
    ] {
        let c = Config::parse(src, &env).unwrap_or_else(|e| panic!("{name}:\n{e}"));
        assert!(c.upstream.api_key.is_some(), "{name}");
    }
}

/// The reference's active lines are the built-in defaults, so reading it
/// tells an operator what leaving a key out means.
#[test]
fn reference_file_sets_exactly_the_defaults() {
    let reference = Config::parse(REFERENCE, &env).unwrap();
    let defaults = Config::parse("", &env).unwrap();
    assert_eq!(format!("{reference:#?}"), format!("{defaults:#?}"));
}

/// The reference with its `# key = value` examples (keys without a default)
/// switched on.
fn reference_with_examples() -> String {
    let is_example = |rest: &str| {
        rest.starts_with('[')
            || rest.split_once(" = ").is_some_and(|(key, _)| {
                key.starts_with(|c: char| c.is_ascii_lowercase())
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            })
    };
    REFERENCE
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if is_example(rest) => rest,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn reference_file_examples_are_valid() {
    let src = reference_with_examples();
    let c = Config::parse(&src, &env).unwrap_or_else(|e| panic!("{e}\n{src}"));
    assert!(c.server.metrics_listen.is_some());
    assert!(c.cache.redis_url.is_some());
    assert!(c.state.redis_url.is_some() && !c.state.same_as_cache(&c.cache));
    assert!(c.admin.is_some());
    assert_eq!(c.tenants.len(), 1);
    let t = &c.tenants[0];
    assert_eq!(t.keys.len(), 2);
    assert!(t.workspace.is_some() && t.rate.is_some() && t.quota.is_some());
    // The example shows the default.
    let plain = parse(&format!(
        "[[tenants]]\nname = \"a\"\nkey_sha256 = [\"{DIGEST}\"]\n"
    ))
    .unwrap();
    assert_eq!(t.uploads_rate, plain.tenants[0].uploads_rate);
}

#[test]
fn uploads_rate_defaults_for_every_tenant_and_is_checked_like_rate() {
    let src = format!(
        "[[tenants]]\nname = \"a\"\nkey_sha256 = [\"{DIGEST}\"]\n[[tenants]]\nname = \"b\"\nkey_sha256 = [\"{}\"]\nrate = {{ per_second = 50 }}\nuploads_rate = {{ per_second = 0.5, burst = 2 }}\n",
        "f".repeat(64)
    );
    let c = parse(&src).unwrap();
    let default = RateConfig {
        per_second: 1.0,
        burst: 5,
    };
    assert_eq!(c.tenants[0].uploads_rate, default);
    assert_eq!(c.tenants[0].rate, None);
    assert_eq!(
        c.tenants[1].uploads_rate,
        RateConfig {
            per_second: 0.5,
            burst: 2
        }
    );
    let bad = format!(
        "[[tenants]]\nname = \"a\"\nkey_sha256 = [\"{DIGEST}\"]\nuploads_rate = {{ burst = 2 }}\n[[tenants]]\nname = \"b\"\nkey_sha256 = [\"{}\"]\nuploads_rate = {{ per_second = 0, burst = 0 }}\n",
        "f".repeat(64)
    );
    let shown = errors_of(&bad);
    assert_eq!(
        shown,
        vec![
            "line 4: tenants[0].uploads_rate.per_second: is required in uploads_rate",
            "line 8: tenants[1].uploads_rate.per_second: must be a number > 0, got 0",
        ],
        "{shown:#?}"
    );
}

/// Adding a key to a raw struct without documenting it in the reference
/// fails here.
#[test]
fn reference_file_documents_every_key() {
    let src = reference_with_examples();
    let doc: toml_edit::DocumentMut = src.parse().unwrap();
    let sections: [(&str, &[&str]); 17] = [
        ("", keys_of::<RawConfig>()),
        ("server", keys_of::<server::RawServer>()),
        ("upstream", keys_of::<upstream::RawUpstream>()),
        ("cache", keys_of::<cache::RawCache>()),
        ("state", keys_of::<state::RawState>()),
        ("limits", keys_of::<limits::RawLimits>()),
        ("metering", keys_of::<metering::RawMetering>()),
        ("metering.weights", keys_of::<metering::RawWeights>()),
        ("ledger", keys_of::<ledger::RawLedger>()),
        ("events", keys_of::<events::RawEvents>()),
        ("admin", keys_of::<admin::RawAdmin>()),
        ("telemetry", keys_of::<telemetry::RawTelemetry>()),
        ("tenants[0]", keys_of::<tenants::RawTenant>()),
        ("tenants[0].rate", keys_of::<tenants::RawRate>()),
        ("tenants[0].uploads_rate", keys_of::<tenants::RawRate>()),
        ("tenants[0].quota", keys_of::<tenants::RawQuota>()),
        ("models[0]", keys_of::<models::RawModel>()),
    ];
    let mut missing = Vec::new();
    for (section, keys) in sections {
        assert!(!keys.is_empty(), "no keys found for `{section}`");
        for key in keys {
            // The top-level spelling of [limits]' key: both at once is an
            // error, so the reference shows it in [limits] and says so there.
            if section.is_empty() && *key == "quota_on_store_error" {
                continue;
            }
            let dotted = if section.is_empty() {
                key.to_string()
            } else {
                format!("{section}.{key}")
            };
            if lookup(doc.as_item(), &dotted).is_none() {
                missing.push(dotted);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "config/embedgate.toml does not show {missing:?}"
    );
}

fn lookup<'a>(root: &'a toml_edit::Item, dotted: &str) -> Option<&'a toml_edit::Item> {
    dotted
        .split('.')
        .try_fold(root, |item, part| match part.split_once('[') {
            Some((name, index)) => item
                .get(name)?
                .get(index.trim_end_matches(']').parse::<usize>().ok()?),
            None => item.get(part),
        })
}

/// The keys serde accepts for a raw struct: derive hands them to
/// `deserialize_struct`, which this deserializer records and then refuses.
fn keys_of<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{self, Visitor};
    use std::cell::Cell;

    struct Peek<'a>(&'a Cell<&'static [&'static str]>);
    impl<'de> serde::Deserializer<'de> for Peek<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            self.0.set(fields);
            Err(de::Error::custom("seen"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    let fields = Cell::new(&[][..]);
    let _ = T::deserialize(Peek(&fields));
    fields.get()
}
