//! `sh -c` hooks (pre-switch, health check): a working directory, the agent's environment,
//! an optional timeout, and output captured to a file (a pipe nobody reads could fill up and
//! stall the command) whose tail goes into the failure reason.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How often a running command with a timeout is polled.
const POLL: Duration = Duration::from_millis(10);

/// How much of the command's output ends up in the failure reason.
const OUTPUT_TAIL_BYTES: u64 = 400;

/// One command to run.
pub(super) struct Hook<'a> {
    /// Given to `sh -c`.
    pub command: &'a str,
    /// Working directory.
    pub cwd: &'a Path,
    /// Added to the agent's own environment.
    pub env: &'a [(&'static str, OsString)],
    /// Killed (with its whole process group) once this has passed.
    pub timeout: Option<Duration>,
    /// Receives stdout and stderr; the caller deletes it.
    pub output: &'a Path,
}

/// Runs `hook`; `Err` is the reason it failed, readable as the end of a sentence.
pub(super) fn run(hook: &Hook<'_>) -> Result<(), String> {
    let out = File::create(hook.output)
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

    let status = match hook.timeout {
        None => child
            .wait()
            .map_err(|e| format!("could not wait for the command: {e}"))?,
        Some(timeout) => {
            let deadline = Instant::now() + timeout;
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => break status,
                    Ok(None) => {}
                    Err(e) => return Err(format!("could not wait for the command: {e}")),
                }
                let now = Instant::now();
                if now >= deadline {
                    // The group first (sh's children), then sh itself in case the group
                    // kill was refused; errors mean it already exited.
                    let _ = rustix::process::kill_process_group(
                        rustix::process::Pid::from_child(&child),
                        rustix::process::Signal::KILL,
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "timed out after {} ms{}",
                        timeout.as_millis(),
                        output_tail(hook.output)
                    ));
                }
                std::thread::sleep(POLL.min(deadline - now));
            }
        }
    };
    if status.success() {
        Ok(())
    } else {
        Err(format!("{}{}", describe(status), output_tail(hook.output)))
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => format!("ended with {status}"),
    }
}

/// `", output: …"` with the last bytes the command printed, on one line; empty if none.
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
    if text.is_empty() {
        String::new()
    } else {
        format!(", output: {text}")
    }
}
