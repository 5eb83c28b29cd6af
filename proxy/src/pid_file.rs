//! The gateway's pid file: which process `mirror-gateway reload` signals and
//! `mirror-gateway run --upgrade` takes the listening sockets from.

use std::path::Path;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The program name a running gateway has in `/proc/PID/comm`. The kernel cuts that name to
/// 15 bytes, so a binary named `mirror-gateway-2.1` shows as `mirror-gateway-`.
const PROGRAM: &str = "mirror-gateway";

/// Reads the pid in `pid_file` and checks that it names a running gateway. The error states
/// whether the file is missing, contains no pid, or names a process that is not running or
/// runs another program.
pub fn running_gateway(pid_file: &Path) -> Result<Pid, String> {
    let number = read_pid(pid_file)?;
    let pid = Pid::from_raw(number);

    // Signal 0 checks that the process exists without signalling it.
    if let Err(nix::errno::Errno::ESRCH) = kill(pid, None) {
        return Err(format!(
            "the pid file names pid {number} which is not running, so no signal was sent"
        ));
    }

    // A pid file left behind by a gateway that did not exit cleanly may name a pid that the
    // system has since given to another program, which a signal would stop.
    let program = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|name| name.trim().to_owned())
    };
    let target = program(&number.to_string()).map_err(|e| {
        format!("cannot tell which program pid {number} runs ({e}), so no signal was sent")
    })?;
    let own = program("self").unwrap_or_default();
    if target == own || target.starts_with(PROGRAM) {
        Ok(pid)
    } else {
        Err(format!(
            "the pid file names pid {number}, which runs `{target}`, not mirror-gateway (the pid \
             file is probably stale), so no signal was sent"
        ))
    }
}

/// Returns the positive process id that `pid_file` contains.
fn read_pid(pid_file: &Path) -> Result<i32, String> {
    let text = match std::fs::read_to_string(pid_file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err("the pid file is missing, so no signal was sent".into())
        }
        Err(e) => return Err(format!("cannot read the pid file: {e}")),
    };
    // 0 and negative numbers would signal process groups.
    text.trim()
        .parse::<i32>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("the pid file contains {:?}, not a process id", text.trim()))
}

/// Sends `signal` to `pid`, naming the pid file in the error.
pub fn signal(pid: Pid, signal: Signal, pid_file: &Path) -> Result<(), String> {
    kill(pid, signal)
        .map_err(|e| format!("cannot signal pid {pid} from {}: {e}", pid_file.display()))
}
