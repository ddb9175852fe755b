//! The `embedgate` command: parse the CLI and config, bind, run.
//!
//! Exit status: 0 done; 1 could not start (listen address, runtime, log
//! writer, trace exporter) or `hash-key` without a key; 2 invalid config (or a bad
//! `usage` request); 3 the gateway stopped with something unshipped
//! (quota transitions or ledger rows Redis did not confirm, or upstream
//! calls that did not end when the shutdown cut them; the log says which).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use embedgate::{
    Config, Digest, Gateway, LogGuard, LogQueue, Stopped, Traces, UsageArgs, DEFAULT_QUEUE_LINES,
};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status of a run that stopped with something unshipped.
const EXIT_UNSHIPPED: u8 = 3;

#[derive(Parser)]
#[command(
    name = "embedgate",
    version,
    about = "Caching and metering gateway for DashScope multimodal embeddings"
)]
struct Cli {
    /// Config file (TOML). Without one, embedded defaults apply (no tenants).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Read a key on stdin and print its SHA-256 digest for `key_sha256`.
    HashKey,
    /// Validate a config file and print every error with its key and line.
    CheckConfig {
        /// The config file.
        path: PathBuf,
    },
    /// Print the usage ledger (Redis, or the SQLite file without Redis), or
    /// compare it with upstream's usage export.
    Usage {
        /// First day, YYYY-MM-DD (UTC); with --reconcile, the export's first
        /// day by default.
        #[arg(long)]
        from: Option<String>,
        /// Last day, YYYY-MM-DD (UTC); with --reconcile, the export's last
        /// day by default.
        #[arg(long)]
        to: Option<String>,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this model (e.g. text-embedding-v4).
        #[arg(long)]
        model: Option<String>,
        /// json (default) or csv.
        #[arg(long)]
        format: Option<String>,
        /// rows (default: per tenant, day, model, modality and cache status,
        /// with cost), reconciliation (per tenant, day and model: the units
        /// served from cache, billed by upstream, computed by the gateway,
        /// of unknown outcome, and mismatches) or totals (per tenant and
        /// model over the days, with cost); CSV with --format csv.
        #[arg(long)]
        view: Option<String>,
        /// Compare the ledger with upstream's usage export, a CSV file with
        /// a header: day,units, or day,workspace,units, or day,tenant,units
        /// (other columns ignored). Prints the comparison per day as CSV;
        /// exit status 1 when a day does not match.
        #[arg(long, value_name = "FILE")]
        reconcile: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::HashKey => hash_key(),
        Command::CheckConfig { path } => match Config::load(&path) {
            Ok(c) => {
                println!("{}: ok ({} tenants)", path.display(), c.tenants.len());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                for e in &errors.0 {
                    eprintln!("{}: {e}", path.display());
                }
                ExitCode::from(2)
            }
        },
        Command::Run => with_runtime(run(cli.config)),
        Command::Usage {
            from,
            to,
            tenant,
            model,
            format,
            view,
            reconcile,
        } => {
            let reconcile = match reconcile.map(|p| (std::fs::read_to_string(&p), p)) {
                None => None,
                Some((Ok(text), _)) => Some(text),
                Some((Err(e), p)) => {
                    eprintln!("embedgate usage: --reconcile {}: {e}", p.display());
                    return ExitCode::from(2);
                }
            };
            let args = UsageArgs {
                from,
                to,
                tenant,
                model,
                format,
                view,
                reconcile,
            };
            with_runtime(usage(cli.config, args))
        }
    }
}

