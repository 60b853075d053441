//! The `file` driver: each volume is a file `volume-<id>` (sparse when thin, preallocated when thick) and each
//! snapshot a file `snapshot-<id>`, in the backend's directory (local, or an NFS mount).
//!
//! Every operation is idempotent so the coordinator can repeat it after a crash: new files are built under a
//! temporary name, flushed, and renamed into place, so a file with the final name is always complete.

use crate::backend::Capacity;
use crate::config::BackendConfig;
use crate::error::{AgentError, Result};
use crate::image::{self, ImageFacts};
use crate::sparse;
use ember_common::runner;
use ember_proto::agent::v1::Pool;
use std::fs::{File, OpenOptions};
#[cfg(test)]
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const GIB: u64 = 1 << 30;
/// Name prefix of the mark an unfinished write leaves beside its volume (`.incomplete-volume-<id>`).
const INCOMPLETE_PREFIX: &str = ".incomplete-";

/// Which kind of file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `volume-<id>`.
    Volume,
    /// `snapshot-<id>`.
    Snapshot,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Volume => "volume-",
            Kind::Snapshot => "snapshot-",
        }
    }

    /// "volume" or "snapshot", for messages.
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Volume => "volume",
            Kind::Snapshot => "snapshot",
        }
    }
}

/// Refuses to preallocate `needed` bytes where only `free` are left: NoSpace, with both figures.
fn check_room(needed: u64, free: u64) -> Result<()> {
    if needed > free {
        return Err(AgentError::NoSpace(format!(
            "preallocating {} GiB needs more than the {} GiB free on the backend",
            needed.div_ceil(GIB),
            free / GIB
        )));
    }
    Ok(())
}

/// Checks an id is a canonical UUID: only such ids ever become file names.
pub fn checked_id(field: &'static str, id: &str) -> Result<uuid::Uuid> {
    ember_common::identity::canonical_uuid(id)
        .ok_or_else(|| AgentError::InvalidArgument { field, message: format!("{id:?} is not a lowercase UUID") })
}

/// Takes the group's and others' access away from a volume or snapshot file made before the agent made its
/// files private (an older version, or another program): other users of the node must not read volumes.
/// Best effort: a file the agent may not change (another system's, on a share) is left as it is, with a warning.
fn make_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(mode) = std::fs::metadata(path).map(|m| m.permissions().mode()) else { return };
    if mode & 0o077 != 0 {
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700)) {
            Ok(()) => tracing::info!(path = %path.display(), "volume file made private to the agent's user"),
            Err(e) => tracing::warn!(path = %path.display(), "volume file readable by other users: {e}"),
        }
    }
}

/// The id in a volume's or snapshot's file name (`volume-<uuid>`, `snapshot-<uuid>`); `None` for any other file.
fn volume_or_snapshot_id(name: &str) -> Option<&str> {
    let id = name.strip_prefix("volume-").or_else(|| name.strip_prefix("snapshot-"))?;
    ember_common::identity::canonical_uuid(id).map(|_| id)
}

/// One file backend.
#[derive(Debug, Clone)]
pub struct FileBackend {
    /// Its configuration.
    pub cfg: BackendConfig,
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(AgentError::io(format!("syncing {}", dir.display())))
}

