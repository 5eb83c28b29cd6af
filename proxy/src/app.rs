//! Start-up: from a validated config to a running Pingora server.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::IntoRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use nix::fcntl::{Flock, FlockArg};
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::ServerConf;
use pingora::server::{
    ListenFds, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch,
};
use pingora::services::listening::Service;
use tokio::sync::oneshot;

use crate::access_log::AccessLog;
use crate::cache::{CacheTier, TierSnapshot};
use crate::config::{GatewayConfig, OriginKind};
use crate::gateway::{Gateway, GatewayState};
use crate::origin::file_server::file_server_service;
use crate::proxy_protocol::ProxyProtocol;
use crate::tls::{Handshaker, ProxyListener};
use crate::upstream::Upstream;

/// A gateway built from a config, with its listening sockets bound, ready to run.
pub struct App {
    server: Server,
    handles: Handles,
    runtime_dir: RuntimeDir,
}

/// What a built or running gateway exposes: its addresses, counters and reload. `App` and
/// [`RunningGateway`] both dereference to it.
pub struct Handles {
    listen: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    state: Arc<GatewayState>,
    reloader: Arc<crate::reload::Reloader>,
    monitor: Arc<crate::status::Monitor>,
}

impl Handles {
    /// Returns the bound listening addresses (port 0 in the config resolved to the real port).
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen
    }

    /// Returns the admin listener's bound address, when one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Returns the gateway's metrics and health, for the parts that report to them: TLS
    /// handshakes, reloads, sync runs and the sync lag hook.
    pub fn monitor(&self) -> Arc<crate::status::Monitor> {
        Arc::clone(&self.monitor)
    }

    /// Returns the bound TLS listening addresses (port 0 resolved).
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        self.state.tls.addrs()
    }

    /// Returns the certificate store of the TLS listeners; its `reload` swaps certificates.
    pub fn tls_store(&self) -> Arc<crate::tls::TlsStore> {
        Arc::clone(self.state.tls.store())
    }

    /// Reloads the config file now, with environment overrides from `env`, as SIGHUP does
    /// with the process environment.
    pub fn reload(&self, env: Vec<(String, String)>) -> crate::reload::ReloadOutcome {
        self.reloader.reload_with(env)
    }

    /// Returns the restart-only settings whose value in the last applied configuration
    /// differs from the value this process started with, as config keys.
    pub fn restart_pending(&self) -> Vec<&'static str> {
        self.reloader.restart_pending()
    }

    /// Returns the memory tier's counters.
    pub fn memory_stats(&self) -> TierSnapshot {
        self.state.cache.memory_stats()
    }

    /// Returns the disk tier's counters, when there is a disk tier.
    pub fn disk_stats(&self) -> Option<crate::cache::DiskSnapshot> {
        self.state.cache.disk_stats()
    }

    /// Removes the stored responses in `scope`, as the admin listener's purge does, and
    /// returns how many were removed.
    pub fn purge(&self, scope: &crate::cache::PurgeScope) -> usize {
        self.state.cache.purge(scope)
    }
}

impl std::ops::Deref for App {
    type Target = Handles;

    fn deref(&self) -> &Handles {
        &self.handles
    }
}

/// The reason the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}; free the port or change server.listen")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot create the runtime directory {path}: {source}; set server.runtime_dir")]
    RuntimeDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the access log: {0}")]
    AccessLog(std::io::Error),
    #[error("domain {domain}, origin {origin}: {reason}")]
    Origin {
        domain: String,
        origin: String,
        reason: String,
    },
    #[error("{0}; check cache.disk_dir")]
    DiskCache(crate::cache::DiskError),
    #[error("{0}")]
    Hosts(String),
    #[error("cannot listen on {addr}: {source}; free the port or change server.tls_listen")]
    TlsListen {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}; free the port or change admin.listen")]
    AdminListen {
        addr: String,
        source: std::io::Error,
    },
    #[error(
        "cannot take over from a running gateway: {pid_file}: {reason}; start without \
         --upgrade when no gateway runs, or check server.pid_file"
    )]
    Upgrade { pid_file: PathBuf, reason: String },
}

impl App {
    /// Builds every service and binds every socket, so that errors surface before running.
    pub fn build(config: &GatewayConfig) -> Result<Self, StartError> {
        Self::build_with(config, false)
    }

