//! `ember bench`: measures the fleet as a user sees it. `ember bench volumes` times create→available for
//! sequential creates (p50/p95) and the throughput of many concurrent creates, then deletes.

use crate::connect::{CliError, ConnectArgs};
use ember_proto::v1::volume_service_client::VolumeServiceClient;
use ember_proto::v1::*;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// The project the bench's volumes belong to.
const BENCH_PROJECT: &str = "ember-bench";

/// `ember bench …`
#[derive(Debug, clap::Args)]
pub struct BenchCmd {
    #[command(subcommand)]
    action: BenchAction,
}

#[derive(Debug, clap::Subcommand)]
enum BenchAction {
    /// Volume create/delete latency and throughput.
    Volumes {
        /// Sequential creates timed one by one.
        #[arg(long, default_value_t = 50)]
        sequential: usize,
        /// Creates (then deletes) issued all at once.
        #[arg(long, default_value_t = 200)]
        concurrent: usize,
        /// Volume size in GiB.
        #[arg(long, default_value_t = 1)]
        size: u64,
        /// Volume type.
        #[arg(long = "type", default_value = "")]
        volume_type: String,
    },
    /// Attach/detach latency: one volume attached to and detached from a running instance, `runs` times.
    /// The split into export, connect, libvirt and confirm is in the coordinator's and compute agent's logs
    /// (`export_ms`, `connect_ms`, `libvirt_ms`, `confirm_ms`; scripts/bench-attach.sh sums them up).
    Attach {
        /// The instance (libvirt domain name or UUID, or an ember instance id).
        #[arg(long)]
        instance: String,
        /// Its compute host.
        #[arg(long)]
        host: String,
        /// Attach/detach cycles.
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
}

async fn wait_final(client: &mut VolumeServiceClient<Channel>, id: &str) -> Result<Option<String>, CliError> {
    let mut stream = client.watch_volume(GetVolumeRequest { id: id.into() }).await?.into_inner();
    let mut last = None;
    while let Some(v) = stream.message().await? {
        last = Some(v.status);
    }
    Ok(last)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Waits until the volume's status is `want`.
async fn wait_status(client: &mut VolumeServiceClient<Channel>, id: &str, want: &str) -> Result<(), CliError> {
    let mut stream = client.watch_volume(GetVolumeRequest { id: id.into() }).await?.into_inner();
    while let Some(v) = stream.message().await? {
        if v.status == want {
            return Ok(());
        }
        if v.status.starts_with("error") || (v.status == "available" && want == "in-use" && !v.status_reason.is_empty())
        {
            return Err(CliError::Other(format!("volume {id} is {}: {}", v.status, v.status_reason)));
        }
    }
    Err(CliError::Other(format!("volume {id} went away")))
}

/// `ember bench attach`: p50/p95 of attach (call → in-use) and detach (call → available).
async fn attach(conn: &ConnectArgs, instance: String, host: String, runs: usize, json: bool) -> Result<(), CliError> {
    use ember_proto::v1::attachment_service_client::AttachmentServiceClient;
    let channel = conn.channel()?;
    let mut volumes = VolumeServiceClient::new(channel.clone());
    let mut attachments = AttachmentServiceClient::new(channel);
    let v = volumes
        .create_volume(CreateVolumeRequest { size_gb: 1, name: "bench-attach".into(), ..Default::default() })
        .await?
        .into_inner();
    wait_status(&mut volumes, &v.id, "available").await?;
    let (mut attach_times, mut detach_times) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let started = Instant::now();
        let a = attachments
            .attach(AttachRequest {
                volume_id: v.id.clone(),
                instance: instance.clone(),
                host: host.clone(),
                read_only: false,
            })
            .await?
            .into_inner();
        wait_status(&mut volumes, &v.id, "in-use").await?;
        attach_times.push(started.elapsed());
        let started = Instant::now();
        attachments.detach(DetachRequest { attachment_id: a.id, ..Default::default() }).await?;
        wait_status(&mut volumes, &v.id, "available").await?;
        detach_times.push(started.elapsed());
    }
    volumes.delete_volume(DeleteVolumeRequest { id: v.id.clone(), ..Default::default() }).await?;
    attach_times.sort();
    detach_times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (a50, a95, d50, d95) = (
        ms(percentile(&attach_times, 0.5)),
        ms(percentile(&attach_times, 0.95)),
        ms(percentile(&detach_times, 0.5)),
        ms(percentile(&detach_times, 0.95)),
    );
    if json {
        crate::output::json(
            &serde_json::json!({"runs": runs, "attach_p50_ms": a50, "attach_p95_ms": a95, "detach_p50_ms": d50, "detach_p95_ms": d95}),
        );
    } else {
        println!("{runs} attach/detach cycles on {instance}@{host}");
        println!("attach (call -> in-use):    p50 {a50:.0} ms, p95 {a95:.0} ms");
        println!("detach (call -> available): p50 {d50:.0} ms, p95 {d95:.0} ms");
    }
    Ok(())
}

/// Runs `ember bench …`.
pub async fn run(cmd: BenchCmd, conn: &ConnectArgs, json: bool) -> Result<(), CliError> {
    let (sequential, concurrent, size, volume_type) = match cmd.action {
        BenchAction::Volumes { sequential, concurrent, size, volume_type } => {
            (sequential, concurrent, size, volume_type)
        }
        BenchAction::Attach { instance, host, runs } => return attach(conn, instance, host, runs, json).await,
    };
    let channel = conn.channel()?;
    let client = VolumeServiceClient::new(channel.clone());
    // The bench works in its own project with unlimited quota (admin only), so it measures the fleet, not
    // the default limits.
    ember_proto::v1::quota_service_client::QuotaServiceClient::new(channel)
        .set_quota(SetQuotaRequest {
            project: BENCH_PROJECT.into(),
            limits: [("volumes".to_string(), -1), ("gigabytes".to_string(), -1)].into(),
        })
        .await?;
    let request = || CreateVolumeRequest {
        size_gb: size,
        volume_type: volume_type.clone(),
        name: "bench".into(),
        project: BENCH_PROJECT.into(),
        ..Default::default()
    };

    let mut latencies = Vec::with_capacity(sequential);
    let mut ids = Vec::new();
    for _ in 0..sequential {
        let mut c = client.clone();
        let started = Instant::now();
        let v = c.create_volume(request()).await?.into_inner();
        let status = wait_final(&mut c, &v.id).await?;
        latencies.push(started.elapsed());
        if status.as_deref() != Some("available") {
            return Err(CliError::Other(format!("volume {} ended {status:?}", v.id)));
        }
        ids.push(v.id);
    }
    latencies.sort();
    for id in ids.drain(..) {
        client.clone().delete_volume(DeleteVolumeRequest { id, ..Default::default() }).await?;
    }

    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrent)
        .map(|_| {
            let mut c = client.clone();
            let req = request();
            tokio::spawn(async move {
                let v = c.create_volume(req).await?.into_inner();
                let status = wait_final(&mut c, &v.id).await?;
                Ok::<_, CliError>((v.id, status))
            })
        })
        .collect();
    let mut failed = 0;
    for t in tasks {
        let (id, status) = t.await.map_err(|e| CliError::Other(e.to_string()))??;
        if status.as_deref() != Some("available") {
            failed += 1;
        }
        ids.push(id);
    }
    let create_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let tasks: Vec<_> = ids
        .iter()
        .cloned()
        .map(|id| {
            let mut c = client.clone();
            tokio::spawn(async move {
                c.delete_volume(DeleteVolumeRequest { id: id.clone(), ..Default::default() }).await?;
                wait_final(&mut c, &id).await.ok();
                Ok::<_, CliError>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.map_err(|e| CliError::Other(e.to_string()))??;
    }
    let delete_secs = started.elapsed().as_secs_f64();
    let report = serde_json::json!({
        "sequential_creates": sequential,
        "create_to_available_p50_ms": percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
        "create_to_available_p95_ms": percentile(&latencies, 0.95).as_secs_f64() * 1000.0,
        "concurrent_creates": concurrent,
        "concurrent_failed": failed,
        "concurrent_create_ops_per_s": concurrent as f64 / create_secs,
        "concurrent_delete_ops_per_s": concurrent as f64 / delete_secs,
    });
    if json {
        crate::output::json(&report);
    } else {
        for (k, v) in report.as_object().into_iter().flatten() {
            println!("{k:<32} {v}");
        }
    }
    Ok(())
}
