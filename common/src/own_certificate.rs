//! A daemon's own certificate and key, followed as they change on disk, so that renewing a certificate
//! (`ember certs renew`, then copying the new files over the old) needs no restart: the next connection the
//! daemon accepts or makes presents the new one. Connections already open keep the certificate they were made
//! with; clients that keep connections make new ones when it changes ([`crate::tls::ConnectionTerms`]), so
//! that the old certificate can be revoked at once.
//!
//! A new pair is taken up only when it is whole and sound: the key matches the certificate, the fleet CA
//! signed it and it has not expired. Files caught half-copied, or a certificate from another CA, leave the
//! last good pair in force and are logged.

use crate::tls::{TlsError, TlsFiles, read};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex};
use x509_parser::prelude::{FromDer, X509Certificate};

/// A certificate and its key as this daemon presents them.
pub struct OwnCertificate {
    /// The pair as rustls presents it.
    pub certified: Arc<CertifiedKey>,
    /// The certificate file's bytes (PEM), for clients configured from PEM.
    pub cert_pem: Vec<u8>,
    /// The key file's bytes (PEM).
    pub key_pem: Vec<u8>,
    /// The certificate's serial number, in hex.
    pub serial: String,
    /// When the certificate expires, in seconds since the Unix epoch.
    pub expires_at: i64,
}

impl std::fmt::Debug for OwnCertificate {
    // Not the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnCertificate").field("serial", &self.serial).field("expires_at", &self.expires_at).finish()
    }
}

/// The pair `tls` names, checked: the key matches the certificate, which the fleet CA signed and which has
/// not expired.
pub fn load(tls: &TlsFiles) -> Result<OwnCertificate, TlsError> {
    let (cert_pem, key_pem, ca_pem) = (read(&tls.cert)?, read(&tls.key)?, read(&tls.ca)?);
    check(&cert_pem, &key_pem, &ca_pem, time::OffsetDateTime::now_utc().unix_timestamp())
        .map_err(|reason| TlsError::Certificate { path: tls.cert.clone(), reason })
}

/// [`load`] on the files' contents, at `now` (seconds since the Unix epoch).
fn check(cert_pem: &[u8], key_pem: &[u8], ca_pem: &[u8], now: i64) -> Result<OwnCertificate, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
    let Some(end_entity) = chain.first().cloned() else { return Err("holds no certificate".into()) };
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("its key: {e}"))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| format!("its key: {e}"))?;
    let (_, cert) = X509Certificate::from_der(end_entity.as_ref()).map_err(|e| e.to_string())?;
    let signed_by_ca = CertificateDer::pem_slice_iter(ca_pem).filter_map(Result::ok).any(|ca| {
        X509Certificate::from_der(ca.as_ref()).is_ok_and(|(_, ca)| cert.verify_signature(Some(ca.public_key())).is_ok())
    });
    if !signed_by_ca {
        return Err("the fleet CA did not sign it".into());
    }
    let expires_at = cert.validity().not_after.timestamp();
    if expires_at <= now {
        return Err(format!("it expired at {}", cert.validity().not_after));
    }
    Ok(OwnCertificate {
        certified: Arc::new(certified),
        cert_pem: cert_pem.to_vec(),
        key_pem: key_pem.to_vec(),
        serial: crate::revocation::serial_hex(&cert.tbs_certificate.serial.to_bytes_be()),
        expires_at,
    })
}

/// A certificate that expires within this many days is warned about: once it has expired, its daemon can reach
/// no one in the fleet, nor they it.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// The whole days left before `expires_at` (seconds since the Unix epoch) when that is within
/// [`EXPIRY_WARNING_DAYS`] of `now`.
pub fn days_left_if_expiring(expires_at: i64, now: i64) -> Option<i64> {
    let days_left = (expires_at - now).div_euclid(86_400);
    (days_left < EXPIRY_WARNING_DAYS).then_some(days_left)
}

/// How often a daemon whose certificate expires soon says so in its log.
const EXPIRY_WARNING_EVERY: i64 = 86_400;

/// The pairs this process follows, by certificate path.
static WATCHED: LazyLock<Mutex<HashMap<PathBuf, tokio::sync::watch::Receiver<Arc<OwnCertificate>>>>> =
    LazyLock::new(Default::default);