impl FileBackend {
    /// Opens a backend, removing temporary files a crash left behind, and the marks of unfinished writes whose
    /// volume is gone (a crash between removing a volume and its mark).
    pub fn open(cfg: BackendConfig) -> Result<FileBackend> {
        let backend = FileBackend { cfg };
        let entries = std::fs::read_dir(&backend.cfg.directory)
            .map_err(AgentError::io(format!("reading {}", backend.cfg.directory.display())))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                tracing::warn!(path = %entry.path().display(), "removing a temporary file left by a crash");
                let _ = std::fs::remove_file(entry.path());
            } else if let Some(volume) = name.strip_prefix(INCOMPLETE_PREFIX)
                && !backend.cfg.directory.join(volume).exists()
            {
                let _ = std::fs::remove_file(entry.path());
            } else if volume_or_snapshot_id(&name).is_some() {
                make_private(&entry.path());
            }
        }
        Ok(backend)
    }

    /// The file whose presence says volume `id` is being written by a restore or a migration's copy, or was
    /// and that write never finished: its data is partial.
    fn incomplete_mark(&self, id: &uuid::Uuid) -> PathBuf {
        self.cfg.directory.join(format!("{INCOMPLETE_PREFIX}{}{id}", Kind::Volume.prefix()))
    }

    /// Marks volume `id` as being written (`incomplete`), durably, or removes the mark once the write is whole.
    pub fn mark_incomplete(&self, id: &uuid::Uuid, incomplete: bool) -> Result<()> {
        let mark = self.incomplete_mark(id);
        if incomplete {
            File::create(&mark)
                .and_then(|f| f.sync_all())
                .map_err(AgentError::io(format!("creating {}", mark.display())))?;
        } else {
            match std::fs::remove_file(&mark) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(AgentError::io(format!("removing {}", mark.display()))(e));
                }
                _ => {}
            }
        }
        sync_dir(&self.cfg.directory)
    }

    /// Whether volume `id` carries the mark of an unfinished write.
    pub fn is_incomplete(&self, id: &uuid::Uuid) -> bool {
        self.incomplete_mark(id).exists()
    }

    /// Path of a volume or snapshot file.
    pub fn path(&self, kind: Kind, id: &uuid::Uuid) -> PathBuf {
        self.cfg.directory.join(format!("{}{id}", kind.prefix()))
    }

    fn tmp_path(&self, kind: Kind, id: &uuid::Uuid) -> PathBuf {
        self.cfg.directory.join(format!(".tmp-{}{id}", kind.prefix()))
    }

    /// The size of an existing file, or `None`.
    fn existing_len(path: &Path) -> Result<Option<u64>> {
        match std::fs::metadata(path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AgentError::io(format!("inspecting {}", path.display()))(e)),
        }
    }

    /// Sets the size; thick backends allocate the new range.
    fn size_file(&self, file: &File, path: &Path, bytes: u64) -> Result<()> {
        let old = file.metadata().map_err(AgentError::io(format!("inspecting {}", path.display())))?.len();
        if !self.cfg.thin && bytes > old {
            // Asked first: fallocate would take every free block before it fails, for the whole filesystem.
            let (_, free) = ember_common::agent::filesystem_space(&self.cfg.directory)
                .map_err(AgentError::io(format!("reading the free space of {}", self.cfg.directory.display())))?;
            check_room(bytes - old, free)?;
            // Allocating grows the file; a failure leaves its size as it was, and the blocks it took past the end
            // are given back, so a failed extend leaves the volume as it was.
            if let Err(e) =
                nix::fcntl::fallocate(file, nix::fcntl::FallocateFlags::empty(), old as i64, (bytes - old) as i64)
            {
                let _ = file.set_len(old);
                return Err(AgentError::io(format!("allocating {}", path.display()))(e.into()));
            }
        }
        file.set_len(bytes).map_err(AgentError::io(format!("sizing {}", path.display())))?;
        file.sync_all().map_err(AgentError::io(format!("syncing {}", path.display())))
    }

    /// Moves a finished temporary file into place.
    fn publish(&self, tmp: &Path, path: &Path) -> Result<()> {
        std::fs::rename(tmp, path).map_err(AgentError::io(format!("renaming into {}", path.display())))?;
        sync_dir(&self.cfg.directory)
    }

    /// Creates a blank volume of `size_gb` GiB. Repeating it is a no-op; a different size is refused.
    pub fn create_blank(&self, id: &uuid::Uuid, size_gb: u64) -> Result<u64> {
        let (path, tmp) = (self.path(Kind::Volume, id), self.tmp_path(Kind::Volume, id));
        let bytes = size_gb * GIB;
        if let Some(len) = Self::existing_len(&path)? {
            return if len == bytes {
                Ok(len)
            } else {
                Err(AgentError::FailedPrecondition(format!("volume {id} exists with another size ({len} bytes)")))
            };
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(AgentError::io(format!("creating {}", tmp.display())))?;
        if let Err(e) = self.size_file(&file, &tmp, bytes) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.publish(&tmp, &path)?;
        Ok(bytes)
    }

    /// Copies `source` into a new file of `kind`/`id` (reflink where the filesystem supports it, else a copy
    /// that skips holes), then grows it to `size_gb` if larger. Repeating it is a no-op.
    pub async fn create_copy(&self, kind: Kind, id: &uuid::Uuid, source: &Path, size_gb: Option<u64>) -> Result<u64> {
        let (path, tmp) = (self.path(kind, id), self.tmp_path(kind, id));
        if let Some(len) = Self::existing_len(&path)? {
            return Ok(len);
        }
        let src_len = Self::existing_len(source)?.ok_or_else(|| {
            AgentError::NotFound(format!("source {}", source.file_name().unwrap_or_default().to_string_lossy()))
        })?;
        let (src, dst) = (source.to_string_lossy().into_owned(), tmp.to_string_lossy().into_owned());
        if let Err(e) =
            runner::run("cp", &["--reflink=auto", "--sparse=always", "--", &src, &dst], runner::data_deadline(src_len))
                .await
        {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
        let bytes = size_gb.map(|g| g * GIB).unwrap_or(src_len).max(src_len);
        let file = OpenOptions::new().write(true).open(&tmp).map_err(AgentError::io(format!("opening {dst}")))?;
        if let Err(e) = self.size_file(&file, &tmp, bytes) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.publish(&tmp, &path)?;
        Ok(bytes)
    }

    /// Creates a volume of `size_gb` GiB filled from an image: converted into a temporary file, grown, flushed
    /// and renamed into place, so a file with the final name is always complete. Repeating it is a no-op.
    pub async fn create_from_image(&self, id: &uuid::Uuid, size_gb: u64, source: &str) -> Result<(u64, ImageFacts)> {
        let bytes = size_gb * GIB;
        let facts = image::inspect(source, bytes).await?;
        let (path, tmp) = (self.path(Kind::Volume, id), self.tmp_path(Kind::Volume, id));
        if let Some(len) = Self::existing_len(&path)? {
            return Ok((len, facts));
        }
        let _ = std::fs::remove_file(&tmp);
        let filled = async {
            image::convert(source, &facts, &tmp, false, true).await?;
            let file = OpenOptions::new()
                .write(true)
                .open(&tmp)
                .map_err(AgentError::io(format!("opening {}", tmp.display())))?;
            self.size_file(&file, &tmp, bytes)
        };
        if let Err(e) = filled.await {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.publish(&tmp, &path)?;
        Ok((bytes, facts))
    }

    /// Grows a volume. Asking for its current size again is a no-op; shrinking is refused.
    pub fn extend(&self, id: &uuid::Uuid, new_gb: u64) -> Result<u64> {
        let path = self.path(Kind::Volume, id);
        let len = Self::existing_len(&path)?.ok_or_else(|| AgentError::NotFound(format!("volume {id}")))?;
        let bytes = new_gb * GIB;
        if bytes < len {
            return Err(AgentError::FailedPrecondition(format!("volume {id} is larger than {new_gb} GiB")));
        }
        if bytes > len {
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(AgentError::io(format!("opening {}", path.display())))?;
            self.size_file(&file, &path, bytes)?;
        }
        Ok(bytes)
    }

    /// Wipes (unless the backend is configured `wipe = "none"`) and removes a file. Removing what is gone
    /// succeeds. The wipe overwrites only the file's data extents with zeros and flushes them before the
    /// unlink, so its cost follows the data written, not the volume's size.
    pub async fn remove(&self, kind: Kind, id: &uuid::Uuid) -> Result<()> {
        let path = self.path(kind, id);
        if Self::existing_len(&path)?.is_none() {
            return Ok(());
        }
        if self.cfg.wipe == crate::config::Wipe::Zero {
            let p = path.clone();
            let zeroed = tokio::task::spawn_blocking(move || {
                sparse::zero_data_extents(&ember_common::direct_io::DirectFile::open(&p, true)?)
            })
            .await
            .map_err(|e| AgentError::Io { context: "wipe task".into(), source: std::io::Error::other(e) })?
            .map_err(AgentError::io(format!("wiping {}", path.display())))?;
            tracing::info!(%id, zeroed_bytes = zeroed, "wiped");
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(AgentError::io(format!("removing {}", path.display()))(e)),
        }
        if kind == Kind::Volume {
            // After the volume: a crash between the two leaves a mark without a volume, which `open` removes.
            let _ = std::fs::remove_file(self.incomplete_mark(id));
        }
        sync_dir(&self.cfg.directory)
    }

    /// Ids of the volumes and snapshots present. Files whose name only starts like a volume's (another system's
    /// in a shared directory, such as Cinder's `volume-<id>.info` beside its NFS volumes) are none.
    pub fn list(&self) -> Result<(Vec<String>, Vec<String>)> {
        let (mut volumes, mut snapshots) = (Vec::new(), Vec::new());
        let entries = std::fs::read_dir(&self.cfg.directory)
            .map_err(AgentError::io(format!("reading {}", self.cfg.directory.display())))?;
        let is_id = |id: &&str| ember_common::identity::canonical_uuid(id).is_some();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_prefix("volume-").filter(is_id) {
                volumes.push(id.to_string());
            } else if let Some(id) = name.strip_prefix("snapshot-").filter(is_id) {
                snapshots.push(id.to_string());
            }
        }
        volumes.sort();
        snapshots.sort();
        Ok((volumes, snapshots))
    }

    /// The pool's capacity as Cinder reports it: total/free from the filesystem, provisioned = sum of volume
    /// sizes, allocated = blocks really used by volumes and snapshots.
    pub fn pool(&self) -> Pool {
        let (total, free) = ember_common::agent::filesystem_space(&self.cfg.directory).unwrap_or((0, 0));
        let (mut provisioned, mut allocated) = (0u64, 0u64);
        if let Ok(entries) = std::fs::read_dir(&self.cfg.directory) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Ok(meta) = entry.metadata() {
                    if name.starts_with("volume-") {
                        provisioned += meta.len();
                    }
                    if name.starts_with("volume-") || name.starts_with("snapshot-") {
                        allocated += sparse::allocated_bytes(&meta);
                    }
                }
            }
        }
        let space = Capacity { total, free, provisioned, allocated };
        // QEMU's LUKS formats a file backend's volumes (`luks.rs`).
        crate::backend::pool_report(&self.cfg, self.cfg.thin, space, &[("luks_encryption", "True")])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Wipe;

    fn backend(dir: &Path, thin: bool) -> FileBackend {
        FileBackend::open(BackendConfig {
            name: "b".into(),
            driver: "file".into(),
            directory: dir.to_path_buf(),
            availability_zone: None,
            reserved_percentage: 0,
            max_over_subscription_ratio: 20.0,
            thin,
            wipe: Wipe::Zero,
            nfs_share: None,
            nfs_mount_options: None,
            volume_group: None,
            lvm_type: Default::default(),
            wipe_size_mb: 0,
            command_timeout_secs: 10,
            target: Default::default(),
        })
        .unwrap()
    }

    #[tokio::test]
    async fn the_mark_of_an_unfinished_write_is_kept_listed_apart_and_goes_with_its_volume() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path(), true);
        let (id, gone) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        b.create_blank(&id, 1).unwrap();
        assert!(!b.is_incomplete(&id));
        b.mark_incomplete(&id, true).unwrap();
        b.mark_incomplete(&id, true).unwrap();
        assert!(b.is_incomplete(&id), "marked, and marking again is a no-op");
        assert_eq!(b.list().unwrap(), (vec![id.to_string()], vec![]), "the mark is not a volume");
        b.mark_incomplete(&id, false).unwrap();
        b.mark_incomplete(&id, false).unwrap();
        assert!(!b.is_incomplete(&id), "cleared, and clearing again is a no-op");

        b.mark_incomplete(&id, true).unwrap();
        b.remove(Kind::Volume, &id).await.unwrap();
        assert!(!b.is_incomplete(&id), "removing the volume removes its mark");
        // A crash between removing a volume and its mark: the next start removes the mark, not another's.
        b.create_blank(&id, 1).unwrap();
        b.mark_incomplete(&id, true).unwrap();
        std::fs::write(dir.path().join(format!("{INCOMPLETE_PREFIX}volume-{gone}")), b"").unwrap();
        let b = backend(dir.path(), true);
        assert!(b.is_incomplete(&id) && !b.is_incomplete(&gone));
    }

    #[tokio::test]
    async fn create_copy_extend_remove_are_idempotent_and_sparse() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".tmp-volume-leftover"), b"x").unwrap();
        let b = backend(dir.path(), true);
        assert!(!dir.path().join(".tmp-volume-leftover").exists(), "crash leftovers are removed at open");
        let id = uuid::Uuid::new_v4();
        assert_eq!(b.create_blank(&id, 2).unwrap(), 2 * GIB);
        assert_eq!(b.create_blank(&id, 2).unwrap(), 2 * GIB, "repeat is a no-op");
        assert!(matches!(b.create_blank(&id, 3), Err(AgentError::FailedPrecondition(_))));
        let meta = std::fs::metadata(b.path(Kind::Volume, &id)).unwrap();
        assert!(sparse::allocated_bytes(&meta) < 1 << 20, "thin volumes are sparse");

        std::fs::OpenOptions::new()
            .write(true)
            .open(b.path(Kind::Volume, &id))
            .unwrap()
            .write_all_at(b"hello", 4096)
            .unwrap();
        let snap = uuid::Uuid::new_v4();
        b.create_copy(Kind::Snapshot, &snap, &b.path(Kind::Volume, &id), None).await.unwrap();
        let clone = uuid::Uuid::new_v4();
        assert_eq!(
            b.create_copy(Kind::Volume, &clone, &b.path(Kind::Snapshot, &snap), Some(3)).await.unwrap(),
            3 * GIB
        );
        let mut data = [0u8; 5];
        File::open(b.path(Kind::Volume, &clone)).unwrap().read_exact_at(&mut data, 4096).unwrap();
        assert_eq!(&data, b"hello");
        assert!(
            sparse::allocated_bytes(&std::fs::metadata(b.path(Kind::Volume, &clone)).unwrap()) < 1 << 20,
            "copies stay sparse"
        );

        assert_eq!(b.extend(&id, 4).unwrap(), 4 * GIB);
        assert_eq!(b.extend(&id, 4).unwrap(), 4 * GIB);
        assert!(matches!(b.extend(&id, 1), Err(AgentError::FailedPrecondition(_))));
        let (volumes, snapshots) = b.list().unwrap();
        assert_eq!((volumes.len(), snapshots.len()), (2, 1));
        let pool = b.pool();
        assert_eq!(pool.provisioned_capacity_gb, 7.0);
        // What Cinder's NFS driver keeps beside a volume with a snapshot: none of it is a volume or snapshot.
        let cinders = [format!("volume-{id}.info"), format!("volume-{id}.{snap}"), "snapshot-x".to_string()];
        for name in &cinders {
            std::fs::write(dir.path().join(name), b"{}").unwrap();
        }
        assert_eq!(b.list().unwrap(), (volumes, snapshots), "names that only look like ember's are not listed");
        for name in &cinders {
            std::fs::remove_file(dir.path().join(name)).unwrap();
        }

        b.remove(Kind::Volume, &id).await.unwrap();
        b.remove(Kind::Volume, &id).await.unwrap();
        b.remove(Kind::Snapshot, &snap).await.unwrap();
        b.remove(Kind::Volume, &clone).await.unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn thick_volumes_are_allocated() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path(), false);
        let id = uuid::Uuid::new_v4();
        b.create_blank(&id, 1).unwrap();
        assert!(sparse::allocated_bytes(&std::fs::metadata(b.path(Kind::Volume, &id)).unwrap()) >= GIB);
        assert!(checked_id("volume_id", "../../etc/passwd").is_err(), "only UUIDs become paths");

        // An extend past the free space is refused before anything is allocated, and leaves the volume as it was.
        let (_, free) = ember_common::agent::filesystem_space(dir.path()).unwrap();
        // Twice the free space: other tests freeing space meanwhile cannot make it fit.
        let too_big = free / GIB * 2 + 64;
        let err = b.extend(&id, too_big).unwrap_err();
        assert!(matches!(err, AgentError::NoSpace(_)), "{err}");
        let meta = std::fs::metadata(b.path(Kind::Volume, &id)).unwrap();
        assert_eq!((meta.len(), sparse::allocated_bytes(&meta) < 2 * GIB), (GIB, true), "unchanged");
        assert_eq!(b.extend(&id, 2).unwrap(), 2 * GIB, "a smaller extend then succeeds");
        assert!(sparse::allocated_bytes(&std::fs::metadata(b.path(Kind::Volume, &id)).unwrap()) >= 2 * GIB);
    }

    #[test]
    fn room_to_preallocate() {
        assert!(check_room(GIB, GIB).is_ok());
        let err = check_room(3 * GIB, 2 * GIB + 5).unwrap_err();
        assert_eq!(err.to_string(), "preallocating 3 GiB needs more than the 2 GiB free on the backend");
    }
}
