//! End-to-end: live reload by call, by SIGHUP and by `mirror-gateway reload`, under load.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{client, spawn_gateway, Reply, TestGateway, TestOrigin, BASE_CONFIG};
use mirror_proxy::reload::ReloadOutcome;

/// A config with one domain answering `hosts` from an HTTP origin, with a quota of `budget`
/// index requests per hour.
fn config(
    id: &str,
    origin: std::net::SocketAddr,
    hosts: &str,
    budget: u32,
    extra_server: &str,
) -> String {
    let base = BASE_CONFIG.replace("[server]\n", &format!("[server]\n{extra_server}\n"));
    format!(
        r#"{base}
[domains.reload-{pid}]
hosts = [{hosts}]
[domains.reload-{pid}.origins.web]
kind = "http"
addresses = ["{origin}"]
[[domains.reload-{pid}.routes]]
prefix = "/"
origin = "web"
[[domains.reload-{pid}.plugins]]
name = "quota"
index_per_hour = {budget}
download_per_hour = 1000000
index_paths = ["/index.json"]
download_paths = ["/**"]
"#,
        pid = format!("{}-{id}", std::process::id()),
    )
}

async fn status(url: String, host: &str) -> u16 {
    client()
        .get(url)
        .header("host", host)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_adds_host_keeps_cache() {
    let id = "reload-adds-host-keeps-cache";
    let origin = TestOrigin::start(|_| Reply::ok("payload")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = TestGateway::start(dir.path(), &config(id, origin.addr, "\"a.test\"", 100, ""));
    assert_eq!(status(gateway.url("/bundle.json"), "a.test").await, 200);
    assert_eq!(status(gateway.url("/bundle.json"), "b.test").await, 421);

    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        config(id, origin.addr, "\"a.test\", \"b.test\"", 100, ""),
    )
    .expect("write");
    assert_eq!(gateway.running.reload(Vec::new()), ReloadOutcome::Applied);
    assert_eq!(status(gateway.url("/bundle.json"), "b.test").await, 200);
    let hit = client()
        .get(gateway.url("/bundle.json"))
        .header("host", "a.test")
        .send()
        .await
        .expect("after reload");
    assert_eq!(
        hit.headers()["x-cache-status"],
        "HIT",
        "the cache survives a reload"
    );
    assert_eq!(origin.count(), 1);
}

/// Writes a config that adds host `b.test`, then returns the status of a request for `b.test`
/// after `wait`.
async fn status_after_edit(reload_on_change: bool, wait: Duration) -> u16 {
    let id = format!("edit-reloads-{reload_on_change}");
    let origin = TestOrigin::start(|_| Reply::ok("payload")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = format!("reload_on_change = {reload_on_change}");
    let gateway = TestGateway::start(
        dir.path(),
        &config(&id, origin.addr, "\"a.test\"", 100, &server),
    );
    assert_eq!(status(gateway.url("/bundle.json"), "b.test").await, 421);
    let edited = config(&id, origin.addr, "\"a.test\", \"b.test\"", 100, &server);
    std::fs::write(dir.path().join("gateway.toml"), edited).expect("write");
    let deadline = Instant::now() + wait;
    loop {
        let got = status(gateway.url("/bundle.json"), "b.test").await;
        if got != 421 || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn edited_file_reloads_by_itself() {
    assert_eq!(status_after_edit(true, Duration::from_secs(10)).await, 200);
}

/// The file is checked every 2 seconds, so 5 seconds cover two checks.
#[tokio::test(flavor = "multi_thread")]
async fn edited_file_waits_for_reload_when_off() {
    assert_eq!(status_after_edit(false, Duration::from_secs(5)).await, 421);
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_reload_keeps_running() {
    let id = "broken-reload-keeps-running";
    let origin = TestOrigin::start(|_| Reply::ok("payload")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = TestGateway::start(dir.path(), &config(id, origin.addr, "\"a.test\"", 100, ""));
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, "[server]\nthreads = \"many\"\n").expect("write broken config");
    let outcome = gateway.running.reload(Vec::new());
    assert!(
        matches!(&outcome, ReloadOutcome::Rejected(errors) if errors.iter().any(|e| e.contains("server.threads"))),
        "{outcome:?}"
    );
    assert_eq!(status(gateway.url("/bundle.json"), "a.test").await, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_keeps_quota_counts() {
    let id = "reload-keeps-quota-counts";
    let origin = TestOrigin::start(|_| Reply::ok("{}")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = TestGateway::start(dir.path(), &config(id, origin.addr, "\"a.test\"", 3, ""));
    // Budgets reset at every UTC hour; stay clear of the boundary.
    let into_hour = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() % 3600);
    if into_hour > 3590 {
        tokio::time::sleep(Duration::from_secs(3601 - into_hour)).await;
    }
    for _ in 0..2 {
        assert_eq!(status(gateway.url("/index.json"), "a.test").await, 200);
    }
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config(id, origin.addr, "\"a.test\"", 2, "")).expect("write");
    assert_eq!(gateway.running.reload(Vec::new()), ReloadOutcome::Applied);
    assert_eq!(
        status(gateway.url("/index.json"), "a.test").await,
        429,
        "the new budget applies to the count so far"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_under_load_drops_nothing() {
    let id = "reload-under-load-drops-nothing";
    let origin = TestOrigin::start(|_| Reply::ok("payload")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = TestGateway::start(
        dir.path(),
        &config(id, origin.addr, "\"a.test\"", 100_000, ""),
    );
    let url = gateway.url("/bundle.json");
    let load = tokio::spawn(async move {
        let client = client();
        let mut failures = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut sent = 0;
        while Instant::now() < deadline && sent < 2_000 {
            let status = client
                .get(&url)
                .header("host", "a.test")
                .send()
                .await
                .map(|r| r.status().as_u16());
            if status.as_ref().ok() != Some(&200) {
                failures.push(format!("{status:?}"));
            }
            sent += 1;
        }
        (sent, failures)
    });
    let path = dir.path().join("gateway.toml");
    for round in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let hosts = if round % 2 == 0 {
            "\"a.test\", \"c.test\""
        } else {
            "\"a.test\""
        };
        std::fs::write(&path, config(id, origin.addr, hosts, 100_000, "")).expect("write");
        assert_eq!(gateway.running.reload(Vec::new()), ReloadOutcome::Applied);
    }
    let (sent, failures) = load.await.expect("load");
    assert!(sent > 50, "only {sent} requests were sent");
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed, first ones: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

/// The real binary: SIGHUP sent by `mirror-gateway reload` applies a changed config file.
#[tokio::test(flavor = "multi_thread")]
async fn reload_command_signals_binary() {
    let id = "reload-command-signals-binary";
    let origin = TestOrigin::start(|_| Reply::ok("payload")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("gateway.pid");
    let extra = format!("pid_file = \"{}\"", pid_file.display());
    let info = |text: String| text.replace("level = \"warn\"", "level = \"info\"");
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        info(config(id, origin.addr, "\"a.test\"", 100, &extra)),
    )
    .expect("write");
    let (mut child, addr) = spawn_gateway(dir.path());
    let url = format!("http://{addr}/bundle.json");
    assert_eq!(status(url.clone(), "b.test").await, 421);
    wait_for_file(&pid_file);

    // Keep the file's modification from reloading it first: the reload command must do it.
    std::fs::write(
        &path,
        info(config(
            id,
            origin.addr,
            "\"a.test\", \"b.test\"",
            100,
            &extra,
        )),
    )
    .expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mirror-gateway"))
        .args(["reload", "-c"])
        .arg(&path)
        .output()
        .expect("run mirror-gateway reload");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = 0;
    while Instant::now() < deadline {
        last = status(url.clone(), "b.test").await;
        if last == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().expect("stop gateway");
    child.wait().expect("reap gateway");
    assert_eq!(last, 200);
}

fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} was not written",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGUSR1 makes the gateway reopen its access-log file, as logrotate's `postrotate` expects.
#[tokio::test(flavor = "multi_thread")]
async fn sigusr1_reopens_access_log() {
    let origin = TestOrigin::start(|_| Reply::ok("payload")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let text = config("sigusr1", origin.addr, "\"a.test\"", 100, "")
        .replace("level = \"warn\"", "level = \"info\"")
        .replace(
            "access_log = \"off\"",
            &format!("access_log = \"{}\"", log.display()),
        );
    std::fs::write(dir.path().join("gateway.toml"), text).expect("write config");
    let (mut child, addr) = spawn_gateway(dir.path());
    let url = format!("http://{addr}/before.json");
    assert_eq!(status(url, "a.test").await, 200);
    wait_for_line(&log, "/before.json");

    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).expect("rotate the log");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).expect("SIGUSR1");
    // The reopen happens on the writer thread before the next line; give the signal a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        status(format!("http://{addr}/after.json"), "a.test").await,
        200
    );
    wait_for_line(&log, "/after.json");
    child.kill().expect("stop gateway");
    child.wait().expect("reap gateway");
    let old = std::fs::read_to_string(&rotated).expect("rotated log");
    assert!(old.contains("/before.json"), "{old}");
    assert!(!old.contains("/after.json"), "{old}");
}

fn wait_for_line(path: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} has no line with {needle}: {text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The real binary under steady traffic: SIGHUPs that change the config drop no request.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_under_load_drops_nothing() {
    let origin = TestOrigin::start(|_| Reply::ok("payload")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.toml");
    let write = |hosts: &str| {
        let text = config("sighup-load", origin.addr, hosts, 1_000_000, "")
            .replace("level = \"warn\"", "level = \"info\"");
        std::fs::write(&path, text).expect("write config");
    };
    write("\"a.test\"");
    let (mut child, addr) = spawn_gateway(dir.path());
    let url = format!("http://{addr}/bundle.json");
    let load = tokio::spawn(async move {
        // One client: its keep-alive connections stay open across the reloads.
        let client = client();
        let mut failures = Vec::new();
        let mut sent = 0;
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && sent < 2_000 {
            let status = client
                .get(&url)
                .header("host", "a.test")
                .send()
                .await
                .map(|r| r.status().as_u16());
            if status.as_ref().ok() != Some(&200) {
                failures.push(format!("{status:?}"));
            }
            sent += 1;
        }
        (sent, failures)
    });
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    for round in 0..5 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        write(if round % 2 == 0 {
            "\"a.test\", \"c.test\""
        } else {
            "\"a.test\""
        });
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    }
    let (sent, failures) = load.await.expect("load");
    let still_running = child.try_wait().expect("poll the gateway").is_none();
    child.kill().expect("stop gateway");
    child.wait().expect("reap gateway");
    assert!(still_running, "SIGHUP stopped the gateway");
    assert!(sent > 50, "only {sent} requests were sent");
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed, first ones: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

/// Restart-only settings are compared with the values the process started with, so a later
/// reload keeps a pending change and a revert to the running value clears it.
#[tokio::test(flavor = "multi_thread")]
async fn restart_pending_compares_with_start() {
    let id = "restart-pending-compares-with-start";
    let origin = TestOrigin::start(|_| Reply::ok("payload")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let started = config(id, origin.addr, "\"a.test\"", 100, "");
    let gateway = TestGateway::start(dir.path(), &started);
    let path = dir.path().join("gateway.toml");
    let three_threads = started.replacen("threads = 2", "threads = 3", 1);
    assert_ne!(three_threads, started, "BASE_CONFIG sets threads = 2");

    std::fs::write(&path, &three_threads).expect("write config");
    assert_eq!(gateway.running.reload(Vec::new()), ReloadOutcome::Applied);
    assert_eq!(gateway.running.restart_pending(), ["server.threads"]);

    let more_hosts = three_threads.replacen("\"a.test\"", "\"a.test\", \"b.test\"", 1);
    std::fs::write(&path, more_hosts).expect("write config");
    assert_eq!(gateway.running.reload(Vec::new()), ReloadOutcome::Applied);
    assert_eq!(gateway.running.restart_pending(), ["server.threads"]);

    std::fs::write(&path, &started).expect("write config");
    assert_eq!(gateway.running.reload(Vec::new()), ReloadOutcome::Applied);
    assert!(gateway.running.restart_pending().is_empty());
}

/// Returns a config whose one domain names the htpasswd file `users`, with `server` as the
/// lines of its `[server]` table.
fn reload_target_config(server: &str, users: &str) -> String {
    format!(
        "[server]\n{server}\n\
         [domains.a]\nhosts = [\"a.test\"]\n\
         [domains.a.origins.web]\nkind = \"http\"\naddresses = [\"127.0.0.1:9\"]\n\
         [[domains.a.routes]]\nprefix = \"/\"\norigin = \"web\"\n\
         [[domains.a.plugins]]\nname = \"htpasswd\"\nfile = \"{users}\"\n"
    )
}

/// Runs `mirror-gateway reload -c path` with `env` and none of the test's own
/// `MIRROR_GATEWAY` variables.
fn reload_command(path: &Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mirror-gateway"));
    command.args(["reload", "-c"]).arg(path);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MIRROR_GATEWAY") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    command.output().expect("run mirror-gateway reload")
}

/// Starts a copy of `sleep 30` named `mirror-gateway` in `dir`, which `reload` takes for a
/// gateway: it signals only processes of that name.
fn signal_target(dir: &Path) -> std::process::Child {
    signal_target_named(dir, "mirror-gateway")
}

/// Starts a copy of `sleep 30` named `name` in `dir`.
fn signal_target_named(dir: &Path, name: &str) -> std::process::Child {
    let program = dir.join(name);
    let sleep = ["/usr/bin/sleep", "/bin/sleep"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("sleep in /usr/bin or /bin");
    std::fs::copy(sleep, &program).expect("copy sleep");
    std::process::Command::new(&program)
        .arg("30")
        .spawn()
        .expect("start the copy of sleep")
}

/// Waits up to 10 seconds for `child` to end and returns the signal that ended it, if any.
/// A child still running is killed.
fn ending_signal(child: &mut std::process::Child) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("poll child") {
            return status.signal();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn stderr_text(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Writes the reload target's config with `extra` appended, runs `mirror-gateway reload` on it
/// against a stand-in gateway, and returns the command's output and the signal that ended the
/// stand-in.
fn reload_with_local_errors(extra: &str) -> (std::process::Output, Option<i32>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("gateway.pid");
    let path = dir.path().join("gateway.toml");
    let server = format!("pid_file = \"{}\"", pid_file.display());
    let mut text = reload_target_config(&server, "/nonexistent/users.htpasswd");
    text.push_str(extra);
    std::fs::write(&path, text).expect("write config");
    let mut target = signal_target(dir.path());
    std::fs::write(&pid_file, format!("{}\n", target.id())).expect("write pid file");

    let output = reload_command(&path, &[]);
    let signal = ending_signal(&mut target);
    (output, signal)
}

/// Errors found with the caller's environment are warnings: the running gateway validates
/// with its own environment, so the signal is sent.
#[test]
fn reload_command_signals_despite_local_errors() {
    let (output, signal) = reload_with_local_errors("");
    let err = stderr_text(&output);
    assert_eq!(output.status.code(), Some(0), "{err}");
    assert!(err.contains("warning: "), "{err}");
    assert!(err.contains("/nonexistent/users.htpasswd"), "{err}");
    assert!(err.contains("with this shell's environment"), "{err}");
    assert!(
        err.contains("checks the file with its own environment"),
        "{err}"
    );
    assert!(!err.contains("nothing was started"), "{err}");
    assert_eq!(signal, Some(nix::sys::signal::Signal::SIGHUP as i32));
}

/// Errors in `[sync]` are warnings too, and the signal is sent.
#[test]
fn reload_command_warns_on_sync_errors() {
    let (output, signal) = reload_with_local_errors("[sync]\nbogus = 1\n");
    let err = stderr_text(&output);
    assert_eq!(output.status.code(), Some(0), "{err}");
    assert!(err.contains("sync.bogus = 1: unknown key"), "{err}");
    assert!(err.contains("error(s) in [sync]"), "{err}");
    assert_eq!(signal, Some(nix::sys::signal::Signal::SIGHUP as i32));
}

/// The pid file set by this shell's override is found although the file does not validate.
#[test]
fn reload_command_uses_env_pid_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("from-env.pid");
    let path = dir.path().join("gateway.toml");
    let text = reload_target_config("", "/nonexistent/users.htpasswd");
    std::fs::write(&path, text).expect("write config");
    let mut target = signal_target(dir.path());
    std::fs::write(&pid_file, format!("{}\n", target.id())).expect("write pid file");

    let pid_text = pid_file.display().to_string();
    let output = reload_command(&path, &[("MIRROR_GATEWAY__SERVER__PID_FILE", &pid_text)]);
    let signal = ending_signal(&mut target);
    assert_eq!(output.status.code(), Some(0), "{}", stderr_text(&output));
    assert_eq!(signal, Some(nix::sys::signal::Signal::SIGHUP as i32));
}

/// A pid file naming a program other than the gateway (a pid reused after a crash) gets no
/// signal sent.
#[test]
fn reload_command_other_program() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("gateway.pid");
    let path = dir.path().join("gateway.toml");
    let server = format!("pid_file = \"{}\"", pid_file.display());
    std::fs::write(&path, reload_target_config(&server, "users")).expect("write config");
    let mut other = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("start sleep");
    std::fs::write(&pid_file, format!("{}\n", other.id())).expect("write pid file");

    let output = reload_command(&path, &[]);
    let err = stderr_text(&output);
    // A signal, had one been sent, would have ended `sleep` well within this time.
    std::thread::sleep(Duration::from_millis(300));
    let still_running = other.try_wait().expect("poll sleep").is_none();
    let _ = other.kill();
    let _ = other.wait();
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        err.contains("which runs `sleep`, not mirror-gateway"),
        "{err}"
    );
    assert!(err.contains("kill -HUP"), "{err}");
    assert!(still_running, "sleep got a signal");
}

/// The kernel keeps 15 bytes of a program's name, so `mirror-gateway-2.1.0` runs as
/// `mirror-gateway-`, which is still a gateway.
#[test]
fn reload_command_signals_long_program_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("gateway.pid");
    let path = dir.path().join("gateway.toml");
    let server = format!("pid_file = \"{}\"", pid_file.display());
    let config = reload_target_config(&server, "/nonexistent/users.htpasswd");
    std::fs::write(&path, config).expect("write config");
    let mut target = signal_target_named(dir.path(), "mirror-gateway-2.1.0");
    std::fs::write(&pid_file, format!("{}\n", target.id())).expect("write pid file");

    let output = reload_command(&path, &[]);
    let signal = ending_signal(&mut target);
    assert_eq!(output.status.code(), Some(0), "{}", stderr_text(&output));
    assert_eq!(signal, Some(nix::sys::signal::Signal::SIGHUP as i32));
}

#[test]
fn reload_command_missing_pid_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("absent.pid");
    let path = dir.path().join("gateway.toml");
    let server = format!("pid_file = \"{}\"", pid_file.display());
    std::fs::write(&path, reload_target_config(&server, "users")).expect("write config");

    let output = reload_command(&path, &[]);
    let err = stderr_text(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(err.contains(&pid_file.display().to_string()), "{err}");
    assert!(err.contains("the pid file is missing"), "{err}");
    assert!(err.contains("server.pid_file"), "{err}");
    assert!(err.contains("kill -HUP"), "{err}");
}

#[test]
fn reload_command_dead_pid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("gateway.pid");
    let path = dir.path().join("gateway.toml");
    let server = format!("pid_file = \"{}\"", pid_file.display());
    std::fs::write(&path, reload_target_config(&server, "users")).expect("write config");
    let mut ended = std::process::Command::new("true")
        .spawn()
        .expect("start true");
    let pid = ended.id();
    ended.wait().expect("reap true");
    std::fs::write(&pid_file, format!("{pid}\n")).expect("write pid file");

    let output = reload_command(&path, &[]);
    let err = stderr_text(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("names pid {pid} which is not running")),
        "{err}"
    );
    assert!(err.contains("server.pid_file"), "{err}");
    assert!(err.contains("kill -HUP"), "{err}");
}

#[test]
fn reload_command_unreadable_pid_file_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, reload_target_config("pid_file = 5", "users")).expect("write config");

    let output = reload_command(&path, &[]);
    let err = stderr_text(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(err.contains("server.pid_file = 5"), "{err}");
    assert!(err.contains("no signal was sent"), "{err}");
}

/// A config file that cannot be read is reported once, as an error, not also as a warning.
#[test]
fn reload_command_missing_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("absent.toml");

    let output = reload_command(&path, &[]);
    let err = stderr_text(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(err.contains("error: "), "{err}");
    assert!(!err.contains("warning: "), "{err}");
    assert_eq!(err.matches("absent.toml").count(), 2, "{err}");
}
