//! Units of the token-billed family: what upstream billed (read from each
//! model's own usage fields), the quota's upper bound before a call, and
//! how a batch total is shared out over the batch's items.

use serde_json::Value;

use super::parse::{Api, FamilyItem};
use crate::config::ModelSpec;
use crate::metering::Usage;
use crate::request::Modality;

/// Text and visual tokens upstream billed for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Billed {
    pub(crate) text: u64,
    pub(crate) visual: u64,
}

fn num(v: &Value, path: &[&str]) -> Option<u64> {
    let mut at = v;
    for p in path {
        at = at.get(p)?;
    }
    at.as_u64()
}

/// Upstream's figures from its `usage` object; `None` for a shape this
/// gateway does not know (counted as a reconciliation event, never
/// dropped).
///
/// - text / compatible: `total_tokens` (compatible also `prompt_tokens`);
/// - multimodal: image tokens = `image_tokens`, else
///   `input_tokens_details.image_tokens`; text tokens =
///   `input_tokens_details.text_tokens`, else `input_tokens` − image tokens.
pub(crate) fn billed(api: Api, usage: Option<&Value>) -> Option<Billed> {
    let u = usage?;
    match api {
        Api::Text => num(u, &["total_tokens"]).map(|t| Billed { text: t, visual: 0 }),
        Api::Compatible => num(u, &["total_tokens"])
            .or_else(|| num(u, &["prompt_tokens"]))
            .map(|t| Billed { text: t, visual: 0 }),
        Api::Multimodal => {
            let input = num(u, &["input_tokens"]).or_else(|| num(u, &["total_tokens"]));
            let visual = num(u, &["image_tokens"])
                .or_else(|| num(u, &["input_tokens_details", "image_tokens"]));
            let text = num(u, &["input_tokens_details", "text_tokens"]);
            match (input, visual, text) {
                (_, Some(v), Some(t)) => Some(Billed { text: t, visual: v }),
                (Some(i), Some(v), None) => Some(Billed {
                    text: i.checked_sub(v)?,
                    visual: v,
                }),
                (Some(i), None, Some(t)) => Some(Billed {
                    text: t,
                    visual: i.checked_sub(t)?,
                }),
                // No split given: all text when nothing visual was sent.
                (Some(i), None, None) => Some(Billed { text: i, visual: 0 }),
                (None, _, _) => None,
            }
        }
    }
}

/// The most an item can cost: a token is at least one byte of UTF-8 text;
/// images and videos at the model's configured figure.
pub(crate) fn upper_bound(spec: &ModelSpec, item: &FamilyItem) -> u64 {
    item.text_bytes
        .max(u64::from(item.modality == Modality::Text))
        + item.images * spec.image_tokens
        + item.videos * spec.video_tokens
}

/// The quota reservation for `items`: their upper bounds, as one usage.
pub(crate) fn bound_usage<'a>(
    spec: &ModelSpec,
    items: impl Iterator<Item = &'a FamilyItem>,
) -> Usage {
    let mut u = Usage::default();
    for it in items {
        u.items.add(it.modality, 1);
        u.units.add(it.modality, upper_bound(spec, it));
    }
    u
}

/// Shares `total` out over `weights` in proportion, by the largest
/// remainder method: the shares sum to `total` exactly. All-zero weights
/// share equally.
pub(crate) fn apportion(total: u64, weights: &[u64]) -> Vec<u64> {
    if weights.is_empty() {
        return Vec::new();
    }
    let equal;
    let w: &[u64] = if weights.iter().all(|&w| w == 0) {
        equal = vec![1; weights.len()];
        &equal
    } else {
        weights
    };
    let sum: u128 = w.iter().map(|&x| u128::from(x)).sum();
    let mut shares: Vec<u64> = Vec::with_capacity(w.len());
    let mut rems: Vec<(u128, usize)> = Vec::with_capacity(w.len());
    for (i, &x) in w.iter().enumerate() {
        let exact = u128::from(total) * u128::from(x);
        shares.push(u64::try_from(exact / sum).unwrap_or(u64::MAX));
        rems.push((exact % sum, i));
    }
    let given: u64 = shares.iter().sum();
    // Largest remainders first; ties to the earlier item.
    rems.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in rems
        .iter()
        .take(usize::try_from(total - given).unwrap_or(0))
    {
        shares[i] += 1;
    }
    shares
}

