//! A backup repository on a directory (local or NFS). The on-disk format is documented in
//! docs/backup-format.md:
//!
//! ```text
//! <repo>/ember-repository.json          format version, chunk size
//! <repo>/chunks/<d0d1>/<d2d3>/<sha256>  chunks (see chunk.rs), fan-out by the digest's first two bytes
//! <repo>/backups/<id>/index             which chunk sits at which position
//! <repo>/backups/<id>/manifest.json     ids, parent, times, sizes, format, the index's sha256
//! <repo>/deleted/<id>                   empty: backup <id> was deleted, and must not be made again
//! <repo>/tmp/                           files being written; removed at start
//! <repo>/lock                           locked by the one agent using the repository; says which agent
//! ```
//!
//! Durability: chunk files are written under `tmp/`, the filesystem is synced (`syncfs`), and only then are
//! they renamed into `chunks/`; the index and manifest are written last, the same way. A chunk is therefore
//! never referenced before it is durable, and a crash leaves only files in `tmp/`.

use crate::chunk;
use ember_common::direct_io::{AlignedBuf, DirectFile};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// The repository format this build writes and reads.
pub const FORMAT: u32 = 1;
/// Default chunk size: 1 MiB (see docs/backup-format.md for the measurement behind it).
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
const INDEX_MAGIC: &[u8; 8] = b"EMBIDX01";
/// How long garbage collection keeps a deleted backup's tombstone: far longer than a call to make that backup
/// can still be on its way.
const TOMBSTONE_KEEP: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

thread_local! {
    /// Each worker thread's buffer for a chunk file, reused from one chunk to the next.
    static SCRATCH: std::cell::RefCell<AlignedBuf> = std::cell::RefCell::default();
}

/// `ember-repository.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepoConfig {
    /// Format version.
    pub format: u32,
    /// Chunk size in bytes, fixed at creation.
    pub chunk_size: u32,
}

/// A backup's `manifest.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Format version.
    pub format: u32,
    /// Backup id.
    pub backup_id: String,
    /// Volume id.
    pub volume_id: String,
    /// Parent backup id for incrementals, else empty.
    pub parent_id: String,
    /// Start, RFC 3339.
    pub started_at: String,
    /// End, RFC 3339.
    pub completed_at: String,
    /// Volume size in bytes.
    pub volume_size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Chunks referenced.
    pub chunks: u64,
    /// Non-zero bytes (plaintext of the referenced chunks).
    pub logical_bytes: u64,
    /// Stored bytes of the referenced chunks.
    pub stored_bytes: u64,
    /// Stored bytes this backup added.
    pub new_bytes: u64,
    /// sha256 of the `index` file, hex.
    pub index_sha256: String,
    /// Owning project, so a coordinator that lost its database can give the backup back to it. Absent in
    /// manifests written before it was recorded.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub project: String,
    /// The backup's name (absent when empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The backup's description (absent when empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The user's snapshot that was read (absent when the volume itself was).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub snapshot_id: String,
    /// When the data was current, RFC 3339 (absent: `started_at`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub data_timestamp: String,
    /// An encrypted volume's LUKS key, sealed by the coordinator (absent for plain data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<ManifestKey>,
}

/// A backup's sealed LUKS key as the manifest records it; this agent cannot open it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestKey {
    /// The coordinator's sealed passphrase (nonce, ciphertext, tag), hex.
    pub wrapped: String,
    /// UUID of the libvirt secret compute hosts file the passphrase under.
    pub secret_uuid: String,
    /// Bytes of the LUKS header before the payload.
    pub header_bytes: u64,
}

impl ManifestKey {
    /// The key a CreateBackup request carries, as recorded.
    pub fn from_proto(k: &ember_proto::agent::v1::WrappedKey) -> ManifestKey {
        ManifestKey {
            wrapped: hex::encode(&k.wrapped),
            secret_uuid: k.secret_uuid.clone(),
            header_bytes: k.header_bytes,
        }
    }

