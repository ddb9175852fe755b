//! The `fake-dashscope` command: the fake upstream on a socket, for
//! `scripts/bench.sh` and the compose demo. Prints its bound address on
//! stdout (`fake-dashscope listening on http://ADDR`) so that callers can
//! bind port 0.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use clap::Parser;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "fake-dashscope",
    version,
    about = "A fake DashScope embedding API (ONE-PEACE, the text and multimodal families, compatible mode, batch tasks) for tests, benchmarks and demos"
)]
struct Cli {
    /// Address to listen on (port 0: any free port, printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Accept only this upstream key (read from the named env variable).
    #[arg(long)]
    api_key_env: Option<String>,
    /// Added latency per embedding call, ms.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Vectors of full-precision float32 values (~19 characters each, ~30 KB
    /// per 1536-float answer, like DashScope's own) instead of short ones.
    #[arg(long)]
    full_precision: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(run(cli)),
        Err(e) => {
            eprintln!("fake-dashscope: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    let listener = match TcpListener::bind(cli.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fake-dashscope: {}: {e}", cli.listen);
            return ExitCode::FAILURE;
        }
    };
    if let Ok(a) = listener.local_addr() {
        println!("fake-dashscope listening on http://{a}");
    }
    let key = cli.api_key_env.and_then(|v| std::env::var(v).ok());
    let state = fake_dashscope::start(listener, key);
    state.latency_ms.store(cli.latency_ms, Ordering::SeqCst);
    state
        .full_precision
        .store(cli.full_precision, Ordering::SeqCst);
    shutdown_signal().await;
    ExitCode::SUCCESS
}

/// SIGTERM or SIGINT: as PID 1 in a container nothing else would stop it.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