/// Each forwarded item's units from one call's bill: text tokens shared
/// over the text in the items by UTF-8 length, visual tokens over their
/// images and videos in proportion to the model's per-image and per-video
/// figures. Returns, per item, its usage.
pub(crate) fn per_item(spec: &ModelSpec, items: &[&FamilyItem], billed: Billed) -> Vec<Usage> {
    let text_w: Vec<u64> = items.iter().map(|i| i.text_bytes).collect();
    let visual_w: Vec<u64> = items
        .iter()
        .map(|i| i.images * spec.image_tokens.max(1) + i.videos * spec.video_tokens.max(1))
        .collect();
    let any_visual = visual_w.iter().any(|&w| w > 0);
    let text = apportion(billed.text, &text_w);
    // Visual tokens with no visual item (should not happen) go with the text.
    let visual = if any_visual {
        apportion(billed.visual, &visual_w)
    } else {
        apportion(billed.visual, &text_w)
    };
    items
        .iter()
        .zip(text.iter().zip(&visual))
        .map(|(it, (&t, &v))| {
            let mut u = Usage::default();
            u.items.add(it.modality, 1);
            // Metered under the item's own modality: a text item's tokens
            // as text, an image's or video's (with any caption text in the
            // same object) as image or video.
            u.units.add(it.modality, t + v);
            u
        })
        .collect()
}

/// The sum of usages.
pub(crate) fn sum<'a>(us: impl Iterator<Item = &'a Usage>) -> Usage {
    let mut total = Usage::default();
    for u in us {
        add(&mut total, u, 1);
    }
    total
}

/// Adds `n` times `u` to `total`.
pub(crate) fn add(total: &mut Usage, u: &Usage, n: u64) {
    for m in Modality::ALL {
        total.items.add(m, u.items.get(m) * n);
        total.units.add(m, u.units.get(m) * n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn apportioning_is_exact() {
        assert_eq!(apportion(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(apportion(7, &[3, 0, 4]), vec![3, 0, 4]);
        assert_eq!(apportion(5, &[0, 0]), vec![3, 2]);
        assert_eq!(apportion(0, &[5, 5]), vec![0, 0]);
        for total in [0u64, 1, 9, 1001] {
            let w = [13, 1, 7, 100, 2];
            assert_eq!(apportion(total, &w).iter().sum::<u64>(), total);
        }
    }

    #[test]
    fn usage_shapes() {
        let b = |api, v: Value| billed(api, Some(&v));
        assert_eq!(
            b(Api::Text, json!({"total_tokens": 9})),
            Some(Billed { text: 9, visual: 0 })
        );
        assert_eq!(
            b(
                Api::Compatible,
                json!({"prompt_tokens": 4, "total_tokens": 4})
            ),
            Some(Billed { text: 4, visual: 0 })
        );
        assert_eq!(
            b(
                Api::Multimodal,
                json!({"input_tokens": 267, "image_tokens": 256, "image_count": 1})
            ),
            Some(Billed {
                text: 11,
                visual: 256
            })
        );
        assert_eq!(
            b(
                Api::Multimodal,
                json!({"input_tokens": 300, "input_tokens_details": {"text_tokens": 44, "image_tokens": 256}, "output_tokens": 0, "total_tokens": 300})
            ),
            Some(Billed {
                text: 44,
                visual: 256
            })
        );
        assert_eq!(b(Api::Text, json!({"tokens": 3})), None);
        assert_eq!(
            b(
                Api::Multimodal,
                json!({"input_tokens": 3, "image_tokens": 9})
            ),
            None
        );
        assert_eq!(billed(Api::Text, None), None);
    }
}
