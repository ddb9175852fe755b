//! Hot reload: SIGHUP, and a poll of the config file's contents, re-read
//! the config. A valid one swaps tenants, keys, limits and the admin token
//! in place (requests in flight keep what they started with); an invalid
//! one is logged with every error's key and line, and the old one stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::app::App;
use crate::config::Config;

/// How often the config file is compared with what was last loaded.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Re-reads the config file now. Returns whether the new config was applied.
pub(crate) fn reload(app: &App) -> bool {
    let Some(path) = app.config.source.clone() else {
        tracing::warn!("reload requested, but the config did not come from a file");
        return false;
    };
    match Config::load(&path) {
        Ok(new) => {
            let restart = app.apply_reload(&new);
            app.metrics.config_reloads.with_label_values(&["ok"]).inc();
            tracing::info!(
                path = %path.display(),
                tenants = new.tenants.len(),
                "config reloaded: tenants, keys, limits and admin token applied"
            );
            if !restart.is_empty() {
                tracing::warn!(settings = ?restart, "these settings changed but need a restart to apply");
            }
            true
        }
        Err(errors) => {
            app.metrics
                .config_reloads
                .with_label_values(&["error"])
                .inc();
            for e in &errors.0 {
                tracing::error!(
                    path = %path.display(),
                    key = %e.key,
                    line = e.line.unwrap_or(0),
                    error = %e.message,
                    "config reload rejected; the previous config stays in force"
                );
            }
            false
        }
    }
}

/// Reloads on SIGHUP and, with `server.watch_config`, when the file changes.
pub(crate) async fn watch(app: Arc<App>) {
    let Some(path) = app.config.source.clone() else {
        return;
    };
    // What was loaded, not what the file holds now: the file may have
    // changed since (this task starts after the server does).
    let mut last = app
        .config
        .source_bytes
        .clone()
        .or_else(|| std::fs::read(&path).ok());
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let hup_fut = async {
            match hup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hup_fut = std::future::pending::<()>();
        tokio::select! {
            _ = hup_fut => {
                tracing::info!("SIGHUP: reloading config");
                last = std::fs::read(&path).ok();
                reload(&app);
            }
            _ = tick.tick(), if app.config.server.watch_config => {
                if changed(&path, &mut last) {
                    tracing::info!(path = %path.display(), "config file changed: reloading");
                    reload(&app);
                }
            }
        }
    }
}

fn changed(path: &PathBuf, last: &mut Option<Vec<u8>>) -> bool {
    let now = std::fs::read(path).ok();
    if now.is_some() && now != *last {
        *last = now;
        true
    } else {
        false
    }
}
