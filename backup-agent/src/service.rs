//! The backup agent's gRPC service. Data flows between this agent and the storage agents directly: backups
//! read a volume's chunks (with digests, holes and zero chunks never sent, known chunks without data) and
//! restores write them back.

use crate::repo::{Index, Manifest, Repository, hex};
use ember_common::revocation::{AcceptedServer, revokes};
use ember_common::tls::TlsFiles;
use ember_proto::agent::v1::backup_agent_server::BackupAgent;
use ember_proto::agent::v1::storage_agent_client::StorageAgentClient;
use ember_proto::agent::v1::*;
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tonic::{Request, Response, Status};

/// The agent's state.
pub struct Backups {
    /// Repositories by name.
    pub repos: BTreeMap<String, Arc<Repository>>,
    /// Our certificate, for calling storage agents.
    pub tls: TlsFiles,
    /// How long a silent storage agent is given before its stream fails.
    pub peer_timeout: Duration,
    /// The backups running now, by id: their repository's root and their start by its clock
    /// ([`Repository::clock`]); garbage collection there must not outrun them.
    pub running: Mutex<HashMap<String, (PathBuf, SystemTime)>>,
    /// Chunks processed at once (compression, decompression).
    pub workers: usize,
    /// Unreferenced chunks younger than this survive garbage collection.
    pub gc_grace: Duration,
    /// Progress of the backups and restores running now, by backup id (a backup is restored by one restore at
    /// a time: the coordinator holds it in `restoring`).
    pub progress: Mutex<HashMap<String, Progress>>,
    /// Backups asked to stop (their delete waits for them).
    pub stops: crate::stops::Stops,
    /// The volumes a restore is writing now. The coordinator asks again for a restore whose call was cut short;
    /// while the first is still ending here (its caller's connection lost, not its own), the second is refused,
    /// so that no volume ever has two writers.
    pub restoring: Mutex<HashSet<String>>,
}

/// How far a backup or a restore has come: bytes of the volume done (by offset) out of its size, and bytes of
/// data moved.
#[derive(Clone)]
pub struct Progress {
    done: Arc<AtomicU64>,
    total: u64,
    data: Arc<AtomicU64>,
}

/// Deregisters a running backup when dropped.
struct Running<'a>(&'a Backups, String);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.lock().expect("running").remove(&self.1);
        self.0.stops.ended();
    }
}

/// Withdraws a progress report when dropped.
pub(crate) struct Tracked<'a>(&'a Backups, String);

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        self.0.progress.lock().expect("progress").remove(&self.1);
    }
}

pub(crate) fn check_id(field: &str, id: &str) -> Result<(), Status> {
    match ember_common::identity::canonical_uuid(id) {
        Some(_) => Ok(()),
        None => Err(Status::invalid_argument(format!("{field}: {id:?} is not a lowercase UUID"))),
    }
}

pub(crate) fn io_status(context: &str) -> impl Fn(std::io::Error) -> Status + '_ {
    move |e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Status::not_found(format!("{context}: {e}"))
        } else {
            Status::internal(format!("{context}: {e}"))
        }
    }
}

/// Runs `f`, which works on a repository's files, on a blocking thread. On an NFS repository any file call
/// can wait for the server, up to the soft mount's timeout; the runtime's few threads must stay free meanwhile
/// for the other requests (progress, other backups and restores).
pub(crate) async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(e.to_string()))
}

/// [`Repository::load_backup`], off the runtime.
pub(crate) async fn load_backup(
    repo: &Arc<Repository>,
    id: &str,
) -> Result<std::io::Result<(Manifest, Index)>, Status> {
    let (repo, id) = (repo.clone(), id.to_string());
    off_runtime(move || repo.load_backup(&id)).await
}

/// [`Repository::clock`], off the runtime.
async fn repository_clock(repo: &Arc<Repository>) -> Result<SystemTime, Status> {
    let r = repo.clone();
    off_runtime(move || r.clock()).await?.map_err(io_status("reading the repository's clock"))
}

/// Chunks a backup touches in one blocking call when the storage agent sent them without data.
const TOUCH_BATCH: usize = 256;

