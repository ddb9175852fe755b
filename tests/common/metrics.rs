//! Metrics: the one Prometheus text parser.

use std::collections::BTreeMap;

/// One sample line of the Prometheus text format.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// `k="v",…}` (after the `{`): the labels, unescaped, and the rest of the line.
fn parse_labels(s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut chars = s.char_indices();
    loop {
        let mut key = String::new();
        loop {
            let (i, c) = chars.next()?;
            if c == '}' && key.is_empty() {
                return Some((labels, &s[i + 1..]));
            }
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if chars.next()?.1 != '"' {
            return None;
        }
        let mut val = String::new();
        loop {
            match chars.next()?.1 {
                '\\' => match chars.next()?.1 {
                    'n' => val.push('\n'),
                    o => val.push(o),
                },
                '"' => break,
                c => val.push(c),
            }
        }
        labels.insert(key, val);
        match chars.next()? {
            (_, ',') => {}
            (i, '}') => return Some((labels, &s[i + 1..])),
            _ => return None,
        }
    }
}

/// Every sample of a `/metrics` text; panics on a line it cannot read.
pub fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = match line.find('{') {
            Some(i) => {
                let (labels, rest) =
                    parse_labels(&line[i + 1..]).unwrap_or_else(|| panic!("bad line {line:?}"));
                (&line[..i], labels, rest)
            }
            None => {
                let (n, rest) = line
                    .split_once(' ')
                    .unwrap_or_else(|| panic!("bad line {line:?}"));
                (n, BTreeMap::new(), rest)
            }
        };
        let value = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("bad value in {line:?}"));
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

/// The value of the series `name{labels}` (exactly these labels, in any
/// order), or 0.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples(text)
        .into_iter()
        .filter(|s| s.name == name && s.labels == want)
        .map(|s| s.value)
        .sum()
}

/// Σ of every series of `name`, whatever its labels.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    samples(text)
        .into_iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
}

/// Every series of `name`, keyed by its label values in `keys` order;
/// asserts each has exactly the label set `keys`.
pub fn series(text: &str, name: &str, keys: &[&str]) -> BTreeMap<Vec<String>, f64> {
    let want: std::collections::BTreeSet<&str> = keys.iter().copied().collect();
    let mut out = BTreeMap::new();
    for s in samples(text).into_iter().filter(|s| s.name == name) {
        let have: std::collections::BTreeSet<&str> = s.labels.keys().map(String::as_str).collect();
        assert_eq!(have, want, "{name} has labels {:?}", s.labels);
        let k: Vec<String> = keys.iter().map(|k| s.labels[*k].clone()).collect();
        assert!(
            out.insert(k, s.value).is_none(),
            "duplicate series of {name}"
        );
    }
    out
}
