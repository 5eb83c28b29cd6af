//! The `[sync]` section: defaults, validation messages, pins from the gateway config,
//! environment overrides, and one run through `run_once` as the `sync` subcommand does it.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use mirror_sync::config::{load, load_str, SourceSettings};
use mirror_sync::{run_job, run_once, DirSource, SyncArgs};

fn errors_of(text: &str) -> Vec<String> {
    load_str(text, Path::new("/etc/mg/sync.toml"), &[])
        .expect_err("invalid")
        .iter()
        .map(ToString::to_string)
        .collect()
}

const MINIMAL: &str = r#"
[sync.jobs.concelier]
destination = "data/concelier"
source = { kind = "directory", path = "/srv/rsync/concelier/latest" }
"#;

#[test]
fn load_applies_defaults() {
    let config = load_str(MINIMAL, Path::new("/etc/mg/sync.toml"), &[]).expect("valid");
    let job = &config.jobs[0];
    assert_eq!((job.keep_snapshots, job.concurrency), (3, 8));
    assert_eq!(
        (job.grace, job.deadline),
        (Duration::from_secs(600), Duration::from_secs(240))
    );
    assert_eq!(job.max_delete_fraction, 0.5);
}

#[test]
fn load_resolves_relative_destination() {
    let config = load_str(MINIMAL, Path::new("/etc/mg/sync.toml"), &[]).expect("valid");
    assert_eq!(
        config.jobs[0].destination,
        Path::new("/etc/mg/data/concelier")
    );
}

#[test]
fn load_reads_s3_source() {
    let text = r#"
[sync.jobs.excititor]
destination = "/srv/excititor"
[sync.jobs.excititor.source]
kind = "s3"
bucket = "stella-mirror"
prefix = "excititor/latest/"
region = "eu-west-1"
endpoint = "http://127.0.0.1:9000"
path_style = true
allow_http = true
"#;
    let config = load_str(text, Path::new("sync.toml"), &[]).expect("valid");
    let SourceSettings::S3(s3) = &config.jobs[0].source else {
        panic!("not s3");
    };
    assert_eq!(
        (s3.bucket.as_str(), s3.path_style, s3.allow_http),
        ("stella-mirror", true, true)
    );
}

#[test]
fn load_rejects_unknown_key() {
    let errors = errors_of(&format!("{MINIMAL}keep_snapshot = 2\n"));
    assert_eq!(
        errors,
        [
            "/etc/mg/sync.toml: sync.jobs.concelier.keep_snapshot = 2: unknown key; remove it or \
          check its spelling"
        ]
    );
}

#[test]
fn load_rejects_unknown_source_key() {
    let text = MINIMAL.replace("path = ", "bucket = \"b\", path = ");
    let errors = errors_of(&text);
    assert!(
        errors[0].contains("sync.jobs.concelier.source.bucket"),
        "{errors:?}"
    );
}

#[test]
fn load_rejects_plain_http_without_flag() {
    let text = r#"
[sync.jobs.c]
destination = "/d"
source = { kind = "s3", bucket = "b", endpoint = "http://minio:9000" }
"#;
    let errors = errors_of(text);
    assert!(errors[0].contains("set allow_http = true"), "{errors:?}");
}

#[test]
fn load_rejects_zero_keep() {
    let errors = errors_of(&format!("{MINIMAL}keep_snapshots = 0\n"));
    assert!(
        errors[0].contains("keep_snapshots = 0: must be at least 1"),
        "{errors:?}"
    );
}

#[test]
fn load_rejects_fraction_above_one() {
    let errors = errors_of(&format!("{MINIMAL}max_delete_fraction = 1.5\n"));
    assert!(
        errors[0].contains("max_delete_fraction = 1.5"),
        "{errors:?}"
    );
}

#[test]
fn load_rejects_bad_pin() {
    let errors = errors_of(&format!("{MINIMAL}pinned = [\"latest\"]\n"));
    assert!(errors[0].contains("pinned[0] = \"latest\""), "{errors:?}");
}

#[test]
fn load_rejects_unknown_kind() {
    let errors = errors_of(&MINIMAL.replace("\"directory\"", "\"ftp\""));
    assert!(errors[0].contains("source.kind = \"ftp\""), "{errors:?}");
}

#[test]
fn load_requires_sync_section() {
    let errors = errors_of("[server]\nlisten = []\n");
    assert!(errors[0].contains("no [sync] section"), "{errors:?}");
}