    /// Builds the gateway like [`App::build`]; with `upgrade`, it takes over the listening
    /// sockets of the running gateway instead of binding them (Pingora's zero-downtime
    /// upgrade): it waits until that process gets SIGQUIT and hands them over.
    pub fn build_with(config: &GatewayConfig, upgrade: bool) -> Result<Self, StartError> {
        Self::build_inner(config, upgrade, crate::cache::CacheClock::system())
    }

    /// Builds the gateway like [`App::build`], with the cache's freshness following `clock`
    /// instead of the system clock: a test harness moves it forward to expire responses
    /// without sleeping.
    #[doc(hidden)]
    pub fn build_with_cache_clock(
        config: &GatewayConfig,
        clock: &crate::cache::TestClock,
    ) -> Result<Self, StartError> {
        Self::build_inner(config, false, clock.cache_clock())
    }

    fn build_inner(
        config: &GatewayConfig,
        upgrade: bool,
        clock: crate::cache::CacheClock,
    ) -> Result<Self, StartError> {
        let runtime_dir = RuntimeDir::create(config.server.runtime_dir.as_deref())?;
        let server_conf = server_conf(config, runtime_dir.path());
        let options = pingora::server::configuration::Opt {
            upgrade,
            ..Default::default()
        };
        let mut server = Server::new_with_opt_and_conf(Some(options), server_conf);
        if upgrade {
            let upgrading = signal_running_gateway(&config.server.pid_file)?;
            server.bootstrap();
            // The sockets are here (bootstrap exits the process otherwise), so the next
            // upgrade may start.
            drop(upgrading);
        }
        let binder = Binder { upgrade };
        for warning in &config.warnings {
            tracing::warn!(%warning, "config warning");
        }
        let tls = crate::tls::CertStore::from_config(config)
            .map_err(|e| StartError::Tls(e.to_string()))?;
        let tls_bound = binder.tls(&config.tls.listen)?;
        let tls = Arc::new(crate::tls::TlsState::new(
            Arc::new(crate::tls::TlsStore::new(tls)),
            tls_bound.iter().map(|(addr, _)| *addr).collect(),
        ));

        // The export-tree file servers run for the whole process; a reload reuses them.
        let mut export_trees = std::collections::HashMap::new();
        for domain in &config.domains {
            for origin in &domain.origins {
                if !matches!(origin.kind, OriginKind::ExportTree(_)) {
                    continue;
                }
                let upstream =
                    Upstream::new(&domain.id, origin, runtime_dir.path()).map_err(|reason| {
                        StartError::Origin {
                            domain: domain.id.clone(),
                            origin: origin.name.clone(),
                            reason,
                        }
                    })?;
                if let Upstream::ExportTree { tree, socket } = &upstream {
                    let name = format!("export tree {}/{}", domain.id, origin.name);
                    let service = file_server_service(&name, Arc::clone(tree), socket);
                    let listener = bind_unix(socket)?;
                    server.add_service(Prebound::new(
                        service,
                        vec![(socket_key(socket), listener.into_raw_fd())],
                    ));
                    export_trees.insert(socket.clone(), tree.root().to_path_buf());
                }
            }
        }
        let shared = crate::reload::Shared {
            cache: Arc::new(CacheTier::new(&config.cache, clock).map_err(StartError::DiskCache)?),
            access_log: AccessLog::open(&config.log.access_log, config.log.access_log_format)
                .map_err(StartError::AccessLog)?,
            rejections: Default::default(),
            runtime_dir: runtime_dir.path().to_path_buf(),
            export_trees,
            tls: Arc::clone(&tls),
        };
        // Started once with the tier: a reload keeps the tier, and with it this one sweeper.
        if let Some(sweeper) = crate::cache::DiskSweeper::for_tier(&shared.cache) {
            server.add_service(pingora::services::background::background_service(
                "disk cache sweep",
                sweeper,
            ));
        }
        let state =
            Arc::new(crate::reload::build_state(config, &shared).map_err(StartError::Hosts)?);
        let current = Arc::new(ArcSwap::new(Arc::clone(&state)));
        let monitor = Arc::new(crate::status::Monitor::default());
        // A `[sync]` section in the gateway's file makes the gateway run the sync jobs itself;
        // the scheduler runs in any case, so that a reload can add the section later.
        let (sync, scheduler) =
            crate::sync_service::service(config.sync.clone(), Arc::clone(&monitor));
        server.add_service(scheduler);
        let reloader = Arc::new(crate::reload::Reloader::new(
            config,
            Arc::clone(&current),
            shared,
            Arc::clone(&monitor),
            sync,
        ));
        server.add_service(pingora::services::background::background_service(
            "config reload",
            crate::reload::ReloadService(Arc::clone(&reloader)),
        ));

        // One proxy serves both kinds of listener, so they share the origin connection pools.
        let mut proxy = pingora::proxy::http_proxy(
            &server.configuration,
            Gateway::new(Arc::clone(&current)).with_monitor(Arc::clone(&monitor)),
        );
        // `server.keepalive_timeout_secs`, unless 0 turns keep-alive off.
        let keepalive = Some(config.server.keepalive_timeout).filter(|wait| !wait.is_zero());
        // Pingora keeps an HTTP/2 connection with no stream open forever unless an idle timeout
        // is set. HTTP/1 connections get the same limit per request (`Gateway`), where a
        // reload applies.
        let mut server_options = pingora::apps::HttpServerOptions::default();
        server_options.h2_idle_timeout = keepalive;
        proxy.server_options = Some(server_options);
        let proxy = Arc::new(proxy);
        // The trusted proxies come from the state in use at each accept, so a reload applies.
        let proxy_protocol = config.server.proxy_protocol.then(|| {
            Arc::new(ProxyProtocol::new(
                config.server.proxy_protocol_timeout,
                Arc::clone(&current),
                Arc::clone(&monitor),
            ))
        });
        // An HTTP/2 client gets as long for its connection preface as an idle connection may
        // stay open.
        let preface_wait = keepalive.unwrap_or(crate::tls::H2_PREFACE_WAIT);
        let with_proxy_protocol = |listener: ProxyListener<_>| {
            let listener = listener
                .counted(Arc::clone(&monitor.connections))
                .with_h2_preface_wait(preface_wait);
            match &proxy_protocol {
                Some(proxy_protocol) => listener.with_proxy_protocol(Arc::clone(proxy_protocol)),
                None => listener,
            }
        };
        let mut plain = Service::new(
            "mirror-gateway proxy".into(),
            with_proxy_protocol(ProxyListener::plain(Arc::clone(&proxy))),
        );
        let mut prebound = Vec::new();
        let mut listen = Vec::new();
        for addr in &config.server.listen {
            let (bound, fd) = binder.tcp(*addr)?;
            plain.add_listener(client_listener(&bound.to_string()));
            prebound.extend(fd.map(|fd| (bound.to_string(), fd)));
            listen.push(bound);
        }
        server.add_service(Prebound::new(plain, prebound));
        if !tls_bound.is_empty() {
            let handshaker = Handshaker::new(tls.store(), &monitor).map_err(StartError::Tls)?;
            let mut secure = Service::new(
                "mirror-gateway TLS proxy".into(),
                with_proxy_protocol(ProxyListener::tls(proxy, handshaker)),
            );
            let mut prebound = Vec::new();
            for (bound, fd) in tls_bound {
                secure.add_listener(client_listener(&bound.to_string()));
                prebound.extend(fd.map(|fd| (bound.to_string(), fd)));
            }
            server.add_service(Prebound::new(secure, prebound));
        }

        let mut admin_addr = None;
        if let Some(admin) = &config.admin {
            let app = crate::admin::AdminApp::new(Arc::clone(&current), Arc::clone(&admin.users))
                .with_monitor(Arc::clone(&monitor));
            let mut service = Service::new("mirror-gateway admin".into(), app);
            let (bound, fd) = binder.tcp(admin.listen).map_err(|e| match e {
                StartError::Listen { addr, source } => StartError::AdminListen { addr, source },
                other => other,
            })?;
            service.add_tcp(&bound.to_string());
            let prebound = fd.map(|fd| (bound.to_string(), fd)).into_iter().collect();
            server.add_service(Prebound::new(service, prebound));
            admin_addr = Some(bound);
        }
        let drain = crate::status::DrainLimits {
            grace_period: config.server.grace_period,
            shutdown_timeout: config.server.shutdown_timeout,
        };
        server.add_service(crate::status::lifecycle_service(
            Arc::clone(&monitor),
            drain,
        ));
        Ok(Self {
            server,
            handles: Handles {
                listen,
                admin_addr,
                state,
                reloader,
                monitor,
            },
            runtime_dir,
        })
    }

