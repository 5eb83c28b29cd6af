//! The systemd units in `deploy/systemd/`, checked with `systemd-analyze verify` (package
//! `systemd`), which loads them as systemd would and reports unknown keys, invalid values and
//! commands that are not executable. The units name `/usr/local/bin/mirror-gateway`, and the
//! copies checked here name the binary that this test run built.

use std::path::Path;
use std::process::Command;

const UNITS: [&str; 3] = [
    "mirror-gateway.service",
    "mirror-gateway-sync.service",
    "mirror-gateway-sync.timer",
];

const INSTALLED_BINARY: &str = "/usr/local/bin/mirror-gateway";

#[test]
fn systemd_units_verify() {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd");
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = env!("CARGO_BIN_EXE_mirror-gateway");
    for unit in UNITS {
        let text = std::fs::read_to_string(source.join(unit))
            .unwrap_or_else(|e| panic!("read deploy/systemd/{unit}: {e}"));
        assert!(
            unit.ends_with(".timer") || text.contains(INSTALLED_BINARY),
            "{unit} does not run {INSTALLED_BINARY}"
        );
        std::fs::write(
            dir.path().join(unit),
            text.replace(INSTALLED_BINARY, binary),
        )
        .expect("write unit copy");
    }

    let output = Command::new("timeout")
        .arg("60")
        .arg("systemd-analyze")
        .arg("verify")
        .args(UNITS.map(|unit| dir.path().join(unit)))
        .output()
        .expect("run systemd-analyze (install the Debian package systemd)");
    let messages = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "systemd-analyze verify failed:\n{messages}"
    );
    // Warnings about the host's own units, which ours pull in as dependencies (such as
    // network-online.target), are not ours to fix.
    let ours: Vec<&str> = messages
        .lines()
        .filter(|line| UNITS.iter().any(|unit| line.contains(unit)))
        .collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warned:\n{messages}"
    );
}