#[test]
fn load_takes_pins_from_gateway_section() {
    let text = format!(
        "{MINIMAL}\n[domains.primary.origins.concelier]\nkind = \"export_tree\"\n\
         root = \"data/concelier\"\npinned_export = \"20260101T120000Z\"\n"
    );
    let config = load_str(&text, Path::new("/etc/mg/gateway.toml"), &[]).expect("valid");
    assert_eq!(config.jobs[0].pinned, ["20260101T120000Z"]);
}

#[test]
fn load_takes_pins_from_gateway_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = "[domains.a.origins.c]\nkind = \"export_tree\"\nroot = \"data/concelier\"\n\
                   pinned_export = \"20260102T000000Z\"\n";
    std::fs::write(dir.path().join("gateway.toml"), gateway).expect("test i/o");
    let text = format!("[sync]\ngateway_config = \"gateway.toml\"\n{MINIMAL}");
    std::fs::write(dir.path().join("sync.toml"), text).expect("test i/o");
    let config = load(&dir.path().join("sync.toml"), &[]).expect("valid");
    assert_eq!(config.jobs[0].pinned, ["20260102T000000Z"]);
}

#[test]
fn run_once_syncs_configured_job() {
    let (src, dest, conf) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    write_tree(src.path(), &[("mirror/index.json", b"{}")]);
    let text = format!(
        "[sync.jobs.concelier]\ndestination = {:?}\nsource = {{ kind = \"directory\", path = {:?} }}\n",
        dest.path(),
        src.path()
    );
    let path = conf.path().join("sync.toml");
    std::fs::write(&path, text).expect("test i/o");
    let args = SyncArgs {
        config: path,
        ..SyncArgs::default()
    };
    assert!(run_once(&args));
    assert_eq!(read_latest(dest.path(), "mirror/index.json"), "{}");
}

#[test]
fn run_once_rejects_unknown_job() {
    let conf = tempfile::tempdir().expect("tempdir");
    let path = conf.path().join("sync.toml");
    std::fs::write(&path, MINIMAL).expect("test i/o");
    let args = SyncArgs {
        config: path,
        jobs: vec!["nope".into()],
        ..SyncArgs::default()
    };
    assert!(!run_once(&args));
}

#[test]
fn load_applies_schedule_defaults() {
    let config = load_str(MINIMAL, Path::new("/etc/mg/sync.toml"), &[]).expect("valid");
    assert_eq!(
        (config.interval, config.jitter, config.max_lag),
        (
            Duration::from_secs(300),
            Duration::from_secs(30),
            Duration::from_secs(900)
        )
    );
}

#[test]
fn load_reads_schedule() {
    let text =
        format!("[sync]\ninterval_secs = 60\njitter_secs = 5\nmax_lag_secs = 180\n{MINIMAL}");
    let config = load_str(&text, Path::new("/etc/mg/sync.toml"), &[]).expect("valid");
    assert_eq!(
        (config.interval, config.jitter, config.max_lag),
        (
            Duration::from_secs(60),
            Duration::from_secs(5),
            Duration::from_secs(180)
        )
    );
}

#[test]
fn load_rejects_zero_interval() {
    let errors = errors_of(&format!("[sync]\ninterval_secs = 0\n{MINIMAL}"));
    assert!(
        errors[0].contains("sync.interval_secs = 0: must be at least 1"),
        "{errors:?}"
    );
}

#[test]
fn load_rejects_jitter_not_below_interval() {
    let errors = errors_of(&format!(
        "[sync]\ninterval_secs = 10\njitter_secs = 10\n{MINIMAL}"
    ));
    assert!(
        errors[0].contains("sync.jitter_secs = 10: must be less than interval_secs (10)"),
        "{errors:?}"
    );
}

#[test]
fn load_rejects_zero_max_lag() {
    let errors = errors_of(&format!("[sync]\nmax_lag_secs = 0\n{MINIMAL}"));
    assert!(
        errors[0].contains("sync.max_lag_secs = 0: must be at least 1"),
        "{errors:?}"
    );
}

/// Returns `vars` as an environment.
fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

/// The gateway's export-tree origin for `data/concelier`, without a pin.
const ORIGIN: &str = "\n[domains.primary.origins.concelier]\nkind = \"export_tree\"\n\
                      root = \"data/concelier\"\n";

/// The variable that pins an export of the origin in [`ORIGIN`].
const PIN_VARIABLE: &str = "MIRROR_GATEWAY__DOMAINS__PRIMARY__ORIGINS__CONCELIER__PINNED_EXPORT";