/// Touches `digests`, chunks the storage agent sent without data because the repository has them, and records
/// their stored sizes in `sizes`. One that is gone (collected since the parent backup was deleted) fails the
/// backup: it must not be referenced.
async fn touch_known(
    repo: &Arc<Repository>,
    digests: Vec<[u8; 32]>,
    sizes: &mut HashMap<[u8; 32], u64>,
) -> Result<(), Status> {
    let r = repo.clone();
    let touched = off_runtime(move || digests.into_iter().map(|d| (d, r.touch_chunk(&d))).collect::<Vec<_>>()).await?;
    for (d, len) in touched {
        let len =
            len.ok_or_else(|| Status::data_loss(format!("chunk {} is neither sent nor in the repository", hex(&d))))?;
        sizes.insert(d, len);
    }
    Ok(())
}

/// What staging one new chunk came to: its temporary file, its stored size, its digest.
type StoreResult = Result<std::io::Result<(PathBuf, u64, [u8; 32])>, tokio::task::JoinError>;

/// Counts one chunk's [`StoreResult`] into a backup's stored sizes, its staged files and its new bytes.
fn count_stored(
    result: StoreResult,
    sizes: &mut HashMap<[u8; 32], u64>,
    staged: &mut Vec<(PathBuf, [u8; 32])>,
    new_bytes: &mut u64,
) -> Result<(), Status> {
    let (path, n, d) = result.map_err(|e| Status::internal(e.to_string()))?.map_err(io_status("writing a chunk"))?;
    sizes.insert(d, n);
    *new_bytes += n;
    staged.push((path, d));
    Ok(())
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

impl Backups {
    /// Reports the progress of backup `id`'s backup or restore over `total` bytes until the guard drops:
    /// through the counters returned, of the volume's bytes done (by offset) and of data bytes moved.
    pub(crate) fn track(&self, id: &str, total: u64) -> (Tracked<'_>, Arc<AtomicU64>, Arc<AtomicU64>) {
        let (done, data) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let progress = Progress { done: done.clone(), total, data: data.clone() };
        self.progress.lock().expect("progress").insert(id.to_string(), progress);
        (Tracked(self, id.to_string()), done, data)
    }

    pub(crate) fn repo(&self, name: &str) -> Result<Arc<Repository>, Status> {
        self.repos.get(name).cloned().ok_or_else(|| Status::not_found(format!("repository {name:?}")))
    }

    /// A client of the storage agent serving `source`, and where that agent's certificate is noted when the
    /// client connects: a backup stops taking data from, and a restore stops sending a volume's data to, a node
    /// whose certificate is revoked meanwhile.
    pub(crate) fn storage_noting_server(
        &self,
        source: &VolumeSource,
    ) -> Result<(StorageAgentClient<ember_common::access_log::Traced>, AcceptedServer), Status> {
        if !source.storage_endpoint.starts_with("https://") {
            return Err(Status::invalid_argument("source.storage_endpoint: must be an https:// URL"));
        }
        let (channel, accepted) = self
            .tls
            .channel_noting_server(&source.storage_endpoint, self.peer_timeout)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let client =
            StorageAgentClient::new(ember_common::access_log::traced(channel)).max_decoding_message_size(128 << 20);
        Ok((client, accepted))
    }

    /// Lists backup `id` as running in `repo` from now, by the repository's clock, until the guard drops. The
    /// chunks a running backup (or Cinder import) stages and reuses are referenced by no index until it
    /// commits, and garbage collection keeps them only back to the oldest running start; a delete of it waits
    /// for it to end. Refuses a backup being deleted or deleted already: its call was on its way while the
    /// delete ran, and would otherwise publish a backup nobody knows.
    async fn start_running(&self, repo: &Arc<Repository>, id: &str) -> Result<Running<'_>, Status> {
        off_runtime(|| failpoint("backup.create_arrived")).await?;
        let started_here = repository_clock(repo).await?;
        {
            let mut running = self.running.lock().expect("running");
            if running.contains_key(id) {
                return Err(Status::unavailable(format!("backup {id} is already running here")));
            }
            running.insert(id.to_string(), (repo.root.clone(), started_here));
        }
        let running = Running(self, id.to_string());
        // Checked once listed: a delete that begins from now on waits for this backup, which sees its stop.
        if self.stops.asked(id) {
            return Err(Status::cancelled("stopped: the backup is being deleted"));
        }
        let r = repo.clone();
        let id_owned = id.to_string();
        if off_runtime(move || r.was_deleted(&id_owned)).await? {
            tracing::warn!(backup_id = %id, "refused: the backup was deleted before this call to make it arrived");
            return Err(Status::cancelled("stopped: the backup was deleted"));
        }
        Ok(running)
    }

    async fn backup(&self, req: CreateBackupRequest) -> Result<CreateBackupResponse, Status> {
        check_id("backup_id", &req.backup_id)?;
        let repo = self.repo(&req.repository)?;
        let source = req.source.ok_or_else(|| Status::invalid_argument("source: is required"))?;
        check_id("source.id", &source.id)?;
        if let Ok((m, _)) = load_backup(&repo, &req.backup_id).await? {
            return Ok(response_of(&m)); // already complete: a repeated call after a crash
        }
        let started = SystemTime::now();
        let _running = self.start_running(&repo, &req.backup_id).await?;

        let parent = if req.parent_id.is_empty() {
            None
        } else {
            check_id("parent_id", &req.parent_id)?;
            Some(load_backup(&repo, &req.parent_id).await?.map_err(io_status("parent backup"))?.1)
        };
        let mut known: Vec<u8> = Vec::new();
        if let Some(p) = &parent {
            let unique: HashSet<&[u8; 32]> = p.entries.values().collect();
            unique.into_iter().for_each(|d| known.extend_from_slice(d));
        }
        let (mut client, storage_node) = self.storage_noting_server(&source)?;
        let mut stream = client
            .read_volume(ReadVolumeRequest {
                id: source.id.clone(),
                backend: source.backend.clone(),
                snapshot: source.snapshot,
                chunk_size: repo.chunk_size,
                known_digests: known,
            })
            .await
            .map_err(|s| storage_lost(&source.storage_endpoint, "backup", s))?
            .into_inner();
        let lost = |s| storage_lost(&source.storage_endpoint, "backup", s);
        let header =
            stream.message().await.map_err(lost)?.ok_or_else(|| Status::data_loss("storage agent sent no data"))?;
        let volume_size = header.volume_size;
        let (_tracked, done, moved) = self.track(&req.backup_id, volume_size);

        let mut index = Index { chunk_size: repo.chunk_size, volume_size, entries: BTreeMap::new() };
        let mut logical = 0u64;
        let mut sizes: HashMap<[u8; 32], u64> = HashMap::new();
        let mut staging = futures::stream::FuturesUnordered::new();
        let mut staged: Vec<(PathBuf, [u8; 32])> = Vec::new();
        let mut untouched: Vec<[u8; 32]> = Vec::new();
        let mut new_bytes = 0u64;
        let result: Result<(), Status> = async {
            while let Some(msg) = stream.message().await.map_err(lost)? {
                if self.stops.asked(&req.backup_id) {
                    return Err(Status::cancelled("stopped: the backup was deleted while it was being made"));
                }
                refuse_if_revoked(&storage_node)?;
                let digest: [u8; 32] =
                    msg.sha256.as_slice().try_into().map_err(|_| Status::data_loss("chunk without a sha256"))?;
                index.entries.insert(msg.offset / u64::from(repo.chunk_size), digest);
                logical += u64::from(msg.length);
                done.store(msg.offset + u64::from(msg.length), Ordering::Relaxed);
                moved.store(logical, Ordering::Relaxed);
                if sizes.insert(digest, 0).is_some() {
                    continue; // already counted in this backup
                }
                if msg.data.is_empty() {
                    // Sent without data as one the repository has: touched (and so kept from GC) in batches.
                    untouched.push(digest);
                    if untouched.len() >= TOUCH_BATCH {
                        touch_known(&repo, std::mem::take(&mut untouched), &mut sizes).await?;
                    }
                    continue;
                }
                // New to the storage agent, but the repository may have it from another volume: touched if so
                // (before anything else happens, so a garbage collection that starts now keeps it), stored if not.
                let r = repo.clone();
                if let Some(n) = off_runtime(move || r.touch_chunk(&digest)).await? {
                    sizes.insert(digest, n);
                    continue;
                }
                off_runtime(|| failpoint("backup.stage_chunk")).await?;
                let r = repo.clone();
                staging.push(tokio::task::spawn_blocking(move || {
                    r.stage_chunk(&msg.data, &digest).map(|(p, n)| (p, n, digest))
                }));
                // Bounded: at most `workers` chunks in memory and in flight.
                while staging.len() >= self.workers {
                    let next = staging.next().await.expect("non-empty");
                    count_stored(next, &mut sizes, &mut staged, &mut new_bytes)?;
                }
            }
            touch_known(&repo, untouched, &mut sizes).await?;
            while let Some(next) = staging.next().await {
                count_stored(next, &mut sizes, &mut staged, &mut new_bytes)?;
            }
            // Asked to stop after the last chunk: nothing is published (a stop asked later still finds the
            // backup's files, as its delete waits for this to end).
            if self.stops.asked(&req.backup_id) {
                return Err(Status::cancelled("stopped: the backup was deleted while it was being made"));
            }
            refuse_if_revoked(&storage_node)
        }
        .await;
        if let Err(e) = result {
            while let Some(next) = staging.next().await {
                if let Ok(Ok((path, _, d))) = next {
                    staged.push((path, d));
                }
            }
            off_runtime(move || staged.iter().for_each(|(path, _)| drop(std::fs::remove_file(path)))).await?;
            tracing::warn!(backup_id = %req.backup_id, "backup failed: {}", e.message());
            return Err(e);
        }
        let r = repo.clone();
        let staged_count = staged.len();
        off_runtime(move || r.publish(&staged)).await?.map_err(io_status("publishing chunks"))?;
        let mut manifest = Manifest {
            format: crate::repo::FORMAT,
            backup_id: req.backup_id.clone(),
            // The source may be a temporary snapshot of the volume (a forced backup of an in-use volume).
            volume_id: if req.volume_id.is_empty() { source.id.clone() } else { req.volume_id.clone() },
            parent_id: req.parent_id.clone(),
            started_at: time::OffsetDateTime::from(started)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            completed_at: now_rfc3339(),
            volume_size,
            chunk_size: repo.chunk_size,
            chunks: index.entries.len() as u64,
            logical_bytes: logical,
            stored_bytes: sizes.values().sum(),
            new_bytes,
            index_sha256: String::new(),
            project: req.project.clone(),
            name: req.name.clone(),
            description: req.description.clone(),
            snapshot_id: req.snapshot_id.clone(),
            data_timestamp: req.data_timestamp.clone(),
            key: req.key.as_ref().map(crate::repo::ManifestKey::from_proto),
        };
        let manifest = off_runtime(move || repo.commit_backup(&mut manifest, &index).map(|()| manifest))
            .await?
            .map_err(io_status("writing the index"))?;
        tracing::info!(backup_id = %req.backup_id, chunks = manifest.chunks, new_chunks = staged_count, new_bytes, "backup complete");
        let mut resp = response_of(&manifest);
        resp.chunks_transferred = staged_count as u64;
        Ok(resp)
    }
}