    /// Runs until SIGTERM (graceful), SIGINT (fast) or SIGQUIT (upgrade hand-over), with the
    /// process id in `pid_file` for `mirror-gateway reload`.
    ///
    /// Pingora 0.9.1 sleeps through the whole grace period of a graceful shutdown, even with
    /// nothing left to serve. A watcher thread ends the process as soon as no client connection
    /// is open after the shutdown began, with the same final steps as the end of the period.
    pub fn run(self, pid_file: &Path) {
        if let Err(e) = std::fs::write(pid_file, format!("{}\n", std::process::id())) {
            tracing::warn!(path = %pid_file.display(), error = %e, "cannot write the pid file; `mirror-gateway reload` will not find this process");
        }
        let Self {
            server,
            handles,
            runtime_dir,
        } = self;
        let finish = Arc::new(Finish {
            done: std::sync::Once::new(),
            monitor: Arc::clone(&handles.monitor),
            access_log: handles.state.access_log.clone(),
            pid_file: pid_file.to_path_buf(),
            runtime_dir: parking_lot::Mutex::new(Some(runtime_dir)),
        });
        let watcher = Arc::clone(&finish);
        let spawned = std::thread::Builder::new()
            .name("shutdown-watch".into())
            .spawn(move || watcher.exit_when_idle());
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the shutdown watcher; a graceful shutdown takes the whole grace period");
        }
        server.run(RunArgs::default());
        finish.finish();
    }

    /// Runs on a background thread until [`RunningGateway::shutdown`] or drop; for tests and
    /// embedding.
    pub fn spawn(self) -> RunningGateway {
        let (sender, receiver) = oneshot::channel();
        let Self {
            server,
            handles,
            runtime_dir,
        } = self;
        let thread = std::thread::Builder::new()
            .name("mirror-gateway".into())
            .spawn(move || {
                let watch = ChannelShutdown(Mutex::new(Some(receiver)));
                server.run(RunArgs {
                    shutdown_signal: Box::new(watch),
                });
                drop(runtime_dir);
            })
            .ok();
        RunningGateway {
            handles,
            shutdown: Some(sender),
            thread,
        }
    }
}

