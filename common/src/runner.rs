//! The one way ember runs an external program: an argv (never a shell), `LC_ALL=C` so output parses the same
//! everywhere, a deadline after which the child is killed, a log line per run, and a typed error that keeps
//! stderr. Only ids and config values become arguments, never user-supplied names.

use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Command;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The program is not installed.
    #[error("{program}: not found (is it installed?)")]
    NotFound {
        /// The program.
        program: String,
    },
    /// It could not be started.
    #[error("{program}: could not start: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The cause.
        source: std::io::Error,
    },
    /// It ran past its deadline and was killed.
    #[error("{program}: no answer within {timeout:?}; killed")]
    TimedOut {
        /// The program.
        program: String,
        /// The deadline.
        timeout: Duration,
    },
    /// It exited unsuccessfully.
    #[error("{program} {args} exited with {code:?}: {stderr}")]
    Failed {
        /// The program.
        program: String,
        /// The arguments, joined for display.
        args: String,
        /// Exit code (`None` when killed by a signal).
        code: Option<i32>,
        /// Its standard error, trimmed.
        stderr: String,
        /// Its standard output, trimmed.
        stdout: String,
    },
}

/// The arguments as logs and errors show them: a secret (the value after an argument naming a password, as
/// `tgtadm --password S` or `iscsiadm -n node.session.auth.password -v S`) is replaced, so CHAP secrets reach
/// neither the logs nor an error a user reads.
pub fn shown_args(args: &[&str]) -> Vec<String> {
    let names_secret = |a: &str| a.to_ascii_lowercase().contains("password");
    args.iter()
        .enumerate()
        .map(|(i, a)| {
            // A bare name (`--password`, a key) is followed by its value; `name=value` carries its own.
            let after = |n: usize| i >= n && names_secret(args[i - n]) && !args[i - n].contains('=');
            if after(1) || (i >= 1 && args[i - 1] == "-v" && after(2)) {
                "<redacted>".to_string()
            } else if let Some((key, _)) = a.split_once('=').filter(|(k, _)| names_secret(k)) {
                format!("{key}=<redacted>")
            } else {
                a.to_string()
            }
        })
        .collect()
}

/// What a successful run printed.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// The slowest pace a data command is allowed before it counts as hung: a busy, degraded disk or a slow image
/// server still moves this much.
const SLOWEST_BYTES_PER_SEC: u64 = 16 << 20;

/// The deadline of a command that moves `bytes` of data (a copy, a wipe, an image conversion): ten minutes,
/// plus the time `bytes` take at [`SLOWEST_BYTES_PER_SEC`]. A fixed bound would fail large volumes for their
/// size alone (6 h is 1 TiB at 50 MB/s), while this one still ends a command that hangs.
pub fn data_deadline(bytes: u64) -> Duration {
    Duration::from_secs(600 + bytes.div_ceil(SLOWEST_BYTES_PER_SEC))
}

/// Runs `program args…` with a deadline; stdin is closed.
pub async fn run(program: &str, args: &[&str], timeout: Duration) -> Result<CommandOutput, CommandError> {
    run_with_input(program, args, timeout, None).await
}

/// Like [`run`], writing `input` to the child's stdin.
pub async fn run_with_input(
    program: &str,
    args: &[&str],
    timeout: Duration,
    input: Option<&[u8]>,
) -> Result<CommandOutput, CommandError> {
    run_child(program, args, timeout, input, None).await
}

/// Like [`run`], with the child's standard output going to `stdout` (a file) rather than into memory: for
/// output that can run to hundreds of MB. The result's `stdout` is then empty.
pub async fn run_to_file(
    program: &str,
    args: &[&str],
    timeout: Duration,
    stdout: std::fs::File,
) -> Result<CommandOutput, CommandError> {
    run_child(program, args, timeout, None, Some(stdout)).await
}