fn with_runtime(f: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => {
            let code = rt.block_on(f);
            // Work still running (connections or upstream calls past the
            // shutdown budget, a DNS lookup) does not hold up the exit.
            rt.shutdown_timeout(std::time::Duration::from_millis(100));
            code
        }
        Err(e) => {
            eprintln!("embedgate: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn hash_key() -> ExitCode {
    let mut key = String::new();
    if std::io::stdin().read_to_string(&mut key).is_err() {
        eprintln!("embedgate: could not read the key from stdin");
        return ExitCode::FAILURE;
    }
    // A trailing newline from `echo` or a terminal is not part of the key.
    let key = key.trim_end_matches(['\n', '\r']);
    if key.is_empty() {
        eprintln!("embedgate: no key on stdin (try: printf %s \"$KEY\" | embedgate hash-key)");
        return ExitCode::FAILURE;
    }
    println!("{}", Digest::of(key.as_bytes()).to_hex());
    ExitCode::SUCCESS
}

fn load(path: Option<PathBuf>) -> Result<Config, ExitCode> {
    match path {
        Some(p) => Config::load(&p).map_err(|errors| {
            for e in &errors.0 {
                eprintln!("embedgate: {}: {e}", p.display());
            }
            ExitCode::from(2)
        }),
        None => Config::parse("", &|k| std::env::var(k).ok()).map_err(|errors| {
            eprintln!("embedgate: {errors}");
            ExitCode::from(2)
        }),
    }
}

/// Logs go to stderr through a bounded queue and a writer thread
/// ([`LogQueue`]): a request never waits on a log line; when stderr is too
/// slow, lines are dropped and counted in
/// `embedgate_log_lines_dropped_total`. The returned guard writes what is
/// queued at exit (waiting at most a second).
///
/// With `traces` (`[telemetry] endpoint` set), the registry also has the
/// OpenTelemetry layer, each layer with its own filter: `EMBEDGATE_LOG`
/// for the log lines, the gateway's own spans for the exporter. Without,
/// the subscriber is the plain log one, nothing added.
fn init_logs(traces: Option<Traces>) -> Result<LogGuard, ExitCode> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EMBEDGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let text = std::env::var("EMBEDGATE_LOG_FORMAT").is_ok_and(|v| v == "text");
    let queue = std::env::var("EMBEDGATE_LOG_QUEUE").ok();
    let lines = queue
        .as_deref()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0);
    let (writer, guard) =
        match LogQueue::start(std::io::stderr(), lines.unwrap_or(DEFAULT_QUEUE_LINES)) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("embedgate: cannot start the log writer: {e}");
                return Err(ExitCode::FAILURE);
            }
        };
    match traces {
        None => {
            if !text {
                // The JSON formatter alone: access lines can skip it.
                writer.serve_access_lines();
            }
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(writer);
            if text {
                builder.init();
            } else {
                builder.json().flatten_event(true).init();
            }
        }
        Some(traces) => {
            let logs = tracing_subscriber::fmt::layer().with_writer(writer);
            let logs = if text {
                logs.with_filter(filter).boxed()
            } else {
                logs.json().flatten_event(true).with_filter(filter).boxed()
            };
            tracing_subscriber::registry()
                .with(traces.layer())
                .with(logs)
                .init();
        }
    }
    if let (Some(v), None) = (&queue, lines) {
        tracing::warn!(
            value = %v,
            using = DEFAULT_QUEUE_LINES,
            "EMBEDGATE_LOG_QUEUE is not a positive number of lines; using the default"
        );
    }
    Ok(guard)
}

async fn run(path: Option<PathBuf>) -> ExitCode {
    // The config first: it says whether traces are exported. Its errors go
    // to stderr directly, as before the logs start.
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let traces = match Traces::start(&config.telemetry) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("embedgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _log_guard = match init_logs(traces) {
        Ok(g) => g,
        Err(code) => return code,
    };
    if config.upstream.api_key.is_none() {
        tracing::warn!(
            env = %config.upstream.api_key_env,
            "upstream key not set: upstream calls will be refused by DashScope"
        );
    }
    if config.tenants.is_empty() {
        tracing::warn!("no tenants configured: every API request will get 401");
    }
    let listen = config.server.listen;
    let metrics_listen = config.server.metrics_listen;
    let tenants = config.tenants.len();
    let cache = if config.cache.redis_url.is_some() {
        "redis"
    } else {
        "memory"
    };
    // The journal and ledger first: a directory in use by another process
    // stops the start before anything listens.
    let gateway = match Gateway::open(config) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("embedgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("embedgate: server.listen {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let metrics_listener = match metrics_listen {
        Some(addr) => match TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("embedgate: server.metrics_listen {addr}: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    // The bound addresses, on stdout, for scripts and tests that bind port 0.
    let mut out = std::io::stdout().lock();
    if let Ok(a) = listener.local_addr() {
        let _ = writeln!(out, "embedgate listening on http://{a}");
    }
    if let Some(a) = metrics_listener.as_ref().and_then(|l| l.local_addr().ok()) {
        let _ = writeln!(out, "embedgate metrics on http://{a}/metrics");
    }
    let _ = out.flush();
    drop(out);
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        tenants,
        cache,
        "embedgate started"
    );
    match gateway
        .run(listener, metrics_listener, shutdown_signal())
        .await
    {
        Stopped::Clean => {
            tracing::info!("embedgate stopped");
            ExitCode::SUCCESS
        }
        Stopped::Unshipped => {
            tracing::error!(
                status = EXIT_UNSHIPPED,
                "embedgate stopped with work unshipped (see above)"
            );
            ExitCode::from(EXIT_UNSHIPPED)
        }
    }
}

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

async fn usage(path: Option<PathBuf>, args: UsageArgs) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match embedgate::usage_report(&config, &args).await {
        Ok(out) => {
            print!("{}", out.text);
            for n in &out.notes {
                eprintln!("embedgate usage: {n}");
            }
            if out.mismatches > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("embedgate usage: {e}");
            ExitCode::from(2)
        }
    }
}
