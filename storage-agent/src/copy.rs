//! Writing streamed chunks into a volume: a restore's WriteVolume, and a migration's CopyVolumeFrom, which
//! reads the volume of the same id from another storage agent and makes this one read exactly as it does.

use crate::backend::Backend;
use crate::data;
use crate::error::{AgentError, Result};
use crate::file_backend::{Kind, checked_id};
use ember_common::tls::TlsFiles;
use ember_proto::agent::v1::storage_agent_client::StorageAgentClient;
use ember_proto::agent::v1::{CopyVolumeFromRequest, CopyVolumeProgress, ReadVolumeRequest, VolumeChunk};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Chunk size of a migration's read: large enough to keep the stream busy, small enough to bound memory.
const COPY_CHUNK_BYTES: u32 = 4 << 20;

/// How often a copy reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// How this agent reaches other storage agents (a migration's source): its own certificate, and how long a
/// silent peer is given; and how fast it may copy from them.
#[derive(Clone)]
pub struct Peers {
    /// This agent's TLS material.
    pub tls: TlsFiles,
    /// See [`TlsFiles::channel_with`].
    pub timeout: Duration,
    /// The most data bytes per second a copy writes here (`copy_bandwidth_mib`); 0 for no limit.
    pub bandwidth: u64,
}

/// How long a copy that has written `bytes` since `started` waits to stay within `bandwidth` bytes per second.
fn throttle_delay(bytes: u64, bandwidth: u64, elapsed: Duration) -> Duration {
    if bandwidth == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(bytes as f64 / bandwidth as f64).saturating_sub(elapsed)
}

/// A volume open for writing chunks: a writer thread applies them from a small bounded queue while the next
/// ones arrive, then flushes the file once at the end. The queue is awaited, never blocked on, so a slow disk
/// holds up its stream only, not a runtime thread that other requests need.
///
/// The volume is marked incomplete before the first write, and the mark is cleared only by
/// [`ChunkWriter::finish`] of a write its caller vouches is whole, after the flush: a restore or a copy cut
/// short at any point leaves the mark, and `manage` refuses the partial data.
pub struct ChunkWriter {
    queue: mpsc::Sender<VolumeChunk>,
    writer: JoinHandle<Result<u64>>,
    id: uuid::Uuid,
    /// The volume's size in bytes.
    pub size: u64,
}

impl ChunkWriter {
    /// Opens volume `id` of `backend`, refusing it when it holds fewer than `needed` bytes, and marks it
    /// incomplete.
    pub async fn open(backend: &Backend, id: uuid::Uuid, needed: u64) -> Result<ChunkWriter> {
        let path = backend.path(Kind::Volume, &id);
        // Opened off the async threads: on an NFS mount whose server has gone, an open blocks until the soft
        // mount gives up.
        let (file, size) = tokio::task::spawn_blocking(move || {
            let file = ember_common::direct_io::DirectFile::open(&path, true)
                .map_err(|_| AgentError::NotFound(format!("volume {id}")))?;
            let size = crate::sparse::byte_len(file.file()).map_err(AgentError::io("reading size"))?;
            Ok::<_, AgentError>((file, size))
        })
        .await
        .map_err(|e| AgentError::Io { context: "opening the volume".into(), source: std::io::Error::other(e) })??;
        if needed > size {
            return Err(AgentError::FailedPrecondition(format!("volume {id} holds {size} bytes; {needed} needed")));
        }
        // Which blocks of a thin LV are mapped, before anything is written: zero runs are cleared only there.
        let mapped = backend.data_map(Kind::Volume, &id).await?;
        backend.mark_incomplete(&id, true).await?;
        let (queue, chunks) = mpsc::channel::<VolumeChunk>(8);
        let writer = tokio::task::spawn_blocking(move || {
            let written = data::apply_chunks(&file, size, mapped.as_ref(), chunks)?;
            file.sync_data().map_err(AgentError::io("syncing"))?;
            Ok::<u64, AgentError>(written)
        });
        Ok(ChunkWriter { queue, writer, id, size })
    }

    /// Queues `chunk`; false when the writer has stopped (on an error, which [`ChunkWriter::finish`] returns).
    pub async fn send(&self, chunk: VolumeChunk) -> bool {
        self.queue.send(chunk).await.is_ok()
    }

    /// Waits for every queued chunk to be written and flushed; returns the data bytes written. Clears the
    /// incomplete mark on `backend` (the one it was opened on) when the caller received the `whole` stream and
    /// everything was written.
    pub async fn finish(self, backend: &Backend, whole: bool) -> Result<u64> {
        drop(self.queue);
        let written = self
            .writer
            .await
            .map_err(|e| AgentError::Io { context: "writing".into(), source: std::io::Error::other(e) })??;
        if whole {
            backend.mark_incomplete(&self.id, false).await?;
        } else {
            tracing::warn!(volume_id = %self.id, written, "write stream cut short; the volume stays marked incomplete");
        }
        Ok(written)
    }
}

