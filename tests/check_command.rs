//! The `mirror-gateway check` and `version` commands, run as the real binary.

use std::path::Path;
use std::process::{Command, Output};

/// The shipped example config; its paths point under `sample-mirror/`.
const EXAMPLE: &str = include_str!("../conf/gateway.toml");

/// A user `mirror` with password `password`, as `htpasswd -s` writes it.
const USERS: &str = "mirror:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n";

/// Runs the binary with `args` and `env`, and no `MIRROR_GATEWAY` variables of the test's own.
fn gateway(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = gateway_command(args);
    command.envs(env.iter().copied());
    command.output().expect("run mirror-gateway")
}

/// Builds the command line without the test's `MIRROR_GATEWAY` variables.
fn gateway_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mirror-gateway"));
    command.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MIRROR_GATEWAY") {
            command.env_remove(name);
        }
    }
    command
}

/// Writes the example config to `dir/gateway.toml` with the export trees and the htpasswd
/// file it names, and returns the config's path.
fn write_example(dir: &Path) -> String {
    for product in ["concelier", "excititor"] {
        let export = dir.join(format!("sample-mirror/data/{product}/20260101T120000Z"));
        std::fs::create_dir_all(export).expect("export tree");
    }
    let users = dir.join("sample-mirror/htpasswd/primary.htpasswd");
    std::fs::create_dir_all(users.parent().expect("parent")).expect("htpasswd dir");
    std::fs::write(users, USERS).expect("htpasswd");
    let path = dir.join("gateway.toml");
    std::fs::write(&path, EXAMPLE).expect("config");
    path.display().to_string()
}

/// Writes the example with three errors to `dir/broken.toml` and returns its path. The errors
/// are a bad thread count, an unknown route origin and a missing htpasswd file.
fn write_broken(dir: &Path) -> String {
    write_example(dir);
    let broken = EXAMPLE
        .replacen("threads = 2", "threads = 0", 1)
        .replacen("origin = \"excititor\"", "origin = \"excititor-web\"", 1)
        .replacen("primary.htpasswd", "missing.htpasswd", 1);
    let path = dir.join("broken.toml");
    std::fs::write(&path, broken).expect("config");
    path.display().to_string()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn check_valid_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_example(dir.path());
    let output = gateway(&["check", "-c", &path], &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

#[test]
fn check_valid_prints_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_example(dir.path());
    let output = gateway(&["check", "-c", &path], &[]);
    let expected = format!("{path}: configuration is valid (2 domain(s))");
    assert_eq!(stdout(&output).trim(), expected);
}

#[test]
fn check_valid_config_from_env() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_example(dir.path());
    let output = gateway(&["check"], &[("MIRROR_GATEWAY_CONFIG", &path)]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

#[test]
fn config_before_subcommand_applies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_example(dir.path());
    let output = gateway(&["-c", &path, "check"], &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    let broken = write_broken(dir.path());
    let output = gateway(&["-c", &broken, "check", "-c", &path], &[]);
    assert_eq!(output.status.code(), Some(0), "the subcommand's -c wins");
}

/// The example names its pid file, so `reload` looks for it beside the config whatever the
/// shell's `$XDG_RUNTIME_DIR`, which decides the default.
#[test]
fn example_pid_file_ignores_runtime_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_example(dir.path());
    let runtime = dir.path().join("runtime");
    std::fs::create_dir(&runtime).expect("runtime dir");
    let runtime = runtime.display().to_string();
    let output = gateway(&["reload", "-c", &path], &[("XDG_RUNTIME_DIR", &runtime)]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "no gateway runs: {err}");
    let pid_file = dir.path().join("gateway.pid").display().to_string();
    assert!(err.contains(&format!("error: {pid_file}: ")), "{err}");
}

#[test]
fn check_broken_exits_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_broken(dir.path());
    let output = gateway(&["check", "-c", &path], &[]);
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn check_broken_lists_every_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_broken(dir.path());
    let err = stderr(&gateway(&["check", "-c", &path], &[]));
    for key in [
        "server.threads = 0",
        "domains.primary.routes[2].origin = \"excititor-web\"",
        "domains.primary.plugins[0].file = \"sample-mirror/htpasswd/missing.htpasswd\"",
    ] {
        assert!(
            err.contains(&format!("error: {path}: {key}: ")),
            "{key} in {err}"
        );
    }
}

