//! Mounting an NFS share for a backend or a repository: the agent mounts it itself (`mount -t nfs -o …`)
//! when it is not mounted yet, and refuses a directory that has something else mounted on it. Share and
//! options come from the operator's config, are checked, and are passed as separate arguments.

use crate::runner::{self, CommandError};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Options used when the config names none: NFS 4.2 (sparse files, SEEK_DATA, fallocate and punch-hole need
/// it) and a soft mount with bounded retries, so a dead server yields an error instead of a hung agent.
pub const DEFAULT_OPTIONS: &str = "vers=4.2,soft,timeo=100,retrans=3";

/// Why a share could not be mounted.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The share or options are malformed.
    #[error("{0}")]
    Invalid(String),
    /// Something else is mounted there.
    #[error("{dir} already has {mounted} mounted")]
    Occupied {
        /// The mount point.
        dir: String,
        /// What is mounted.
        mounted: String,
    },
    /// `mount` failed.
    #[error("mount: {0}")]
    Command(#[from] CommandError),
    /// Reading the mount table or creating the directory failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// `server:/path`, with a host name, IPv4 address or bracketed IPv6 address.
pub fn valid_share(share: &str) -> bool {
    let Some((host, path)) = share.split_once(":/") else { return false };
    !host.is_empty()
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':'))
        && path.bytes().all(|b| b.is_ascii_graphic() && b != b',')
}

/// Comma-separated `key` or `key=value` options of safe characters.
pub fn valid_options(options: &str) -> bool {
    !options.is_empty()
        && options.split(',').all(|o| {
            !o.is_empty()
                && o.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'.' | b'_' | b'-' | b':'))
        })
}

/// The arguments of the `mount` command.
pub fn mount_args<'a>(share: &'a str, dir: &'a str, options: &'a str) -> [&'a str; 6] {
    ["-t", "nfs", "-o", options, share, dir]
}

/// What is mounted on `dir` according to a `/proc/mounts` table: `(source, fstype)`.
pub fn mounted_on(mounts: &str, dir: &str) -> Option<(String, String)> {
    mounts.lines().rev().find_map(|line| {
        let mut f = line.split_whitespace();
        let (source, target, fstype) = (f.next()?, f.next()?, f.next()?);
        // /proc/mounts escapes white space in paths as octal (\040).
        (target.replace("\\040", " ") == dir).then(|| (source.to_string(), fstype.to_string()))
    })
}

/// What [`ensure_mounted`] did: mounted the share now, or found it mounted already (by an earlier run, or by
/// the operator). Only a mount made now is this process's to undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mounted {
    /// This call mounted it.
    Now,
    /// It was mounted before.
    Already,
}

/// Mounts `share` on `dir` unless it is mounted there already.
pub async fn ensure_mounted(share: &str, dir: &Path, options: &str) -> Result<Mounted, MountError> {
    if !valid_share(share) {
        return Err(MountError::Invalid(format!("NFS share {share:?} is not server:/path")));
    }
    if !valid_options(options) {
        return Err(MountError::Invalid(format!("NFS options {options:?} are not valid")));
    }
    let dir_s = dir.to_string_lossy().into_owned();
    let table = std::fs::read_to_string("/proc/self/mounts")?;
    match mounted_on(&table, &dir_s) {
        Some((source, fstype)) if source == share && fstype.starts_with("nfs") => return Ok(Mounted::Already),
        Some((source, _)) if source != share && dir != Path::new("/") => {
            return Err(MountError::Occupied { dir: dir_s, mounted: source });
        }
        _ => {}
    }
    std::fs::create_dir_all(dir)?;
    runner::run("mount", &mount_args(share, &dir_s, options), Duration::from_secs(120)).await?;
    tracing::info!(share, dir = %dir_s, options, "NFS share mounted");
    Ok(Mounted::Now)
}

/// The NFS shares an agent mounted itself while starting. A start that is refused after mounting (a backend
/// or repository that will not open, a setting found wrong later) goes through
/// [`StartMounts::undo_if_refused`], so it leaves no mount behind; shares that were mounted before it started
/// stay mounted.
#[derive(Debug, Default)]
pub struct StartMounts(Vec<PathBuf>);

impl StartMounts {
    /// [`ensure_mounted`], remembering a mount made now.
    pub async fn ensure(&mut self, share: &str, dir: &Path, options: &str) -> Result<(), MountError> {
        if ensure_mounted(share, dir, options).await? == Mounted::Now {
            self.0.push(dir.to_path_buf());
        }
        Ok(())
    }

    /// Passes on what the start opened, or, when `opened` is the start's refusal, first unmounts what it
    /// mounted.
    pub async fn undo_if_refused<T, E>(self, opened: Result<T, E>) -> Result<T, E> {
        if opened.is_err() {
            self.undo().await;
        }
        opened
    }

    /// Unmounts the shares mounted by [`StartMounts::ensure`], newest first; a failure is logged, not returned,
    /// as the refusal that led here is the error to report.
    async fn undo(self) {
        for dir in self.0.iter().rev() {
            if let Err(e) = unmount(dir).await {
                tracing::warn!(dir = %dir.display(), "could not unmount after a refused start: {e}");
            }
        }
    }
}

/// Unmounts what is mounted on `dir`; bounded, as a dead server can make `umount` wait.
pub async fn unmount(dir: &Path) -> Result<(), MountError> {
    let dir_s = dir.to_string_lossy();
    runner::run("umount", &[&dir_s], Duration::from_secs(60)).await?;
    tracing::info!(dir = %dir_s, "NFS share unmounted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_real_mount_table() {
        let table = include_str!("../testdata/proc-mounts-nfs4.txt");
        assert_eq!(mounted_on(table, "/mnt/nfs"), Some(("127.0.0.1:/srv/nfs".into(), "nfs4".into())));
        assert_eq!(mounted_on(table, "/proc").map(|m| m.1), Some("proc".into()));
        assert_eq!(mounted_on(table, "/mnt/other"), None);
        assert_eq!(mounted_on("srv:/a /mnt/with\\040space nfs4 rw 0 0\n", "/mnt/with space").unwrap().0, "srv:/a");
    }

    #[test]
    fn checks_shares_and_options() {
        assert!(valid_share("127.0.0.1:/srv/nfs"));
        assert!(valid_share("nfs.example.org:/export/ember"));
        assert!(valid_share("[fd00::1]:/export"));
        assert!(!valid_share("/srv/nfs"));
        assert!(!valid_share("host:/a b"));
        assert!(!valid_share(":/x"));
        assert!(valid_options(DEFAULT_OPTIONS));
        assert!(!valid_options("vers=4.2,,soft"));
        assert!(!valid_options("vers=4.2 soft"));
        assert!(!valid_options("x;rm"));
        assert_eq!(mount_args("s:/e", "/d", "vers=4.2"), ["-t", "nfs", "-o", "vers=4.2", "s:/e", "/d"]);
    }

    #[tokio::test]
    async fn refuses_bad_input_before_running_anything() {
        let dir = Path::new("/nonexistent/ember-test");
        assert!(matches!(ensure_mounted("nonsense", dir, DEFAULT_OPTIONS).await, Err(MountError::Invalid(_))));
        assert!(matches!(ensure_mounted("h:/x", dir, "a b").await, Err(MountError::Invalid(_))));
        assert!(!dir.exists(), "nothing was created");
    }
}
