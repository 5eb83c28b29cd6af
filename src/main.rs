//! The `mirror-gateway` command: parses the command line and config, sets up logging and
//! starts the gateway from the `mirror-proxy` library.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mirror_proxy::app::App;
use mirror_proxy::config::{self, GatewayConfig};

/// Caching reverse proxy and origin for Stella Ops mirror data.
#[derive(Parser)]
#[command(name = "mirror-gateway", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file, for `run` when no subcommand is given.
    #[arg(short, long, env = "MIRROR_GATEWAY_CONFIG", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

const DEFAULT_CONFIG: &str = "/etc/mirror-gateway/gateway.toml";

#[derive(Subcommand)]
enum Command {
    /// Serve requests until SIGTERM (graceful) or SIGINT (fast).
    Run {
        /// Config file.
        #[arg(short, long, env = "MIRROR_GATEWAY_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a config file and list every error; exit 0 when valid, 1 otherwise.
    Check {
        /// Config file.
        #[arg(short, long, env = "MIRROR_GATEWAY_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Version) => {
            println!("mirror-gateway {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(Command::Check { config }) => check(&config),
        Some(Command::Run { config }) => run(&config),
        None => run(&cli.config),
    }
}

fn load(path: &Path) -> Result<GatewayConfig, ExitCode> {
    let env = utf8_environment()?;
    config::load(path, env).map_err(|errors| {
        for error in &errors {
            eprintln!("error: {error}");
        }
        eprintln!(
            "{}: {} error(s); nothing was started",
            path.display(),
            errors.len()
        );
        ExitCode::FAILURE
    })
}

/// Returns the environment's UTF-8 variables; a config override that is not UTF-8 is an error.
fn utf8_environment() -> Result<Vec<(String, String)>, ExitCode> {
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => vars.push((name, value)),
            (Ok(name), Err(_)) if name.starts_with(config::ENV_PREFIX) => {
                eprintln!("error: {name}: the value is not valid UTF-8; set it as UTF-8 text");
                return Err(ExitCode::FAILURE);
            }
            _ => {}
        }
    }
    Ok(vars)
}

fn check(path: &Path) -> ExitCode {
    match load(path) {
        Ok(config) => {
            println!(
                "{}: configuration is valid ({} domain(s))",
                path.display(),
                config.domains.len()
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn run(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    mirror_proxy::logging::init(&config.log.level);
    let app = match App::build(&config) {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    let listeners: Vec<String> = app
        .listen_addrs()
        .iter()
        .map(|a| format!("http://{a}"))
        .collect();
    let domains: Vec<&str> = config.domains.iter().map(|d| d.id.as_str()).collect();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %path.display(),
        listeners = ?listeners,
        domains = ?domains,
        "mirror-gateway starting"
    );
    app.run();
    tracing::info!("mirror-gateway stopped");
    ExitCode::SUCCESS
}