    /// The recorded key as ListStoredBackups returns it; `None` when the record is not hex.
    pub fn to_proto(&self) -> Option<ember_proto::agent::v1::WrappedKey> {
        let wrapped = hex::decode(&self.wrapped).ok()?;
        Some(ember_proto::agent::v1::WrappedKey {
            wrapped,
            secret_uuid: self.secret_uuid.clone(),
            header_bytes: self.header_bytes,
        })
    }
}

/// A backup's index: chunk position → digest, for the positions that are not all zero.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Index {
    /// Chunk size.
    pub chunk_size: u32,
    /// Volume size.
    pub volume_size: u64,
    /// Position → digest.
    pub entries: BTreeMap<u64, [u8; 32]>,
}

impl Index {
    /// The binary form: magic, chunk size (u32 LE), volume size (u64 LE), count (u64 LE), then per entry the
    /// position (u64 LE) and the 32-byte digest, in position order.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(28 + self.entries.len() * 40);
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.volume_size.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for (pos, digest) in &self.entries {
            out.extend_from_slice(&pos.to_le_bytes());
            out.extend_from_slice(digest);
        }
        out
    }

    /// Parses [`Index::encode`]'s form.
    pub fn decode(bytes: &[u8]) -> io::Result<Index> {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed index");
        if bytes.len() < 28 || &bytes[..8] != INDEX_MAGIC {
            return Err(bad());
        }
        let chunk_size = u32::from_le_bytes(bytes[8..12].try_into().map_err(|_| bad())?);
        let volume_size = u64::from_le_bytes(bytes[12..20].try_into().map_err(|_| bad())?);
        let count = u64::from_le_bytes(bytes[20..28].try_into().map_err(|_| bad())?) as usize;
        let body = &bytes[28..];
        if body.len() != count.checked_mul(40).ok_or_else(bad)? {
            return Err(bad());
        }
        let entries = body
            .chunks_exact(40)
            .map(|e| (u64::from_le_bytes(e[..8].try_into().expect("8")), e[8..].try_into().expect("32")))
            .collect();
        Ok(Index { chunk_size, volume_size, entries })
    }
}

/// An open repository.
#[derive(Debug)]
pub struct Repository {
    /// Root directory.
    pub root: PathBuf,
    /// Chunk size.
    pub chunk_size: u32,
    /// Held while a chunk is touched and while garbage collection decides on one chunk and removes it, so a
    /// touch lands either before the decision (which then sees the new time) or after the removal (which it
    /// then sees as missing), never in between.
    touch_or_sweep: std::sync::Mutex<()>,
    /// `lock`, exclusively locked while the repository is open. Garbage collection knows only the backups
    /// running in this process, and opening clears `tmp/`: a second agent on the same directory (say, the same
    /// NFS share mounted on two backup nodes) could delete chunks the other is writing or relying on.
    _lock: File,
}

/// A name for a file in `tmp/` that no other writer uses: `stem`, this process's id and a sequence number.
/// The number matters: backups of different volumes run, and commit, at the same time in one process, and a
/// shared temporary file would hand one backup's index to another.
fn temp_name(stem: &str) -> String {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    format!("{stem}.{}.{}", std::process::id(), SEQUENCE.fetch_add(1, Ordering::Relaxed))
}

fn write_atomic(dir: &Path, tmp_dir: &Path, name: &str, data: &[u8]) -> io::Result<()> {
    let tmp = tmp_dir.join(temp_name(name));
    let mut f = File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

/// Locks `path` (created if missing) exclusively without waiting, then writes `holder` into it, so a process
/// refused the lock can say who has it. The lock is `flock`, which Linux maps to an NFS lock on an NFS mount,
/// and it goes when the process ends, however it ends.
fn lock_exclusively(path: &Path, holder: &str) -> io::Result<File> {
    // Opened for writing: NFS grants an exclusive lock only on a file open for writing.
    let mut file = fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let other = fs::read_to_string(path).unwrap_or_default();
            let other = if other.trim().is_empty() { "unknown" } else { other.trim() };
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!("in use by another process ({other}); a repository belongs to one backup agent"),
            ));
        }
        Err(fs::TryLockError::Error(e)) => return Err(e),
    }
    file.set_len(0)?;
    file.write_all(holder.as_bytes())?;
    // Flushed to the server now: an NFS client writes back on close or fsync, and this file stays open while
    // the agent runs, so an agent refused on another node would otherwise read an empty holder.
    file.sync_all()?;
    Ok(file)
}