/// Fails a backup reading from a storage node whose certificate was revoked since the backup connected to it:
/// nothing more from that node is taken, and nothing it sent is kept (the backup's staged chunks are removed
/// and nothing is published).
fn refuse_if_revoked(storage_node: &AcceptedServer) -> Result<(), Status> {
    if revokes(storage_node) {
        return Err(Status::unauthenticated("the storage agent's certificate was revoked during the backup"));
    }
    Ok(())
}

/// Test-only fault injection. `EMBER_FAILPOINTS=backup.stage_chunk` aborts the agent (like SIGKILL) when it
/// is about to stage its second new chunk (`backup.restore_chunk`: when a restore reads its second chunk);
/// `backup.pause_stage_chunk` holds the first backup there instead (`backup.pause_import`: the first Cinder
/// import, before it reads anything; `backup.pause_import_commit`: its chunks published, its index not yet
/// written), logging "failpoint pause", so a test can
/// act while a backup is running: for five seconds, or, with `EMBER_FAILPOINT_RELEASE=<path>`, until that file
/// exists (at most two minutes).
pub(crate) fn failpoint(name: &str) {
    static SEEN: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);
    let armed = std::env::var("EMBER_FAILPOINTS").unwrap_or_default();
    if armed.is_empty() {
        return;
    }
    let armed: Vec<&str> = armed.split(',').map(str::trim).collect();
    let n = {
        let mut seen = SEEN.lock().expect("failpoints");
        let count = seen.get_or_insert_with(HashMap::new).entry(name.to_string()).or_insert(0);
        *count += 1;
        *count - 1
    };
    if armed.contains(&name) && n == 1 {
        tracing::error!(failpoint = name, "failpoint hit: aborting");
        std::process::abort();
    }
    let pause = format!("backup.pause_{}", name.trim_start_matches("backup."));
    if armed.contains(&pause.as_str()) && n == 0 {
        tracing::warn!(failpoint = %pause, "failpoint pause");
        match std::env::var_os("EMBER_FAILPOINT_RELEASE").map(PathBuf::from) {
            Some(release) => {
                let deadline = std::time::Instant::now() + Duration::from_secs(120);
                while !release.exists() && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            None => std::thread::sleep(Duration::from_secs(5)),
        }
    }
}