/// How often the shutdown watcher looks at the shutdown state and the open connections.
const SHUTDOWN_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// The last steps of a shutdown, run once: by the shutdown watcher when the last client
/// connection closed, or after Pingora's grace period, whichever comes first.
struct Finish {
    done: std::sync::Once,
    monitor: Arc<crate::status::Monitor>,
    access_log: AccessLog,
    pid_file: std::path::PathBuf,
    runtime_dir: parking_lot::Mutex<Option<RuntimeDir>>,
}

impl Finish {
    /// Waits for a graceful shutdown to begin and for the last client connection to close,
    /// then finishes and exits the process.
    fn exit_when_idle(&self) {
        let health = &self.monitor.health;
        while !health.is_draining() {
            std::thread::sleep(SHUTDOWN_POLL);
        }
        // Two idle looks in a row, a poll apart: a connection accepted just before the listeners
        // stopped is counted once its task starts.
        let connections = &self.monitor.connections;
        let mut idle_looks = 0;
        while idle_looks < 2 {
            std::thread::sleep(SHUTDOWN_POLL);
            idle_looks = if connections.count() == 0 {
                idle_looks + 1
            } else {
                0
            };
        }
        tracing::info!("no client connection left; ending the shutdown before the grace period");
        self.finish();
        std::process::exit(0);
    }