#[test]
fn env_sets_sync_key() {
    let vars = env(&[
        ("MIRROR_GATEWAY__SYNC__JOBS__CONCELIER__KEEP_SNAPSHOTS", "5"),
        ("MIRROR_GATEWAY__SYNC__INTERVAL_SECS", "60"),
    ]);
    let config = load_str(MINIMAL, Path::new("/etc/mg/gateway.toml"), &vars).expect("valid");
    assert_eq!(config.jobs[0].keep_snapshots, 5);
    assert_eq!(config.interval, Duration::from_secs(60));
}

#[test]
fn env_error_names_variable() {
    let variable = "MIRROR_GATEWAY__SYNC__JOBS__CONCELIER__KEEP_SNAPSHOTS";
    let errors = load_str(
        MINIMAL,
        Path::new("/etc/mg/gateway.toml"),
        &env(&[(variable, "0")]),
    )
    .expect_err("keep_snapshots = 0");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].source, variable);
    assert_eq!(errors[0].key, "sync.jobs.concelier.keep_snapshots");
}

#[test]
fn env_errors_outside_sync_left_to_gateway() {
    let vars = env(&[
        ("MIRROR_GATEWAY__SYNC__INTERVAL_SECS", "often"),
        (
            "MIRROR_GATEWAY__DOMAINS__NONE__MAXINDEXREQUESTSPERHOUR",
            "5",
        ),
    ]);
    let text = format!("[sync]\ninterval_secs = 300\n{MINIMAL}");
    let errors = load_str(&text, Path::new("/etc/mg/gateway.toml"), &vars)
        .expect_err("interval_secs is not a number");
    let sources: Vec<&str> = errors.iter().map(|e| e.source.as_str()).collect();
    assert_eq!(sources, ["MIRROR_GATEWAY__SYNC__INTERVAL_SECS"]);
}

#[test]
fn env_pin_from_gateway_section() {
    let text = format!("{MINIMAL}{ORIGIN}");
    let vars = env(&[(PIN_VARIABLE, "20260101T120000Z")]);
    let config = load_str(&text, Path::new("/etc/mg/gateway.toml"), &vars).expect("valid");
    assert_eq!(config.jobs[0].pinned, ["20260101T120000Z"]);
}

#[test]
fn env_root_from_gateway_section() {
    let text = format!(
        "{MINIMAL}{}pinned_export = \"20260101T120000Z\"\n",
        ORIGIN.replace("data/concelier", "elsewhere")
    );
    let root = "MIRROR_GATEWAY__DOMAINS__PRIMARY__ORIGINS__CONCELIER__ROOT";
    let config = load_str(&text, Path::new("/etc/mg/gateway.toml"), &[]).expect("valid");
    assert!(config.jobs[0].pinned.is_empty(), "{:?}", config.jobs[0]);
    let vars = env(&[(root, "data/concelier")]);
    let config = load_str(&text, Path::new("/etc/mg/gateway.toml"), &vars).expect("valid");
    assert_eq!(config.jobs[0].pinned, ["20260101T120000Z"]);
}

#[test]
fn env_pin_from_gateway_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = format!("[domains.primary]{ORIGIN}");
    std::fs::write(dir.path().join("gateway.toml"), gateway).expect("test i/o");
    let text = format!("[sync]\ngateway_config = \"gateway.toml\"\n{MINIMAL}");
    std::fs::write(dir.path().join("sync.toml"), text).expect("test i/o");
    let vars = env(&[(PIN_VARIABLE, "20260102T000000Z")]);
    let config = load(&dir.path().join("sync.toml"), &vars).expect("valid");
    assert_eq!(config.jobs[0].pinned, ["20260102T000000Z"]);
}

/// A rollback pin set in the environment keeps its snapshot through retention, as a pin in
/// the file does.
#[tokio::test]
async fn env_pin_survives_retention() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("source");
    let text = format!(
        "[sync.jobs.concelier]\ndestination = \"data/concelier\"\nkeep_snapshots = 1\n\
         grace_secs = 0\nsource = {{ kind = \"directory\", path = \"source\" }}\n{ORIGIN}"
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).expect("test i/o");
    let vars = env(&[(PIN_VARIABLE, "20260101T120000Z")]);
    let job = load(&path, &vars).expect("valid").jobs.remove(0);

    for generation in 0..4u64 {
        let index = format!("{{\"generation\": {generation}}}");
        write_tree(&source, &[("mirror/index.json", index.as_bytes())]);
        run_job(&job, &DirSource::new(&source), &at(generation * 3600))
            .await
            .expect("run");
    }
    let ids: Vec<String> = names(&dir.path().join("data/concelier"))
        .into_iter()
        .filter(|name| name.starts_with("2026"))
        .collect();
    assert_eq!(ids, ["20260101T120000Z", "20260101T150000Z"]);
}