fn response_of(m: &Manifest) -> CreateBackupResponse {
    CreateBackupResponse {
        stored_bytes: m.stored_bytes,
        new_bytes: m.new_bytes,
        logical_bytes: m.logical_bytes,
        chunks: m.chunks,
        chunks_transferred: 0,
        volume_size: m.volume_size,
        volume_id: m.volume_id.clone(),
    }
}

/// What a coordinator needs to adopt the backup that manifest `m` describes.
fn stored_backup(m: Manifest) -> StoredBackup {
    StoredBackup {
        backup_id: m.backup_id,
        volume_id: m.volume_id,
        parent_id: m.parent_id,
        project: m.project,
        name: m.name,
        description: m.description,
        started_at: m.started_at,
        volume_size: m.volume_size,
        stored_bytes: m.stored_bytes,
        new_bytes: m.new_bytes,
        logical_bytes: m.logical_bytes,
        snapshot_id: m.snapshot_id,
        data_timestamp: m.data_timestamp,
        key: m.key.as_ref().and_then(crate::repo::ManifestKey::to_proto),
    }
}

/// Cuts a volume image into the repository's chunks and commits it as the backup `described` names (its id,
/// volume, start time and owner; the rest is filled in here). Stops, removing what it staged and publishing
/// nothing, when `stop` says so. Blocking.
fn store_image(
    repo: &Repository,
    image: &std::path::Path,
    described: Manifest,
    stop: &dyn Fn() -> bool,
) -> std::io::Result<Manifest> {
    let mut staged = Vec::new();
    let stored = stage_image(repo, image, described, stop, &mut staged);
    if stored.is_err() {
        for (path, _) in &staged {
            let _ = std::fs::remove_file(path);
        }
    }
    stored
}

