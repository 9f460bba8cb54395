//! The `mesh` command: run a proxy from an Envoy v3 bootstrap file,
//! validate a file, or start the self-contained demo.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mesh_bin::{bootstrap, Proxy, ProxyOptions};

/// A service-mesh data plane that runs Envoy v3 configuration.
#[derive(Parser, Debug)]
#[command(name = "mesh", version, about, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy.
    Run {
        /// Envoy v3 bootstrap file (YAML or JSON).
        #[arg(short = 'c', long = "config-path")]
        config: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Check a configuration file: prints `ok`, or every error with its field path (exit 1).
    Validate {
        /// Envoy v3 bootstrap file (YAML or JSON).
        #[arg(short = 'c', long = "config-path")]
        config: PathBuf,
    },
    /// Start two demo upstreams and the proxy with the quickstart configuration.
    Demo {
        /// Use this configuration instead of the built-in quickstart.
        #[arg(short = 'c', long = "config-path")]
        config: Option<PathBuf>,
        #[command(flatten)]
        run: RunArgs,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum RuntimeArg {
    PerCore,
    Shared,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// `per-core`: one single-threaded runtime, socket and pool set per
    /// worker (default); `shared`: one work-stealing runtime for all workers.
    #[arg(long, value_enum, default_value_t = RuntimeArg::PerCore)]
    runtime: RuntimeArg,
    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    #[arg(short = 'l', long = "log-level", default_value = "info")]
    log_level: String,
    /// Write the admin listener's address to this file once bound.
    #[arg(long)]
    admin_address_path: Option<PathBuf>,
    /// Seconds to let in-flight requests finish on SIGTERM/SIGINT.
    #[arg(long, default_value_t = 5)]
    drain_time_s: u64,
    /// The largest xDS response accepted, in bytes; a larger one fails the
    /// stream with an error naming this limit (default 64 MiB).
    #[arg(long, default_value_t = mesh_xds::client::DEFAULT_MAX_MESSAGE_SIZE)]
    xds_max_message_bytes: usize,
    /// On-demand EDS for clusters from CDS: they are usable at once and
    /// subscribe to their endpoints only when a request first picks them
    /// (that request waits for the endpoints, up to the cluster's
    /// `initial_fetch_timeout`, 15 s by default). For large meshes where a
    /// sidecar talks to few of the clusters it is given.
    #[arg(long)]
    lazy_eds: bool,
    /// The proxy's zone for zone-aware routing (overrides
    /// `node.locality.zone`).
    #[arg(long)]
    zone: Option<String>,
}

const QUICKSTART: &str = include_str!("../../examples/configs/quickstart.yaml");

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn config_json(text: &str) -> serde_json::Value {
    yaml_serde::from_str::<serde_json::Value>(text).unwrap_or(serde_json::Value::Null)
}

fn print_errors(path: &Path, errors: &bootstrap::ConfigErrors) {
    eprintln!("{}: invalid configuration", path.display());
    for e in &errors.0 {
        eprintln!("{e}");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config } => match bootstrap::load_file(&config) {
            Ok(b) => {
                let errors = mesh_bin::proxy::check(&b);
                if errors.is_empty() {
                    println!("ok");
                    ExitCode::SUCCESS
                } else {
                    eprintln!("{}: invalid configuration", config.display());
                    for e in errors {
                        eprintln!("{e}");
                    }
                    ExitCode::FAILURE
                }
            }
            Err(errors) => {
                print_errors(&config, &errors);
                ExitCode::FAILURE
            }
        },
        Command::Run { config, run } => {
            init_logging(&run.log_level);
            let (bootstrap, text) = match bootstrap::load_file(&config) {
                Ok(b) => (b, std::fs::read_to_string(&config).unwrap_or_default()),
                Err(errors) => {
                    print_errors(&config, &errors);
                    return ExitCode::FAILURE;
                }
            };
            serve(bootstrap, config_json(&text), run, false)
        }
        Command::Demo { config, run } => {
            init_logging(&run.log_level);
            let (text, name) = match &config {
                Some(p) => match std::fs::read_to_string(p) {
                    Ok(t) => (t, p.display().to_string()),
                    Err(e) => {
                        eprintln!("{}: {e}", p.display());
                        return ExitCode::FAILURE;
                    }
                },
                None => (
                    QUICKSTART.to_owned(),
                    "examples/configs/quickstart.yaml".to_owned(),
                ),
            };
            let bootstrap = match bootstrap::load_str(&text) {
                Ok(b) => b,
                Err(errors) => {
                    print_errors(Path::new(&name), &errors);
                    return ExitCode::FAILURE;
                }
            };
            serve(bootstrap, config_json(&text), run, true)
        }
    }
}

fn serve(
    mut bootstrap: mesh_core::config::Bootstrap,
    json: serde_json::Value,
    run: RunArgs,
    demo: bool,
) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(zone) = &run.zone {
        bootstrap.node.locality.zone = zone.clone();
    }
    rt.block_on(async move {
        if demo {
            let upstreams = [
                ("blue", std::net::SocketAddr::from(([127, 0, 0, 1], 18091))),
                ("green", std::net::SocketAddr::from(([127, 0, 0, 1], 18092))),
            ];
            if let Err(e) = mesh_bin::demo::start(&upstreams).await {
                eprintln!("cannot start the demo upstreams on 127.0.0.1:18091/18092: {e}");
                return ExitCode::FAILURE;
            }
            tracing::info!(
                "demo upstreams 'blue' on 127.0.0.1:18091 and 'green' on 127.0.0.1:18092"
            );
        }
        let options = ProxyOptions {
            concurrency: run.concurrency,
            runtime: match run.runtime {
                RuntimeArg::PerCore => mesh_bin::RuntimeMode::PerCore,
                RuntimeArg::Shared => mesh_bin::RuntimeMode::Shared,
            },
            drain_time: Duration::from_secs(run.drain_time_s),
            admin_address_path: run.admin_address_path,
            xds_max_message_size: run.xds_max_message_bytes,
            lazy_eds: run.lazy_eds,
            ..Default::default()
        };
        let proxy = match Proxy::start(bootstrap, options, json).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("mesh: {e}");
                return ExitCode::FAILURE;
            }
        };
        wait_for_signal(&proxy).await;
        tracing::info!("draining");
        let clean = proxy.shutdown().await;
        tracing::info!(clean, "exiting");
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal(proxy: &Proxy) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            proxy.drain().signalled().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = proxy.drain().signalled() => {}
    }
}
