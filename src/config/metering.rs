//! `[metering]`: DashScope's billing units per item of each modality.

use serde::Deserialize;

use super::check::Check;

/// DashScope's own ONE-PEACE weights (the `usage.*.weight` of its answers:
/// text 1, image 1, audio 2), so metered units are the units billed.
const DEFAULT_WEIGHTS: Weights = Weights {
    text: 1,
    image: 1,
    audio: 2,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weights {
    pub text: u64,
    pub image: u64,
    pub audio: u64,
}

#[derive(Debug, Clone)]
pub struct MeteringConfig {
    pub weights: Weights,
}

/// `[metering]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMetering {
    weights: Option<RawWeights>,
}

/// `metering.weights`; a modality left out keeps its default.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWeights {
    text: Option<i64>,
    image: Option<i64>,
    audio: Option<i64>,
}

impl RawMetering {
    pub(crate) fn load(self, c: &mut Check<'_>) -> MeteringConfig {
        let weights = match self.weights {
            None => DEFAULT_WEIGHTS,
            Some(RawWeights { text, image, audio }) => Weights {
                text: c.positive("metering.weights.text", text, DEFAULT_WEIGHTS.text),
                image: c.positive("metering.weights.image", image, DEFAULT_WEIGHTS.image),
                audio: c.positive("metering.weights.audio", audio, DEFAULT_WEIGHTS.audio),
            },
        };
        MeteringConfig { weights }
    }
}
