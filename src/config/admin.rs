//! `[admin]`: the token for `/admin/*`. No `[admin]`: admin routes answer 404.

use serde::Deserialize;

use super::check::Check;
use crate::secret::Digest;

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub token: Digest,
}

/// `[admin]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    token_sha256: Option<String>,
}

impl RawAdmin {
    /// `None` after recording an error: a section that is present but wrong
    /// never turns the admin routes on.
    pub(crate) fn load(self, c: &mut Check<'_>) -> Option<AdminConfig> {
        let Some(token) = self.token_sha256 else {
            c.err("admin.token_sha256", "is required in [admin]");
            return None;
        };
        c.digest("admin.token_sha256", &token)
            .map(|token| AdminConfig { token })
    }
}