/// [`store_image`]'s work; `staged` collects the chunks it stages and has not yet published.
fn stage_image(
    repo: &Repository,
    image: &std::path::Path,
    described: Manifest,
    stop: &dyn Fn() -> bool,
    staged: &mut Vec<(PathBuf, [u8; 32])>,
) -> std::io::Result<Manifest> {
    use sha2::Digest;
    use std::os::unix::fs::FileExt;
    let stopped = || std::io::Error::other(crate::cinder::STOPPED);
    let file = std::fs::File::open(image)?;
    let size = file.metadata()?.len();
    let cs = u64::from(repo.chunk_size);
    let mut index = Index { chunk_size: repo.chunk_size, volume_size: size, entries: BTreeMap::new() };
    let (mut logical, mut new_bytes) = (0u64, 0u64);
    let mut sizes: HashMap<[u8; 32], u64> = HashMap::new();
    for pos in 0..size.div_ceil(cs) {
        if stop() {
            return Err(stopped());
        }
        let len = cs.min(size - pos * cs) as usize;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, pos * cs)?;
        if buf.iter().all(|b| *b == 0) {
            continue;
        }
        let digest: [u8; 32] = sha2::Sha256::digest(&buf).into();
        index.entries.insert(pos, digest);
        logical += len as u64;
        if sizes.contains_key(&digest) {
            continue;
        }
        let stored = match repo.touch_chunk(&digest) {
            Some(n) => n,
            None => {
                let (path, n) = repo.stage_chunk(&buf, &digest)?;
                staged.push((path, digest));
                new_bytes += n;
                n
            }
        };
        sizes.insert(digest, stored);
    }
    if stop() {
        return Err(stopped());
    }
    repo.publish(staged)?;
    staged.clear();
    failpoint("backup.import_commit");
    if stop() {
        return Err(stopped());
    }
    let mut manifest = Manifest {
        format: crate::repo::FORMAT,
        completed_at: now_rfc3339(),
        volume_size: size,
        chunk_size: repo.chunk_size,
        chunks: index.entries.len() as u64,
        logical_bytes: logical,
        stored_bytes: sizes.values().sum(),
        new_bytes,
        ..described
    };
    repo.commit_backup(&mut manifest, &index)?;
    Ok(manifest)
}

/// The gRPC face of [`Backups`].
pub struct BackupService(pub Arc<Backups>);