    /// Logs how long the drain took, saves the budget counts, flushes the access log, removes
    /// the pid file and the runtime directory, and logs the stop.
    fn finish(&self) {
        self.done.call_once(|| {
            match self.monitor.health.draining_for() {
                Some(drain) => tracing::info!(
                    drain_secs = drain.as_secs_f64(),
                    "shutdown finished after draining for {:.1} s",
                    drain.as_secs_f64()
                ),
                // A fast shutdown (SIGINT) does not broadcast the graceful shutdown.
                None => tracing::info!("shutdown finished without draining"),
            }
            // Hourly request counts survive the restart that usually follows a shutdown.
            mirror_plugins::quota::save_state_files();
            // Requests reserved in Redis and not used go back, and requests counted here alone
            // while Redis was away go to it, for the other replicas and the next start.
            mirror_plugins::quota::settle_with_redis();
            self.access_log.flush(std::time::Duration::from_secs(2));
            // After an upgrade the file contains the new process's pid; leave it alone then.
            let ours = std::fs::read_to_string(&self.pid_file)
                .is_ok_and(|text| text.trim() == std::process::id().to_string());
            if ours {
                let _ = std::fs::remove_file(&self.pid_file);
            }
            drop(self.runtime_dir.lock().take());
            tracing::info!("mirror-gateway stopped");
        });
    }
}

/// A gateway running on a background thread.
pub struct RunningGateway {
    handles: Handles,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::ops::Deref for RunningGateway {
    type Target = Handles;

    fn deref(&self) -> &Handles {
        &self.handles
    }
}

impl RunningGateway {
    /// Stops the gateway gracefully and waits for it.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(sender) = self.shutdown.take() {
            let _ = sender.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops the server when its channel fires or its sender is dropped.
struct ChannelShutdown(Mutex<Option<oneshot::Receiver<()>>>);

#[async_trait]
impl ShutdownSignalWatch for ChannelShutdown {
    async fn recv(&self) -> ShutdownSignal {
        let receiver = self.0.lock().ok().and_then(|mut r| r.take());
        if let Some(receiver) = receiver {
            let _ = receiver.await;
        }
        ShutdownSignal::GracefulTerminate
    }
}

/// Bytes of a client connection's write buffer.
///
/// Pingora holds up to 1460 bytes (one Ethernet MSS) of a response before writing, header
/// included. With a header of 300 to 600 bytes, a response whose body is a little over 1 KB
/// (a small index, a signature) then leaves in two `send` calls, each waking the client. 2 KiB
/// leaves room for the header next to one MSS of body. The buffer also bounds how long the
/// bytes of a slow origin wait before going out: a `Content-Length` body is written when more
/// than this much has gathered, or at its end.
const CLIENT_WRITE_BUFFER_BYTES: usize = 2 * 1024;

/// Returns the listener config of a client-facing TCP address.
fn client_listener(addr: &str) -> ListenerConfig {
    let buffers = L4BufferSettings::default().write(CLIENT_WRITE_BUFFER_BYTES);
    ListenerConfig::tcp(addr).l4_buffer(buffers)
}

/// Sends SIGQUIT to the gateway named in `pid_file`, so that it hands its listening sockets
/// to this process, which waits for them next. The old process tries to connect for about
/// 5 seconds (Pingora 0.9.1), and this process binds the hand-over socket right after.
///
/// Returns a lock on `<pid_file>.upgrade.lock`, to be held until the sockets arrived: a second
/// `run --upgrade` meanwhile would find no sockets to take.
fn signal_running_gateway(pid_file: &Path) -> Result<Flock<std::fs::File>, StartError> {
    let failed = |reason| StartError::Upgrade {
        pid_file: pid_file.to_path_buf(),
        reason,
    };
    let lock_path = pid_file.with_extension("upgrade.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| failed(format!("cannot open {}: {e}", lock_path.display())))?;
    let upgrading = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|_| {
        failed("another `run --upgrade` is waiting for the sockets; let it finish".into())
    })?;
    let pid = crate::pid_file::running_gateway(pid_file).map_err(failed)?;
    crate::pid_file::signal(pid, nix::sys::signal::Signal::SIGQUIT, pid_file).map_err(failed)?;
    tracing::info!(%pid, "sent SIGQUIT to the running gateway; waiting for its listening sockets");
    Ok(upgrading)
}

fn server_conf(config: &GatewayConfig, runtime_dir: &Path) -> ServerConf {
    ServerConf {
        threads: config.server.threads,
        grace_period_seconds: Some(config.server.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(config.server.shutdown_timeout.as_secs()),
        upstream_keepalive_pool_size: config.server.upstream_keepalive_pool_size,
        pid_file: runtime_dir.join("mirror-gateway.pid").display().to_string(),
        // The old and the new process of an upgrade must agree on this path, so it sits beside
        // the pid file rather than in the per-process runtime directory.
        upgrade_sock: config
            .server
            .pid_file
            .with_extension("upgrade.sock")
            .display()
            .to_string(),
        ..ServerConf::default()
    }
}

/// A Pingora service whose listening sockets were bound before the server started.
///
/// Binding early lets `App::build` report the real port of a `:0` address and fail fast on a
/// port in use, and it makes the internal Unix sockets exist before the first request.
struct Prebound<S> {
    inner: S,
    fds: Vec<(String, i32)>,
}

impl<S> Prebound<S> {
    fn new(inner: S, fds: Vec<(String, i32)>) -> Self {
        Self { inner, fds }
    }
}

#[async_trait]
impl<S: pingora::services::Service> pingora::services::Service for Prebound<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        if let Some(table) = &fds {
            let mut table = table.lock();
            for (addr, fd) in self.fds.drain(..) {
                table.add(addr, fd);
            }
        }
        self.inner
            .start_service(fds, shutdown, listeners_per_fd)
            .await;
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }
}

/// Binds a TCP listener (port 0 picks a free port) and returns its address and descriptor.
fn bind_tcp(addr: SocketAddr) -> Result<(SocketAddr, i32), StartError> {
    let error = |source| StartError::Listen {
        addr: addr.to_string(),
        source,
    };
    let listener = TcpListener::bind(addr).map_err(error)?;
    let bound = listener.local_addr().map_err(error)?;
    // Tokio refuses to adopt a blocking socket.
    listener.set_nonblocking(true).map_err(error)?;
    Ok((bound, listener.into_raw_fd()))
}

/// Binds the TCP listeners, or, in an upgrade, leaves them to the sockets the old process
/// hands over (Pingora finds them by address).
struct Binder {
    upgrade: bool,
}

impl Binder {
    /// Returns the listener's address and, when this process bound it, its descriptor.
    fn tcp(&self, addr: SocketAddr) -> Result<(SocketAddr, Option<i32>), StartError> {
        if !self.upgrade {
            return bind_tcp(addr).map(|(bound, fd)| (bound, Some(fd)));
        }
        if addr.port() == 0 {
            return Err(StartError::Listen {
                addr: addr.to_string(),
                source: std::io::Error::other(
                    "an upgrade takes over fixed ports; port 0 cannot be handed over",
                ),
            });
        }
        Ok((addr, None))
    }