/// Loads the pair `tls` names and keeps it current: a task looks at the files every
/// [`crate::revocation::RELOAD_EVERY`] and puts each new sound pair in force, and warns daily while the one in
/// force expires within [`EXPIRY_WARNING_DAYS`]. The pair must be sound now. Called again for the same files,
/// it returns the same follower.
pub fn watch(tls: &TlsFiles) -> Result<tokio::sync::watch::Receiver<Arc<OwnCertificate>>, TlsError> {
    let mut watched = WATCHED.lock().expect("own certificate followers");
    if let Some(current) = watched.get(&tls.cert) {
        return Ok(current.clone());
    }
    let first = Arc::new(load(tls)?);
    tracing::info!(cert = %tls.cert.display(), serial = %first.serial, expires_at = first.expires_at, "presenting this certificate");
    let (sender, current) = tokio::sync::watch::channel(first);
    watched.insert(tls.cert.clone(), current.clone());
    let tls = tls.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::revocation::RELOAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut refused, mut warned_at): (Option<String>, Option<i64>) = (None, None);
        loop {
            tick.tick().await;
            let in_force = sender.borrow().clone();
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            if let Some(days_left) = days_left_if_expiring(in_force.expires_at, now)
                && warned_at.is_none_or(|at| now - at >= EXPIRY_WARNING_EVERY)
            {
                tracing::warn!(
                    serial = %in_force.serial,
                    days_left,
                    "this daemon's certificate expires soon: renew it (ember certs renew) and copy the new files over \
                     the old ones; it is taken up without a restart"
                );
                warned_at = Some(now);
            }
            let tls = tls.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                let same = |path: &PathBuf, bytes: &[u8]| std::fs::read(path).is_ok_and(|b| b == bytes);
                if same(&tls.cert, &in_force.cert_pem) && same(&tls.key, &in_force.key_pem) {
                    return Ok(None);
                }
                load(&tls).map(Some)
            })
            .await;
            match outcome {
                Ok(Ok(None)) => {}
                Ok(Ok(Some(renewed))) => {
                    tracing::info!(serial = %renewed.serial, expires_at = renewed.expires_at, "presenting a renewed certificate");
                    sender.send_replace(Arc::new(renewed));
                    (refused, warned_at) = (None, None);
                }
                Ok(Err(e)) if refused.as_deref() != Some(e.to_string().as_str()) => {
                    tracing::error!(error = %e, "new certificate refused; the last good one stays in force");
                    refused = Some(e.to_string());
                }
                Ok(Err(_)) => {}
                Err(e) => tracing::error!(error = %e, "checking for a renewed certificate failed"),
            }
        }
    });
    Ok(current)
}

/// The pair in force for `tls` when this process follows it ([`watch`]); `None` in one that does not (the
/// CLI, which reads its files at each run).
pub fn watched(tls: &TlsFiles) -> Option<Arc<OwnCertificate>> {
    WATCHED.lock().expect("own certificate followers").get(&tls.cert).map(|current| current.borrow().clone())
}

/// Presents the pair in force to every client that connects, and to every server called.
#[derive(Debug)]
pub struct Presenter(pub tokio::sync::watch::Receiver<Arc<OwnCertificate>>);

impl rustls::server::ResolvesServerCert for Presenter {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.borrow().certified.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{IssueRequest, init_ca, issue};
    use crate::identity::{Identity, Role};
    use std::path::Path;

    /// A certificate and key the CA in `ca_dir` issues to storage1, as PEM.
    fn files(ca_dir: &Path, days: i64) -> (Vec<u8>, Vec<u8>) {
        let identity = Identity { role: Role::StorageAgent, name: "storage1".into(), project: None };
        let req = IssueRequest { identity, dns: vec!["localhost".into()], ips: vec![], days };
        let out = tempfile::tempdir().unwrap();
        let (cert, key) = issue(ca_dir, &req, out.path(), "storage1").unwrap();
        (std::fs::read(cert).unwrap(), std::fs::read(key).unwrap())
    }

    #[test]
    fn only_a_whole_pair_the_fleet_ca_signed_and_still_valid_is_taken_up() {
        let (fleet, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        init_ca(fleet.path(), "fleet CA").unwrap();
        init_ca(other.path(), "another CA").unwrap();
        let ca = std::fs::read(fleet.path().join(crate::certs::CA_CERT)).unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();

        let (cert, key) = files(fleet.path(), 30);
        let sound = check(&cert, &key, &ca, now).unwrap();
        assert!((sound.expires_at - now - 30 * 86_400).abs() < 2 * 3600, "{sound:?}");
        assert!(!sound.serial.is_empty());

        let (renewed_cert, renewed_key) = files(fleet.path(), 30);
        let half_copied = check(&renewed_cert, &key, &ca, now).unwrap_err();
        assert!(half_copied.contains("its key"), "{half_copied}");
        let (foreign_cert, foreign_key) = files(other.path(), 30);
        let foreign = check(&foreign_cert, &foreign_key, &ca, now).unwrap_err();
        assert!(foreign.contains("the fleet CA did not sign it"), "{foreign}");
        let expired = check(&renewed_cert, &renewed_key, &ca, now + 31 * 86_400).unwrap_err();
        assert!(expired.contains("expired"), "{expired}");
        assert!(check(b"", &key, &ca, now).unwrap_err().contains("no certificate"));
    }

    #[test]
    fn a_certificate_is_warned_about_in_its_last_thirty_days() {
        let day = 86_400;
        assert_eq!(days_left_if_expiring(100 * day, 60 * day), None);
        assert_eq!(days_left_if_expiring(100 * day, 70 * day), None, "30 days left: not yet");
        assert_eq!(days_left_if_expiring(100 * day, 70 * day + 1), Some(29));
        assert_eq!(days_left_if_expiring(100 * day, 100 * day - 1), Some(0));
        assert_eq!(days_left_if_expiring(100 * day, 101 * day), Some(-1), "expired");
    }
}