async fn run_child(
    program: &str,
    args: &[&str],
    timeout: Duration,
    input: Option<&[u8]>,
    stdout: Option<std::fs::File>,
) -> Result<CommandOutput, CommandError> {
    let started = Instant::now();
    let shown = shown_args(args);
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("LC_ALL", "C")
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(stdout.map_or_else(Stdio::piped, Stdio::from))
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => CommandError::NotFound { program: program.to_string() },
        _ => CommandError::Spawn { program: program.to_string(), source },
    })?;
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        use tokio::io::AsyncWriteExt;
        let data = data.to_vec();
        tokio::spawn(async move {
            let _ = stdin.write_all(&data).await;
        });
    }
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => out.map_err(|source| CommandError::Spawn { program: program.to_string(), source })?,
        Err(_) => {
            tracing::warn!(program, args = ?shown, ?timeout, "command timed out; killed");
            return Err(CommandError::TimedOut { program: program.to_string(), timeout });
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let elapsed_ms = started.elapsed().as_millis() as u64;
    if output.status.success() {
        tracing::debug!(program, args = ?shown, elapsed_ms, "command ok");
        Ok(CommandOutput { stdout, stderr })
    } else {
        tracing::info!(program, args = ?shown, elapsed_ms, code = ?output.status.code(), stderr = stderr.trim(), "command failed");
        Err(CommandError::Failed {
            program: program.to_string(),
            args: shown.join(" "),
            code: output.status.code(),
            stderr: stderr.trim().to_string(),
            stdout: stdout.trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show() {
        let tgt = ["--mode", "account", "--op", "new", "--user", "u1", "--password", "s3cret"];
        assert_eq!(shown_args(&tgt).join(" "), "--mode account --op new --user u1 --password <redacted>");
        let iscsi = ["-m", "node", "-o", "update", "-n", "node.session.auth.password", "-v", "s3cret"];
        assert_eq!(shown_args(&iscsi)[7], "<redacted>");
        let user = ["-n", "node.session.auth.username", "-v", "u1"];
        assert_eq!(shown_args(&user)[3], "u1", "only secrets are hidden");
        assert_eq!(shown_args(&["--password=s3cret", "x"]), ["--password=<redacted>", "x"]);
    }

    #[tokio::test]
    async fn a_failed_command_does_not_show_its_secret() {
        let err = run("sh", &["-c", "exit 3", "--password", "s3cret"], Duration::from_secs(5)).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("exited with Some(3)") && !text.contains("s3cret"), "{text}");
    }

    #[test]
    fn data_deadlines_grow_with_the_bytes_moved() {
        assert_eq!(data_deadline(0), Duration::from_secs(600));
        assert_eq!(data_deadline(1 << 30), Duration::from_secs(600 + 64));
        assert!(data_deadline(16 << 40) > Duration::from_secs(11 * 24 * 3600), "16 TiB at 16 MiB/s is 12 days");
    }

    #[tokio::test]
    async fn runs_with_c_locale_and_reports_failures() {
        let out = run("sh", &["-c", "echo $LC_ALL"], Duration::from_secs(5)).await.unwrap();
        assert_eq!(out.stdout.trim(), "C");
        match run("sh", &["-c", "echo oops >&2; exit 3"], Duration::from_secs(5)).await {
            Err(CommandError::Failed { code: Some(3), stderr, .. }) => assert_eq!(stderr, "oops"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            run("definitely-not-a-program", &[], Duration::from_secs(5)).await,
            Err(CommandError::NotFound { .. })
        ));
        assert!(matches!(run("sleep", &["5"], Duration::from_millis(100)).await, Err(CommandError::TimedOut { .. })));
    }

    #[tokio::test]
    async fn output_can_go_to_a_file() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let script = ["-c", "echo to-file; echo kept >&2"];
        let out = run_to_file("sh", &script, Duration::from_secs(5), file.reopen().unwrap()).await.unwrap();
        assert_eq!((out.stdout.as_str(), out.stderr.trim()), ("", "kept"));
        assert_eq!(std::fs::read_to_string(file.path()).unwrap(), "to-file\n");
    }
}