#[test]
fn check_broken_counts_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_broken(dir.path());
    let err = stderr(&gateway(&["check", "-c", &path], &[]));
    assert!(
        err.ends_with(&format!("{path}: 3 error(s); nothing was started\n")),
        "{err}"
    );
}

#[test]
fn check_broken_prints_nothing_on_stdout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_broken(dir.path());
    let output = gateway(&["check", "-c", &path], &[]);
    assert_eq!(stdout(&output), "");
}

#[test]
fn check_env_override_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_example(dir.path());
    let var = "MIRROR_GATEWAY__SERVER__LISTEN__0";
    let output = gateway(&["check", "-c", &path], &[(var, "localhost:8080")]);
    let err = stderr(&output);
    assert!(
        err.contains(&format!("error: {var}: server.listen[0] = ")),
        "{err}"
    );
}

#[test]
fn check_missing_file_exits_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("absent.toml").display().to_string();
    let output = gateway(&["check", "-c", &path], &[]);
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn check_missing_file_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("absent.toml").display().to_string();
    let err = stderr(&gateway(&["check", "-c", &path], &[]));
    assert!(
        err.contains(&format!("error: {path}: cannot read the config file")),
        "{err}"
    );
}

#[test]
fn check_survives_non_utf8_variable() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_example(dir.path());
    let output = gateway_command(&["check", "-c", &path])
        .env("UNRELATED", std::ffi::OsStr::from_bytes(b"\xff"))
        .output()
        .expect("run mirror-gateway");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

#[test]
fn version_prints_version() {
    let output = gateway(&["version"], &[]);
    let expected = format!("mirror-gateway {}\n", env!("CARGO_PKG_VERSION"));
    assert_eq!(stdout(&output), expected);
}

/// What reading the config logs reaches standard error, although the log level is not known
/// until the config is read.
#[test]
fn check_shows_htpasswd_warnings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_example(dir.path());
    let users = dir.path().join("sample-mirror/htpasswd/primary.htpasswd");
    std::fs::write(&users, format!("{USERS}plain:secret\n")).expect("htpasswd");
    let mut command = gateway_command(&["check", "-c", &path]);
    command.env_remove("RUST_LOG");
    let output = command.output().expect("run mirror-gateway");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(err.contains("htpasswd line ignored"), "{err}");
    assert!(err.contains("line=2"), "{err}");
    assert!(
        !err.contains("secret"),
        "the hash must not be logged: {err}"
    );
}

/// An htpasswd file without a usable user locks every user out, so `check` warns about it.
#[test]
fn check_warns_htpasswd_without_users() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_example(dir.path());
    let users = dir.path().join("sample-mirror/htpasswd/primary.htpasswd");
    std::fs::write(&users, "").expect("htpasswd");
    let mut command = gateway_command(&["check", "-c", &path]);
    command.env_remove("RUST_LOG");
    let output = command.output().expect("run mirror-gateway");
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains("warning: htpasswd file has no usable users"),
        "{err}"
    );
    assert!(err.contains("primary.htpasswd"), "{err}");
}

/// A file with `[sync]` and no `[domains]` is a sync file of its own: only `[sync]` is checked.
#[test]
fn check_standalone_sync_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    for sub in ["source", "concelier", "excititor"] {
        std::fs::create_dir_all(dir.path().join(sub)).expect("directory");
    }
    let path = dir.path().join("sync.toml");
    let text = "[sync.jobs.concelier]\ndestination = \"concelier\"\n\
                source = { kind = \"directory\", path = \"source\" }\n\
                [sync.jobs.excititor]\ndestination = \"excititor\"\n\
                source = { kind = \"directory\", path = \"source\" }\n";
    std::fs::write(&path, text).expect("sync file");
    let path = path.display().to_string();
    let output = gateway(&["check", "-c", &path], &[]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(0), "{err}");
    assert!(!err.contains("define at least one domain"), "{err}");
    assert_eq!(
        stdout(&output).trim(),
        format!("{path}: sync configuration is valid (2 job(s))")
    );
}