#[tonic::async_trait]
impl BackupAgent for BackupService {
    async fn create_backup(&self, req: Request<CreateBackupRequest>) -> Result<Response<CreateBackupResponse>, Status> {
        let id = req.get_ref().backup_id.clone();
        let span = tracing::info_span!("create_backup", backup_id = %id);
        Ok(Response::new(tracing::Instrument::instrument(self.0.backup(req.into_inner()), span).await?))
    }

    async fn restore_backup(
        &self,
        req: Request<RestoreBackupRequest>,
    ) -> Result<Response<RestoreBackupResponse>, Status> {
        let span = tracing::info_span!("restore_backup", backup_id = %req.get_ref().backup_id);
        Ok(Response::new(tracing::Instrument::instrument(self.0.restore(req.into_inner()), span).await?))
    }

    async fn delete_backup(&self, req: Request<DeleteBackupRequest>) -> Result<Response<DeleteBackupResponse>, Status> {
        let r = req.into_inner();
        check_id("backup_id", &r.backup_id)?;
        let (repo, id) = (self.0.repo(&r.repository)?, r.backup_id.clone());
        // A backup still being made here is stopped first: it could otherwise publish after the delete.
        self.0.stops.ask(&id);
        let running = |id: &str| self.0.running.lock().expect("running").contains_key(id);
        self.0.stops.wait_until_ended(&id, running).await;
        off_runtime(move || repo.delete_backup(&id)).await?.map_err(io_status("deleting"))?;
        self.0.stops.forget(&r.backup_id);
        tracing::info!(backup_id = %r.backup_id, "backup deleted");
        Ok(Response::new(DeleteBackupResponse {}))
    }

