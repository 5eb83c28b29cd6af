//! End-to-end: the zero-downtime binary upgrade. A new process started with `--upgrade` sends
//! the old one SIGQUIT and takes over its listening socket; clients see no failed request.

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{client, spawn_gateway, Reply, TestOrigin, BASE_CONFIG};

#[tokio::test(flavor = "multi_thread")]
async fn upgrade_hands_over_without_errors() {
    let origin = TestOrigin::start(|_| Reply::ok("payload")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let base = BASE_CONFIG
        .replace(
            "listen = [\"127.0.0.1:0\"]",
            &format!("listen = [\"127.0.0.1:{port}\"]"),
        )
        .replace("level = \"warn\"", "level = \"info\"")
        .replace(
            "[server]\n",
            &format!(
                "[server]\npid_file = \"{}\"\n",
                dir.path().join("gateway.pid").display()
            ),
        );
    let config = format!(
        r#"{base}
[domains.primary]
hosts = ["127.0.0.1"]
[domains.primary.origins.web]
kind = "http"
addresses = ["{}"]
[[domains.primary.routes]]
prefix = "/"
origin = "web"
"#,
        origin.addr
    );
    std::fs::write(dir.path().join("gateway.toml"), config).expect("write config");
    let (mut old, addr) = spawn_gateway(dir.path());
    // The gateway writes its pid file just after it starts serving; the upgrade reads it.
    let pid_file = dir.path().join("gateway.pid");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pid_file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }

    let url = format!("http://{addr}/file");
    let load = tokio::spawn(async move {
        let mut failures = Vec::new();
        let mut sent = 0;
        let deadline = Instant::now() + Duration::from_secs(4);
        while Instant::now() < deadline && sent < 4_000 {
            // A new connection each time, so every request needs a listening socket.
            let status = client().get(&url).send().await.map(|r| r.status().as_u16());
            if status.as_ref().ok() != Some(&200) {
                failures.push(format!("{status:?}"));
            }
            sent += 1;
        }
        (sent, failures)
    });

    let mut new = Command::new(env!("CARGO_BIN_EXE_mirror-gateway"))
        .args(["run", "--upgrade", "-c"])
        .arg(dir.path().join("gateway.toml"))
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the new mirror-gateway");
    let stderr = new.stderr.take().expect("stderr");
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("mirror-gateway starting") {
                let _ = started_tx.send(());
            }
        }
    });
    started_rx
        .recv_timeout(Duration::from_secs(15))
        .expect("the new process took over the sockets");
    // A script written for signalling by hand sends SIGQUIT as well; it changes nothing.
    let old_pid = nix::unistd::Pid::from_raw(old.id() as i32);
    let _ = nix::sys::signal::kill(old_pid, nix::sys::signal::Signal::SIGQUIT);

    let (sent, failures) = load.await.expect("load");
    let old_status = old.wait().expect("old process exits");
    let after = client()
        .get(format!("http://{addr}/file"))
        .send()
        .await
        .map(|r| r.status().as_u16());
    new.kill().expect("stop the new process");
    new.wait().expect("reap the new process");
    assert!(sent > 20, "only {sent} requests were sent");
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed, first ones: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        old_status.code().is_some(),
        "the old process exited by itself"
    );
    assert_eq!(after.ok(), Some(200));
}

/// Writes a config with its pid file in `dir` and one domain, and returns the config's path.
fn write_upgrade_config(dir: &Path) -> PathBuf {
    let pid_file = dir.join("gateway.pid");
    let config = BASE_CONFIG.replace(
        "[server]\n",
        &format!("[server]\npid_file = \"{}\"\n", pid_file.display()),
    );
    let config = format!(
        "{config}\n[domains.primary]\nhosts = [\"127.0.0.1\"]\n\
         [domains.primary.origins.web]\nkind = \"http\"\naddresses = [\"127.0.0.1:9\"]\n\
         [[domains.primary.routes]]\nprefix = \"/\"\norigin = \"web\"\n"
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config).expect("write config");
    path
}

/// Runs `mirror-gateway run --upgrade -c config` to its end and returns its output.
fn run_upgrade(config: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mirror-gateway"))
        .args(["run", "--upgrade", "-c"])
        .arg(config)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .output()
        .expect("run mirror-gateway")
}

#[test]
fn upgrade_without_running_gateway_fails_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_upgrade_config(dir.path());
    let started = Instant::now();
    let output = run_upgrade(&config);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("the pid file is missing"), "{stderr}");
    assert!(stderr.contains("start without --upgrade"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(5), "{stderr}");
}

/// While one `run --upgrade` waits for the sockets, it has the upgrade lock beside the pid
/// file, and a second one exits at once instead of finding no sockets.
#[test]
fn second_upgrade_fails_while_one_waits() {
    use nix::fcntl::{Flock, FlockArg};

    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_upgrade_config(dir.path());
    let lock = std::fs::File::create(dir.path().join("gateway.upgrade.lock")).expect("lock file");
    let _waiting = Flock::lock(lock, FlockArg::LockExclusiveNonblock).expect("take the lock");

    let output = run_upgrade(&config);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("another `run --upgrade` is waiting"),
        "{stderr}"
    );
}
