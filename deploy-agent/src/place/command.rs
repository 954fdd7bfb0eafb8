//! `sh -c` hooks (pre-switch, health check): a working directory, the agent's environment,
//! a timeout, the agent's [`Stop`], and output captured to a file (a pipe nobody reads could
//! fill up and stall the command). The output's tail is logged on the target, never put in
//! the failure reason: deploy-svc shows reasons to every caller.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::Stop;

/// How often a running command with a timeout is polled.
const POLL: Duration = Duration::from_millis(10);

/// How much of a failed command's output is logged.
const OUTPUT_TAIL_BYTES: u64 = 400;

/// One command to run.
pub(super) struct Hook<'a> {
    /// Given to `sh -c`.
    pub command: &'a str,
    /// Working directory.
    pub cwd: &'a Path,
    /// Added to the agent's own environment.
    pub env: &'a [(&'static str, OsString)],
    /// What the command is, for logs (`pre-switch`, `health check`).
    pub what: &'static str,
    /// Killed (with its whole process group) once this has passed.
    pub timeout: Duration,
    /// Killed the same way when the agent stops.
    pub stop: &'a Stop,
    /// Receives stdout and stderr; the caller deletes it.
    pub output: &'a Path,
}

/// Runs `hook`; `Err` is how it ended (exit status, signal, timeout), readable as the end
/// of a sentence and free of its output.
pub(super) fn run(hook: &Hook<'_>) -> Result<(), String> {
    let result = run_once(hook);
    if result.is_err() {
        let label = if hook.what == "pre-switch" {
            "pre_switch"
        } else {
            "health_check"
        };
        metrics::counter!(crate::telemetry::HOOK_FAILURES, "hook" => label).increment(1);
    }
    result
}

fn run_once(hook: &Hook<'_>) -> Result<(), String> {
    // A new file, never through a link.
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(hook.output)
        .map_err(|e| format!("could not create {}: {e}", hook.output.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("could not create {}: {e}", hook.output.display()))?;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(hook.command)
        .current_dir(hook.cwd)
        .envs(hook.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Its own process group, so that a timeout kills what `sh` started too.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("could not start `sh -c {}`: {e}", hook.command))?;

    let deadline = Instant::now() + hook.timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(format!("could not wait for the command: {e}")),
        }
        let now = Instant::now();
        let stopping = hook.stop.stopped();
        if now >= deadline || stopping {
            // The group first (sh's children), then sh itself in case the group kill was
            // refused; errors mean it already exited.
            let _ = rustix::process::kill_process_group(
                rustix::process::Pid::from_child(&child),
                rustix::process::Signal::KILL,
            );
            let _ = child.kill();
            let _ = child.wait();
            let why = if stopping {
                "killed: the agent is stopping".to_owned()
            } else {
                format!(
                    "timed out after {} ms and was killed",
                    hook.timeout.as_millis()
                )
            };
            log_output(hook, &why);
            return Err(why);
        }
        std::thread::sleep(POLL.min(deadline - now));
    };
    if status.success() {
        Ok(())
    } else {
        let why = describe(status);
        log_output(hook, &why);
        Err(why)
    }
}

/// Logs the tail of a failed command's output, on the target only.
fn log_output(hook: &Hook<'_>, why: &str) {
    tracing::warn!(hook = hook.what, command = hook.command, outcome = why, output = %output_tail(hook.output), "hook failed");
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => format!("ended with {status}"),
    }
}

/// The last bytes the command printed, on one line; empty if none.
fn output_tail(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file
        .seek(SeekFrom::Start(len.saturating_sub(OUTPUT_TAIL_BYTES)))
        .is_err()
    {
        return String::new();
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let text = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" / ");
    text
}