/// Hex of a digest.
pub fn hex(d: &[u8; 32]) -> String {
    hex::encode(d)
}

impl Repository {
    /// Opens the repository in `root`, creating it with `chunk_size` when new, and locks it for this process,
    /// described to others as `holder`; clears `tmp/`. Fails with [`io::ErrorKind::ResourceBusy`] naming the
    /// holder when another process has it open.
    pub fn open(root: &Path, chunk_size: u32, holder: &str) -> io::Result<Repository> {
        fs::create_dir_all(root)?;
        let lock = lock_exclusively(&root.join("lock"), holder)?;
        for d in ["chunks", "backups", "deleted", "tmp"] {
            fs::create_dir_all(root.join(d))?;
        }
        let cfg_path = root.join("ember-repository.json");
        let cfg: RepoConfig = match fs::read(&cfg_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let cfg = RepoConfig { format: FORMAT, chunk_size };
                write_atomic(root, &root.join("tmp"), "ember-repository.json", &serde_json::to_vec_pretty(&cfg)?)?;
                cfg
            }
            Err(e) => return Err(e),
        };
        if cfg.format != FORMAT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("repository format {} is not {FORMAT}", cfg.format),
            ));
        }
        for entry in fs::read_dir(root.join("tmp"))?.flatten() {
            let _ = fs::remove_file(entry.path());
        }
        Ok(Repository {
            root: root.into(),
            chunk_size: cfg.chunk_size,
            touch_or_sweep: Default::default(),
            _lock: lock,
        })
    }

    /// Where chunk `digest` lives.
    pub fn chunk_path(&self, digest: &[u8; 32]) -> PathBuf {
        let h = hex(digest);
        self.root.join("chunks").join(&h[..2]).join(&h[2..4]).join(h)
    }

    /// Whether chunk `digest` is stored; a stored one has its time touched so a concurrent garbage
    /// collection keeps it (see [`Repository::collect_garbage`]). Returns its stored size.
    pub fn touch_chunk(&self, digest: &[u8; 32]) -> Option<u64> {
        let path = self.chunk_path(digest);
        let _touching = self.touch_or_sweep.lock().expect("touch lock");
        let meta = fs::metadata(&path).ok()?;
        let _ = nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &path,
            &nix::sys::time::TimeSpec::UTIME_NOW,
            &nix::sys::time::TimeSpec::UTIME_NOW,
            nix::sys::stat::UtimensatFlags::FollowSymlink,
        );
        Some(meta.len())
    }

    /// Now, by the repository's own clock: the time its filesystem stamps on a file created now. Garbage
    /// collection compares chunk times with this, never with the agent's clock: a local filesystem stamps a
    /// coarse clock that lags the precise one (by 7 ms, seen here: a chunk touched just after a backup began
    /// looked older than the backup), and an NFS server stamps its own.
    pub fn clock(&self) -> io::Result<SystemTime> {
        let probe = self.root.join("tmp").join(temp_name("clock"));
        let stamped = File::create(&probe).and_then(|f| f.metadata()).and_then(|m| m.modified());
        let _ = fs::remove_file(&probe);
        stamped
    }

    /// Encodes and writes a new chunk under `tmp/`; returns the temporary path and the stored size. The chunk is
    /// not visible until [`Repository::publish`]. The data bypasses the page cache (see `ember_common::direct_io`).
    pub fn stage_chunk(&self, plain: &[u8], digest: &[u8; 32]) -> io::Result<(PathBuf, u64)> {
        let tmp = self.root.join("tmp").join(temp_name(&hex(digest)));
        let stored = SCRATCH.with_borrow_mut(|buf| {
            let stored = chunk::encode_into(plain, buf);
            DirectFile::create_new(&tmp)?.write_all_from(buf).map(|()| stored)
        })?;
        Ok((tmp, stored as u64))
    }

    /// Makes staged chunks durable (one `syncfs`), then moves them into place and syncs again.
    pub fn publish(&self, staged: &[(PathBuf, [u8; 32])]) -> io::Result<()> {
        if staged.is_empty() {
            return Ok(());
        }
        let root = File::open(&self.root)?;
        nix::unistd::syncfs(&root).map_err(io::Error::from)?;
        for (tmp, digest) in staged {
            let path = self.chunk_path(digest);
            fs::create_dir_all(path.parent().expect("fan-out dir"))?;
            fs::rename(tmp, &path)?;
        }
        nix::unistd::syncfs(&root).map_err(io::Error::from)
    }

    /// Reads, decodes and checks chunk `digest` (around the page cache).
    pub fn read_chunk(&self, digest: &[u8; 32]) -> Result<Vec<u8>, String> {
        let missing = |_| format!("chunk {} is missing", hex(digest));
        let file = DirectFile::open(&self.chunk_path(digest), false).map_err(missing)?;
        let len = file.file().metadata().map_err(missing)?.len() as usize;
        SCRATCH.with_borrow_mut(|buf| {
            let stored = file.read_all(len, buf).map_err(|e| format!("chunk {} is unreadable: {e}", hex(digest)))?;
            chunk::decode(stored, digest).map_err(|e| format!("chunk {} is corrupt ({e:?})", hex(digest)))
        })
    }

    fn backup_dir(&self, id: &str) -> PathBuf {
        self.root.join("backups").join(id)
    }

    /// Writes a backup's index then its manifest, each atomically; the manifest's presence marks the backup
    /// complete.
    pub fn commit_backup(&self, manifest: &mut Manifest, index: &Index) -> io::Result<()> {
        let dir = self.backup_dir(&manifest.backup_id);
        fs::create_dir_all(&dir)?;
        let bytes = index.encode();
        manifest.index_sha256 = hex::encode(Sha256::digest(&bytes));
        let tmp = self.root.join("tmp");
        write_atomic(&dir, &tmp, "index", &bytes)?;
        write_atomic(&dir, &tmp, "manifest.json", &serde_json::to_vec_pretty(manifest)?)?;
        File::open(self.root.join("backups"))?.sync_all()
    }

    /// A complete backup's manifest and index (the index checked against the manifest).
    pub fn load_backup(&self, id: &str) -> io::Result<(Manifest, Index)> {
        let dir = self.backup_dir(id);
        let manifest: Manifest = serde_json::from_slice(&fs::read(dir.join("manifest.json"))?)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let bytes = fs::read(dir.join("index"))?;
        if hex::encode(Sha256::digest(&bytes)) != manifest.index_sha256 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("backup {id}: index does not match its manifest"),
            ));
        }
        Ok((manifest, Index::decode(&bytes)?))
    }

    /// Removes a backup's manifest and index; its chunks go at the next garbage collection. A tombstone is
    /// left first ([`Repository::was_deleted`]), so that a call to make the backup that was still on its way
    /// while it was deleted cannot publish it afterwards.
    pub fn delete_backup(&self, id: &str) -> io::Result<()> {
        let deleted = self.root.join("deleted");
        File::create(deleted.join(id))?.sync_all()?;
        File::open(&deleted)?.sync_all()?;
        let dir = self.backup_dir(id);
        match fs::remove_file(dir.join("manifest.json")) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        File::open(self.root.join("backups"))?.sync_all()
    }

    /// Whether backup `id` was deleted here (within [`TOMBSTONE_KEEP`]): it must not be made again.
    pub fn was_deleted(&self, id: &str) -> bool {
        self.root.join("deleted").join(id).exists()
    }

    /// Rewrites complete backup `id`'s name and description in its manifest, atomically. NotFound when the
    /// backup is not complete here (still being made, or deleted meanwhile: the rename into a removed directory
    /// fails, so a delete is never undone).
    pub fn describe_backup(&self, id: &str, name: &str, description: &str) -> io::Result<()> {
        let dir = self.backup_dir(id);
        let mut manifest: Manifest = serde_json::from_slice(&fs::read(dir.join("manifest.json"))?)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        manifest.name = name.to_string();
        manifest.description = description.to_string();
        write_atomic(&dir, &self.root.join("tmp"), "manifest.json", &serde_json::to_vec_pretty(&manifest)?)
    }

    /// Ids of complete backups.
    pub fn backups(&self) -> io::Result<Vec<String>> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(self.root.join("backups"))?.flatten() {
            if entry.path().join("manifest.json").exists() {
                ids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Mark and sweep. Marks every chunk a complete backup references, then removes unmarked chunks whose
    /// modification time is older than `cutoff`. Backups running during the collection are safe because every
    /// chunk they write is new (newer than the cutoff) and every existing chunk they reuse is touched
    /// ([`Repository::touch_chunk`]); the caller passes a cutoff no later than the start of the oldest backup
    /// still running, both read from [`Repository::clock`]. Tombstones older than [`TOMBSTONE_KEEP`] before
    /// the cutoff go too. Returns (chunks removed, bytes freed).
    pub fn collect_garbage(&self, cutoff: std::time::SystemTime) -> io::Result<(u64, u64)> {
        for t in fs::read_dir(self.root.join("deleted"))?.flatten() {
            if t.metadata()?.modified()? + TOMBSTONE_KEEP < cutoff {
                fs::remove_file(t.path())?;
            }
        }
        let mut marked = std::collections::HashSet::new();
        for id in self.backups()? {
            let (_, index) = self.load_backup(&id)?;
            marked.extend(index.entries.values().copied());
        }
        let (mut removed, mut freed) = (0, 0);
        for l1 in fs::read_dir(self.root.join("chunks"))?.flatten() {
            for l2 in fs::read_dir(l1.path())?.flatten() {
                for c in fs::read_dir(l2.path())?.flatten() {
                    let name = c.file_name().to_string_lossy().into_owned();
                    let Ok(bytes) = hex::decode(&name) else { continue };
                    let Ok(digest) = <[u8; 32]>::try_from(bytes.as_slice()) else { continue };
                    if marked.contains(&digest) {
                        continue;
                    }
                    let _sweeping = self.touch_or_sweep.lock().expect("touch lock");
                    let meta = c.metadata()?;
                    if meta.modified()? >= cutoff {
                        continue;
                    }
                    fs::remove_file(c.path())?;
                    removed += 1;
                    freed += meta.len();
                }
            }
        }
        Ok((removed, freed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_touched_after_reading_the_clock_is_never_older_than_it() {
        // The property garbage collection relies on. The agent's precise clock does not give it: a filesystem
        // stamps a coarser one that can lag it by milliseconds.
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(dir.path(), DEFAULT_CHUNK_SIZE, "test").unwrap();
        let plain = vec![3u8; 4096];
        let digest: [u8; 32] = Sha256::digest(&plain).into();
        let (tmp, _) = repo.stage_chunk(&plain, &digest).unwrap();
        repo.publish(&[(tmp, digest)]).unwrap();
        for _ in 0..200 {
            let now = repo.clock().unwrap();
            assert!(repo.touch_chunk(&digest).is_some());
            let touched = fs::metadata(repo.chunk_path(&digest)).unwrap().modified().unwrap();
            assert!(touched >= now, "touched at {touched:?}, before the clock's {now:?}");
        }
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "the clock leaves no file behind");
    }

    #[test]
    fn a_second_opener_is_refused_naming_the_holder_and_clears_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let first = Repository::open(dir.path(), DEFAULT_CHUNK_SIZE, "backup agent b1, process 7").unwrap();
        let plain = vec![5u8; 4096];
        let digest: [u8; 32] = Sha256::digest(&plain).into();
        let (staged, _) = first.stage_chunk(&plain, &digest).unwrap();

        let err = Repository::open(dir.path(), DEFAULT_CHUNK_SIZE, "backup agent b2").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ResourceBusy);
        assert!(err.to_string().contains("backup agent b1, process 7"), "{err}");
        assert!(staged.exists(), "the refused opener must not clear the holder's tmp/");

        drop(first);
        let second = Repository::open(dir.path(), DEFAULT_CHUNK_SIZE, "backup agent b2").unwrap();
        assert!(!staged.exists(), "the new holder clears what the old one left in tmp/");
        assert_eq!(fs::read_to_string(dir.path().join("lock")).unwrap(), "backup agent b2");
        drop(second);
    }

    #[test]
    fn index_round_trip_and_commit() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(dir.path(), DEFAULT_CHUNK_SIZE, "test").unwrap();
        let plain = vec![7u8; 4096];
        let digest: [u8; 32] = Sha256::digest(&plain).into();
        let (tmp, _) = repo.stage_chunk(&plain, &digest).unwrap();
        assert!(repo.touch_chunk(&digest).is_none(), "staged chunks are not visible");
        repo.publish(&[(tmp, digest)]).unwrap();
        assert!(repo.touch_chunk(&digest).is_some());
        assert_eq!(repo.read_chunk(&digest).unwrap(), plain);

        let index = Index { chunk_size: 4096, volume_size: 1 << 20, entries: [(3, digest)].into() };
        assert_eq!(Index::decode(&index.encode()).unwrap(), index);
        let mut m = Manifest {
            format: FORMAT,
            backup_id: "b1".into(),
            volume_id: "v".into(),
            parent_id: String::new(),
            started_at: String::new(),
            completed_at: String::new(),
            volume_size: 1 << 20,
            chunk_size: 4096,
            chunks: 1,
            logical_bytes: 4096,
            stored_bytes: 0,
            new_bytes: 0,
            index_sha256: String::new(),
            project: "p1".into(),
            key: Some(ManifestKey { wrapped: "00ff".into(), secret_uuid: "u".into(), header_bytes: 2 << 20 }),
            ..Default::default()
        };
        repo.commit_backup(&mut m, &index).unwrap();
        assert_eq!(repo.load_backup("b1").unwrap(), (m, index));
        // Referenced chunks survive GC; after the backup is deleted, an old enough chunk goes.
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        assert_eq!(repo.collect_garbage(later).unwrap().0, 0);
        assert!(!repo.was_deleted("b1"));
        repo.delete_backup("b1").unwrap();
        assert!(repo.was_deleted("b1") && !repo.was_deleted("b2"), "a deleted backup leaves a tombstone");
        assert!(repo.backups().unwrap().is_empty() && repo.load_backup("b1").is_err());
        assert_eq!(
            repo.collect_garbage(std::time::SystemTime::UNIX_EPOCH).unwrap().0,
            0,
            "newer than the cutoff: kept"
        );
        assert_eq!(repo.collect_garbage(later).unwrap().0, 1);
        assert!(repo.read_chunk(&digest).unwrap_err().contains("missing"));
        assert!(repo.was_deleted("b1"), "a young tombstone outlives a collection");
        repo.collect_garbage(later + TOMBSTONE_KEEP).unwrap();
        assert!(!repo.was_deleted("b1"), "an old one goes");
    }

    #[test]
    fn backups_committed_at_the_same_time_each_keep_their_own_index_and_manifest() {
        // Backups of different volumes finish together in one agent; each must publish what it wrote.
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(dir.path(), DEFAULT_CHUNK_SIZE, "test").unwrap();
        let ids: Vec<String> = (0..8).map(|i| format!("backup-{i}")).collect();
        std::thread::scope(|scope| {
            for (i, id) in ids.iter().enumerate() {
                let repo = &repo;
                scope.spawn(move || {
                    for round in 0..20u64 {
                        let entries = (0..=i as u64).map(|p| (p, [i as u8; 32])).collect();
                        let index = Index { chunk_size: 4096, volume_size: round << 20, entries };
                        let mut m = Manifest { backup_id: id.clone(), volume_size: round << 20, ..Default::default() };
                        repo.commit_backup(&mut m, &index).unwrap();
                    }
                });
            }
        });
        for (i, id) in ids.iter().enumerate() {
            let (m, index) = repo.load_backup(id).unwrap();
            assert_eq!((m.backup_id.as_str(), m.volume_size), (id.as_str(), 19 << 20));
            assert_eq!(index.entries.len(), i + 1, "{id} holds its own index");
        }
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