/// The chunk that makes `[from, to)` zero, if that range is not empty.
fn zeros(from: u64, to: u64) -> Option<VolumeChunk> {
    (to > from).then(|| VolumeChunk { offset: from, zero_length: to - from, ..Default::default() })
}

/// Fills volume `req.volume_id` of `backend` from the volume of that id on the storage agent `req.source_endpoint`,
/// telling `progress` about once a second how far it is. Returns the data bytes written.
pub async fn copy_from(
    backend: &Backend,
    peers: &Peers,
    req: CopyVolumeFromRequest,
    progress: impl Fn(CopyVolumeProgress),
) -> Result<u64> {
    let id = checked_id("volume_id", &req.volume_id)?;
    if !req.source_endpoint.starts_with("https://") {
        return Err(AgentError::InvalidArgument {
            field: "source_endpoint",
            message: "must be an https:// URL".into(),
        });
    }
    let channel = peers
        .tls
        .channel_with(&req.source_endpoint, peers.timeout)
        .map_err(|e| AgentError::Peer(tonic::Status::unavailable(format!("{}: {e}", req.source_endpoint))))?;
    let mut source = StorageAgentClient::new(ember_common::access_log::traced(channel))
        .max_decoding_message_size(2 * COPY_CHUNK_BYTES as usize);
    let read = ReadVolumeRequest {
        id: req.volume_id.clone(),
        backend: req.source_backend.clone(),
        snapshot: false,
        chunk_size: COPY_CHUNK_BYTES,
        known_digests: Vec::new(),
    };
    let mut stream = source.read_volume(read).await.map_err(AgentError::Peer)?.into_inner();
    let head = stream.message().await.map_err(AgentError::Peer)?;
    let source_size = head.map(|h| h.volume_size).unwrap_or(0);
    let writer = ChunkWriter::open(backend, id, source_size).await?;
    // The source leaves out zero chunks (and holes): whatever lies between the chunks it sends is made zero, so
    // the destination's earlier contents (a thick LV's old blocks, a repeated copy) never show through.
    let mut end = 0;
    let mut received = Ok(());
    let (started, mut reported, mut sent_bytes) = (Instant::now(), Instant::now(), 0u64);
    loop {
        let chunk = match stream.message().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => {
                received = Err(AgentError::Peer(e));
                break;
            }
        };
        let (offset, len) = (chunk.offset, chunk.data.len() as u64);
        if len == 0 || offset < end {
            received = Err(AgentError::Io {
                context: format!("reading from {}", req.source_endpoint),
                source: std::io::Error::other(format!("chunk at {offset} is empty or out of order")),
            });
            break;
        }
        let data = VolumeChunk { offset, data: chunk.data, ..Default::default() };
        let sent = match zeros(end, offset) {
            Some(gap) => writer.send(gap).await && writer.send(data).await,
            None => writer.send(data).await,
        };
        if !sent {
            break; // the writer stopped on an error; finish reports it
        }
        end = offset + len;
        sent_bytes += len;
        tokio::time::sleep(throttle_delay(sent_bytes, peers.bandwidth, started.elapsed())).await;
        if reported.elapsed() >= PROGRESS_EVERY {
            reported = Instant::now();
            let size_bytes = writer.size;
            progress(CopyVolumeProgress { position_bytes: end, size_bytes, bytes_written: sent_bytes, done: false });
        }
    }
    if received.is_ok()
        && let Some(tail) = zeros(end, writer.size)
    {
        writer.send(tail).await;
    }
    // The source ended its stream itself: the copy is whole.
    let written = writer.finish(backend, received.is_ok()).await?;
    received?;
    tracing::info!(volume_id = %id, written, source = %req.source_endpoint, "volume copied from its source");
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::{throttle_delay, zeros};
    use std::time::Duration;

    #[test]
    fn a_copy_waits_only_when_ahead_of_its_bandwidth() {
        let mib = 1 << 20;
        assert_eq!(throttle_delay(64 * mib, 0, Duration::ZERO), Duration::ZERO, "no limit");
        assert_eq!(throttle_delay(32 * mib, 16 * mib, Duration::from_millis(500)), Duration::from_millis(1500));
        assert_eq!(throttle_delay(32 * mib, 16 * mib, Duration::from_secs(3)), Duration::ZERO, "behind: no wait");
    }

    #[test]
    fn only_a_real_gap_becomes_a_zero_chunk() {
        let gap = zeros(4 << 20, 12 << 20).expect("a gap");
        assert_eq!((gap.offset, gap.zero_length, gap.data.len()), (4 << 20, 8 << 20, 0));
        assert!(zeros(4 << 20, 4 << 20).is_none());
    }
}