    /// Binds each TLS listener like [`Binder::tcp`]; an error names `server.tls_listen`.
    fn tls(&self, addrs: &[SocketAddr]) -> Result<Vec<(SocketAddr, Option<i32>)>, StartError> {
        let rename = |e| match e {
            StartError::Listen { addr, source } => StartError::TlsListen { addr, source },
            other => other,
        };
        addrs.iter().map(|a| self.tcp(*a).map_err(rename)).collect()
    }
}

fn bind_unix(path: &Path) -> Result<UnixListener, StartError> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).and_then(|l| l.set_nonblocking(true).map(|()| l));
    listener.map_err(|source| StartError::Listen {
        addr: path.display().to_string(),
        source,
    })
}

fn socket_key(path: &Path) -> String {
    path.display().to_string()
}

/// A private directory for the process's internal sockets, removed when dropped.
struct RuntimeDir(PathBuf);

impl RuntimeDir {
    fn create(base: Option<&Path>) -> Result<Self, StartError> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let base = base
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from))
            .unwrap_or_else(std::env::temp_dir);
        let name = format!(
            "mirror-gateway-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = base.join(name);
        let mut created = std::fs::DirBuilder::new().mode(0o700).create(&path);
        if created
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::AlreadyExists)
        {
            // The name holds this process's id, so the directory is a leftover of a process
            // that had the same id and was killed before it could remove it.
            let _ = std::fs::remove_dir_all(&path);
            created = std::fs::DirBuilder::new().mode(0o700).create(&path);
        }
        created.map_err(|source| StartError::RuntimeDir {
            path: path.clone(),
            source,
        })?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
