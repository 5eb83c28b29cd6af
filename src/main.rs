//! The `mirror-gateway` command: parses the command line and config, sets up logging and
//! starts the gateway from the `mirror-proxy` library.

#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod allocator;

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
    /// Config file; a subcommand's own `-c` wins over this one. Default:
    /// $MIRROR_GATEWAY_CONFIG, else /etc/mirror-gateway/gateway.toml.
    #[arg(short, long, env = "MIRROR_GATEWAY_CONFIG", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
}

/// mimalloc in place of the C library's allocator: a request allocates and frees many small
/// buffers, and glibc's malloc spent about a fifth of the gateway's instructions on a cache hit.
#[global_allocator]
static ALLOCATOR: allocator::Mimalloc = allocator::Mimalloc;

const DEFAULT_CONFIG: &str = "/etc/mirror-gateway/gateway.toml";

#[derive(Subcommand)]
enum Command {
    /// Serve requests until SIGTERM (graceful) or SIGINT (fast).
    Run {
        /// Config file; default: the `-c` before the subcommand, else
        /// $MIRROR_GATEWAY_CONFIG, else /etc/mirror-gateway/gateway.toml.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Take over the listening sockets of the running gateway named in
        /// `server.pid_file` (zero-downtime binary upgrade); sends it SIGQUIT.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config file and list every error; exit 0 when valid, 1 otherwise.
    Check {
        /// Config file; default: the `-c` before the subcommand, else
        /// $MIRROR_GATEWAY_CONFIG, else /etc/mirror-gateway/gateway.toml.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Sync the export trees once from their sources (S3 or a directory), then exit.
    Sync {
        /// File with the `[sync]` section: a sync file or the gateway's config file; default:
        /// the `-c` before the subcommand, else $MIRROR_GATEWAY_CONFIG, else
        /// /etc/mirror-gateway/gateway.toml.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Run only this job (repeatable); all jobs when not given.
        #[arg(long = "job", value_name = "NAME")]
        jobs: Vec<String>,
        /// Publish even when a snapshot removes more than `max_delete_fraction` of the files.
        #[arg(long)]
        allow_mass_delete: bool,
    },
    /// Ask the running gateway to reload its configuration (SIGHUP to the pid in
    /// `server.pid_file`), as `nginx -s reload` does.
    Reload {
        /// Config file of the running gateway; default: the `-c` before the subcommand, else
        /// $MIRROR_GATEWAY_CONFIG, else /etc/mirror-gateway/gateway.toml.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let or_default = |config: Option<PathBuf>| config.unwrap_or_else(|| cli.config.clone());
    match cli.command {
        Some(Command::Version) => {
            println!("mirror-gateway {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(Command::Check { config }) => check(&or_default(config)),
        Some(Command::Reload { config }) => reload(&or_default(config)),
        Some(Command::Run { config, upgrade }) => run(&or_default(config), upgrade),
        Some(Command::Sync {
            config,
            jobs,
            allow_mass_delete,
        }) => sync(or_default(config), jobs, allow_mass_delete),
        None => run(&cli.config, false),
    }
}

fn load(path: &Path) -> Result<GatewayConfig, ExitCode> {
    let env = utf8_environment()?;
    mirror_proxy::logging::while_loading(|| config::load(path, env)).map_err(|errors| {
        for error in &errors {
            eprintln!("error: {error}");
        }
        let in_sync = sync_error_count(&errors);
        if in_sync > 0 {
            eprintln!("{}: {in_sync} error(s) in [sync]", path.display());
        }
        eprintln!(
            "{}: {} error(s); nothing was started",
            path.display(),
            errors.len()
        );
        ExitCode::FAILURE
    })
}

/// Returns how many of `errors` are in the `[sync]` section.
fn sync_error_count(errors: &[config::ConfigError]) -> usize {
    errors
        .iter()
        .filter(|e| mirror_sync::config::is_sync_key(&e.key))
        .count()
}

/// Returns the environment's UTF-8 variables; a config override that is not UTF-8 is an error.
fn utf8_environment() -> Result<Vec<(String, String)>, ExitCode> {
    let (vars, not_utf8) = split_environment();
    match not_utf8.first() {
        Some(name) => {
            eprintln!("error: {name}: the value is not valid UTF-8; set it as UTF-8 text");
            Err(ExitCode::FAILURE)
        }
        None => Ok(vars),
    }
}

/// Returns the environment's UTF-8 variables, and the names of the config overrides whose
/// value is not UTF-8, which the variables leave out.
fn split_environment() -> (Vec<(String, String)>, Vec<String>) {
    let mut vars = Vec::new();
    let mut not_utf8 = Vec::new();
    for (name, value) in std::env::vars_os() {
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => vars.push((name, value)),
            (Ok(name), Err(_)) if name.starts_with(config::ENV_PREFIX) => not_utf8.push(name),
            _ => {}
        }
    }
    (vars, not_utf8)
}

fn check(path: &Path) -> ExitCode {
    if is_sync_file(path) {
        return check_sync_file(path);
    }
    match load(path) {
        Ok(config) => {
            for warning in &config.warnings {
                eprintln!("warning: {warning}");
            }
            let jobs = config.sync.as_ref().map_or(String::new(), |sync| {
                format!(", {} sync job(s)", sync.jobs.len())
            });
            println!(
                "{}: configuration is valid ({} domain(s){jobs})",
                path.display(),
                config.domains.len()
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// Validates a file with a `[sync]` section and no `[domains]`: a sync file of its own, which
/// `mirror-gateway sync` reads and the gateway does not.
fn check_sync_file(path: &Path) -> ExitCode {
    let env = match utf8_environment() {
        Ok(env) => env,
        Err(code) => return code,
    };
    match mirror_sync::config::load(path, &env) {
        Ok(sync) => {
            println!(
                "{}: sync configuration is valid ({} job(s))",
                path.display(),
                sync.jobs.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for error in &errors {
                eprintln!("error: {error}");
            }
            eprintln!("{}: {} error(s) in [sync]", path.display(), errors.len());
            ExitCode::FAILURE
        }
    }
}

fn sync(config: PathBuf, jobs: Vec<String>, allow_mass_delete: bool) -> ExitCode {
    let env = match utf8_environment() {
        Ok(env) => env,
        Err(code) => return code,
    };
    mirror_proxy::logging::init("info");
    let args = mirror_sync::SyncArgs {
        config,
        jobs,
        allow_mass_delete,
        env,
    };
    match mirror_sync::run_once(&args) {
        true => ExitCode::SUCCESS,
        false => ExitCode::FAILURE,
    }
}

fn run(path: &Path, upgrade: bool) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    mirror_proxy::logging::init(&config.log.level);
    let app = match App::build_with(&config, upgrade) {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    let plain = app.listen_addrs().iter().map(|a| format!("http://{a}"));
    let tls = app.tls_addrs().iter().map(|a| format!("https://{a}"));
    let listeners: Vec<String> = plain.chain(tls).collect();
    let admin = app
        .admin_addr()
        .map_or_else(|| "off".to_string(), |a| format!("http://{a}"));
    let domains: Vec<&str> = config.domains.iter().map(|d| d.id.as_str()).collect();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %path.display(),
        listeners = ?listeners,
        admin = %admin,
        domains = ?domains,
        "mirror-gateway starting"
    );
    // `run` logs "mirror-gateway stopped" itself, also when it ends the process early.
    app.run(&config.server.pid_file);
    ExitCode::SUCCESS
}

/// Sends SIGHUP to the gateway whose pid file the config names.
///
/// The running gateway validates the file again with its own environment, which may differ
/// from this shell's (a secret path set by the service manager, say). So errors found here are
/// warnings, and the signal is sent anyway. Only a pid file that cannot be found stops it.
fn reload(path: &Path) -> ExitCode {
    let env = reload_environment();
    let validation = mirror_proxy::logging::while_loading(|| config::load(path, env.clone()));
    let pid_file = match validation {
        Ok(config) => config.server.pid_file,
        Err(errors) => match config::pid_file(path, env) {
            Ok(pid_file) => {
                for error in &errors {
                    eprintln!("warning: {error}");
                }
                let in_sync = sync_error_count(&errors);
                if in_sync > 0 {
                    eprintln!(
                        "warning: {}: {in_sync} error(s) in [sync]; the running gateway rejects \
                         the reload when it finds them too",
                        path.display()
                    );
                }
                eprintln!(
                    "warning: {}: {} error(s) found with this shell's environment; the running \
                     gateway checks the file with its own environment and logs whether the \
                     reload was applied",
                    path.display(),
                    errors.len()
                );
                pid_file
            }
            // The file cannot be read or parsed: the validation found the same problem, so
            // it is printed once, as the error it is.
            Err(error) => {
                eprintln!("error: {error}");
                eprintln!(
                    "{}: cannot tell which pid file server.pid_file names, so no signal was sent",
                    path.display()
                );
                return ExitCode::FAILURE;
            }
        },
    };
    let pid = match mirror_proxy::pid_file::running_gateway(&pid_file) {
        Ok(pid) => pid,
        Err(problem) => {
            eprintln!(
                "error: {}: {problem}; check server.pid_file in {} (or \
                 {}SERVER__PID_FILE), or send SIGHUP to the gateway's pid directly: \
                 kill -HUP <pid>",
                pid_file.display(),
                path.display(),
                config::ENV_PREFIX
            );
            return ExitCode::FAILURE;
        }
    };
    let sighup = nix::sys::signal::Signal::SIGHUP;
    match mirror_proxy::pid_file::signal(pid, sighup, &pid_file) {
        Ok(()) => {
            // The signal carries no path: the gateway reads the file it was started with again.
            println!(
                "sent SIGHUP to mirror-gateway (pid {pid}, found in {}); the gateway reloads \
                 the config file it was started with, which may not be {}; its log says \
                 whether the reload was applied",
                pid_file.display(),
                path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Returns the environment's UTF-8 variables for `reload`. A config override that is not
/// UTF-8 is left out with a warning: the running gateway reads its own environment.
fn reload_environment() -> Vec<(String, String)> {
    let (vars, not_utf8) = split_environment();
    for name in not_utf8 {
        eprintln!("warning: {name}: the value is not valid UTF-8, so it is left out here");
    }
    vars
}

/// Returns whether the file has a `[sync]` table and no `[domains]`: a sync file of its own.
fn is_sync_file(path: &Path) -> bool {
    top_level_table(path)
        .is_some_and(|table| table.contains_key("sync") && !table.contains_key("domains"))
}

/// Returns the file's top-level TOML table, or `None` when it cannot be read or parsed.
fn top_level_table(path: &Path) -> Option<toml::Table> {
    std::fs::read_to_string(path).ok()?.parse().ok()
}