    async fn describe_backup(
        &self,
        req: Request<DescribeBackupRequest>,
    ) -> Result<Response<DescribeBackupResponse>, Status> {
        let r = req.into_inner();
        check_id("backup_id", &r.backup_id)?;
        let repo = self.0.repo(&r.repository)?;
        let id = r.backup_id.clone();
        match off_runtime(move || repo.describe_backup(&id, &r.name, &r.description)).await? {
            Ok(()) => Ok(Response::new(DescribeBackupResponse {})),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Status::not_found(format!("backup {} is not complete here", r.backup_id)))
            }
            Err(e) => Err(io_status("describing")(e)),
        }
    }

    async fn verify_backup(&self, req: Request<VerifyBackupRequest>) -> Result<Response<VerifyBackupResponse>, Status> {
        Ok(Response::new(self.0.verify(req.into_inner()).await?))
    }

    async fn verify_repository(
        &self,
        req: Request<VerifyRepositoryRequest>,
    ) -> Result<Response<VerifyRepositoryResponse>, Status> {
        Ok(Response::new(self.0.verify_repository(&req.get_ref().repository).await?))
    }

    async fn import_cinder_backup(
        &self,
        req: Request<ImportCinderBackupRequest>,
    ) -> Result<Response<CreateBackupResponse>, Status> {
        let r = req.into_inner();
        check_id("backup_id", &r.backup_id)?;
        let repo = self.0.repo(&r.repository)?;
        if let Ok((m, _)) = load_backup(&repo, &r.backup_id).await? {
            return Ok(Response::new(response_of(&m)));
        }
        // Listed as running from its start, as a backup is (see `start_running`).
        let _running = self.0.start_running(&repo, &r.backup_id).await?;
        let image = repo.root.join("tmp").join(format!("import-{}.img", r.backup_id));
        let (dir, cinder_id) = (PathBuf::from(&r.directory), r.cinder_backup_id.clone());
        let owner = Manifest {
            backup_id: r.backup_id.clone(),
            started_at: now_rfc3339(),
            project: r.project.clone(),
            name: r.name.clone(),
            ..Default::default()
        };
        // A delete (with force) asks it to stop; it checks between objects, blocks and chunks, and publishes
        // nothing once asked.
        let (backups, id) = (self.0.clone(), r.backup_id.clone());
        let result = off_runtime(move || -> Result<Manifest, Status> {
            let stop = || backups.stops.asked(&id);
            failpoint("backup.import");
            let rebuilt = crate::cinder::rebuild(&dir, &cinder_id, &image, &stop);
            let stored = rebuilt.map_err(Status::failed_precondition).and_then(|(volume_id, _)| {
                let described = Manifest { volume_id, ..owner };
                store_image(&repo, &image, described, &stop).map_err(io_status("storing the import"))
            });
            let _ = std::fs::remove_file(&image);
            match stored {
                Err(_) if stop() => {
                    Err(Status::cancelled("stopped: the backup was deleted while it was being imported"))
                }
                other => other,
            }
        })
        .await?
        .inspect_err(|e| tracing::warn!(backup_id = %r.backup_id, error = %e.message(), "Cinder import failed"))?;
        tracing::info!(backup_id = %r.backup_id, cinder_backup_id = %r.cinder_backup_id, chunks = result.chunks, "Cinder backup imported");
        Ok(Response::new(response_of(&result)))
    }

    async fn list_stored_backups(
        &self,
        req: Request<ListStoredBackupsRequest>,
    ) -> Result<Response<ListStoredBackupsResponse>, Status> {
        let repo = self.0.repo(&req.get_ref().repository)?;
        let listed = off_runtime(move || -> std::io::Result<ListStoredBackupsResponse> {
            let mut out = ListStoredBackupsResponse::default();
            for id in repo.backups()? {
                match repo.load_backup(&id) {
                    // Restores find a backup by its directory: one whose manifest names another id (a copied
                    // directory) cannot be adopted under either.
                    Ok((m, _)) if m.backup_id != id => {
                        out.unreadable.push(format!("{id}: its manifest names backup {:?}", m.backup_id))
                    }
                    // Adopted without its key, an encrypted backup would restore as ciphertext nothing opens.
                    Ok((m, _)) if m.key.as_ref().is_some_and(|k| k.to_proto().is_none()) => {
                        out.unreadable.push(format!("{id}: its manifest's sealed key is damaged (not hex)"))
                    }
                    Ok((m, _)) => out.backups.push(stored_backup(m)),
                    Err(e) => out.unreadable.push(format!("{id}: {e}")),
                }
            }
            Ok(out)
        })
        .await?
        .map_err(io_status("listing backups"))?;
        tracing::info!(backups = listed.backups.len(), unreadable = listed.unreadable.len(), "stored backups listed");
        Ok(Response::new(listed))
    }

    async fn get_progress(&self, req: Request<GetProgressRequest>) -> Result<Response<GetProgressResponse>, Status> {
        let id = &req.get_ref().backup_id;
        let p = self.0.progress.lock().expect("progress").get(id).cloned();
        Ok(Response::new(match p {
            Some(p) => GetProgressResponse {
                bytes_done: p.done.load(Ordering::Relaxed),
                bytes_total: p.total,
                running: true,
                data_bytes: p.data.load(Ordering::Relaxed),
            },
            None => GetProgressResponse::default(),
        }))
    }

    async fn collect_garbage(
        &self,
        req: Request<CollectGarbageRequest>,
    ) -> Result<Response<CollectGarbageResponse>, Status> {
        let repo = self.0.repo(&req.get_ref().repository)?;
        let now = repository_clock(&repo).await?;
        let oldest = {
            let running = self.0.running.lock().expect("running");
            running.values().filter(|(root, _)| *root == repo.root).map(|(_, start)| *start).min()
        };
        // Keep anything touched since the collection (or the oldest backup running there) began, less the grace.
        let cutoff = oldest.unwrap_or(now).min(now) - self.0.gc_grace;
        let (removed, freed) =
            off_runtime(move || repo.collect_garbage(cutoff)).await?.map_err(io_status("garbage collection"))?;
        tracing::info!(removed, freed, "garbage collected");
        Ok(Response::new(CollectGarbageResponse { chunks_removed: removed, bytes_freed: freed }))
    }
}

/// What the coordinator hears of a call to the storage agent at `endpoint`, made for a `work` (backup or
/// restore), that ended in `status`. One cut short (the agent died mid-way, or the link broke) or refused (it
/// restarts) is UNAVAILABLE, which the coordinator waits out and asks again, for the whole work: a backup
/// publishes nothing until it ends, and the storage agent keeps a volume marked incomplete until a restore into it
/// ends whole. What the storage agent answered itself is passed on as it is.
pub(crate) fn storage_lost(endpoint: &str, work: &str, status: Status) -> Status {
    if ember_common::agent::cut_short(&status) {
        Status::unavailable(format!("the storage agent at {endpoint} went away mid-{work}: {}", status.message()))
    } else if status.code() == tonic::Code::Unavailable {
        Status::unavailable(format!("the storage agent at {endpoint}: {}", status.message()))
    } else {
        status
    }
}