/// With `[sync]` in the gateway's own file, the valid line counts its jobs too.
#[test]
fn check_counts_sync_jobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_example(dir.path());
    for sub in ["source", "synced"] {
        std::fs::create_dir_all(dir.path().join(sub)).expect("directory");
    }
    let mut text = std::fs::read_to_string(&path).expect("config");
    text.push_str(
        "\n[sync.jobs.concelier]\ndestination = \"synced\"\n\
         source = { kind = \"directory\", path = \"source\" }\n",
    );
    std::fs::write(&path, text).expect("config with sync");
    let output = gateway(&["check", "-c", &path], &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stdout(&output).trim(),
        format!("{path}: configuration is valid (2 domain(s), 1 sync job(s))")
    );
}

#[test]
fn check_standalone_sync_file_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sync.toml");
    std::fs::write(&path, "[sync]\ninterval_secs = \"often\"\n").expect("sync file");
    let path = path.display().to_string();
    let output = gateway(&["check", "-c", &path], &[]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(err.contains("sync.interval_secs"), "{err}");
    assert!(!err.contains("define at least one domain"), "{err}");
}

/// Warnings logged while the config is read are `warning:` lines without timestamps.
#[test]
fn check_warnings_are_plain_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_example(dir.path());
    let users = dir.path().join("sample-mirror/htpasswd/primary.htpasswd");
    std::fs::write(&users, format!("{USERS}no-colon-here\n")).expect("htpasswd");
    let mut command = gateway_command(&["check", "-c", &path]);
    command.env_remove("RUST_LOG");
    let output = command.output().expect("run mirror-gateway");
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(0), "{err}");
    let line = err
        .lines()
        .find(|line| line.contains("htpasswd line ignored"))
        .unwrap_or_else(|| panic!("no htpasswd warning in {err}"));
    assert!(line.starts_with("warning: htpasswd line ignored"), "{line}");
    assert!(line.contains("line=2"), "{line}");
    assert!(line.ends_with(')'), "{line}");
    assert!(!line.contains(" WARN "), "{line}");
}

/// The start-up line names the admin listener's bound address, port 0 resolved.
#[test]
fn run_logs_admin_address() {
    use std::io::BufRead;

    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_example(dir.path());
    let users = dir.path().join("admin.htpasswd");
    std::fs::write(&users, USERS).expect("admin htpasswd");
    let users = users.display().to_string();

    let mut child = gateway_command(&["run", "-c", &path])
        .envs([
            ("MIRROR_GATEWAY__SERVER__LISTEN", "[\"127.0.0.1:0\"]"),
            ("MIRROR_GATEWAY__SERVER__PID_FILE", "gateway.pid"),
            ("MIRROR_GATEWAY__ADMIN__LISTEN", "127.0.0.1:0"),
            ("MIRROR_GATEWAY__ADMIN__HTPASSWD", users.as_str()),
            ("MIRROR_GATEWAY__LOG__LEVEL", "info"),
            ("NO_COLOR", "1"),
        ])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start mirror-gateway");
    let stderr = child.stderr.take().expect("stderr");
    let start = std::io::BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .take(200)
        .find(|line| line.contains("mirror-gateway starting"));
    child.kill().expect("stop gateway");
    child.wait().expect("reap gateway");

    let start = start.expect("start-up line");
    let at = start.find("admin=").unwrap_or_else(|| panic!("{start}"));
    let admin = start[at + "admin=".len()..]
        .split_whitespace()
        .next()
        .unwrap_or_default();
    let addr: std::net::SocketAddr = admin
        .trim_start_matches("http://")
        .parse()
        .unwrap_or_else(|_| panic!("admin address in {start}"));
    assert_ne!(addr.port(), 0, "{start}");
}
