//! Revoked certificates: a certificate revocation list (CRL) signed by the fleet CA, written by
//! `ember certs revoke` ([`crate::certs::revoke`]), that every daemon reads from the `crl` file of its `[tls]`
//! section and reads again whenever that file changes. A call whose client certificate the list names is
//! refused (`UNAUTHENTICATED`), by the coordinator and by every agent.
//!
//! Why per call and not in the TLS handshake: HTTP/2 connections last for hours, so a check made only when
//! one is opened would let a revoked peer go on using the connection it already has. Calls that are still
//! running when a list revokes their caller (a stream of volume data, say) end then
//! ([`crate::revoked_calls`]). The handshake still
//! verifies the chain; this only asks whether the verified leaf has been revoked since it was issued.
//!
//! A list that cannot be trusted (unreadable, not signed by the fleet CA) stops a daemon at start; once
//! running, the daemon keeps the last good list and logs why the new one was refused, so a bad copy never
//! lifts a revocation. The list's `nextUpdate` is not enforced: the fleet CA is offline, and a list that
//! went stale must not lock every node out.

use crate::tls::TlsFiles;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use x509_parser::prelude::{CertificateRevocationList, FromDer, X509Certificate};

/// How often a daemon looks at its CRL file for a new list.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// The serial numbers one CRL revokes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RevokedSerials {
    /// Big-endian, without leading zero bytes.
    serials: HashSet<Vec<u8>>,
    /// The list's number (its crlNumber extension; 0 when it has none): `ember certs revoke` numbers each
    /// list one past the last, so a larger number is a later list.
    pub number: u64,
    /// The list as the CA wrote it (PEM), for the coordinator to hand on to agents.
    pub pem: Vec<u8>,
}

impl RevokedSerials {
    /// Whether `cert`'s serial number is listed.
    pub fn contains(&self, cert: &X509Certificate<'_>) -> bool {
        self.contains_serial(&cert.tbs_certificate.serial.to_bytes_be())
    }

    /// Whether `serial` (big-endian, without leading zero bytes) is listed.
    pub fn contains_serial(&self, serial: &[u8]) -> bool {
        self.serials.contains(serial)
    }

    /// How many certificates are revoked.
    pub fn len(&self) -> usize {
        self.serials.len()
    }

    /// Whether nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.serials.is_empty()
    }
}

/// A serial number as `ember certs revoke` prints it and takes it: lowercase hex without leading zeros.
pub fn serial_hex(serial: &[u8]) -> String {
    serial.iter().map(|b| format!("{b:02x}")).collect()
}

/// The DER body of the first PEM block in `pem` labelled `label`.
pub fn pem_block(pem: &[u8], label: &str) -> Result<Vec<u8>, String> {
    for block in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let block = block.map_err(|e| format!("not PEM: {e}"))?;
        if block.label == label {
            return Ok(block.contents);
        }
    }
    Err(format!("no {label} in it"))
}

/// Reads a PEM CRL and checks that the CA in `ca_pem` issued and signed it.
pub fn parse(ca_pem: &[u8], crl_pem: &[u8]) -> Result<RevokedSerials, String> {
    let ca_der = pem_block(ca_pem, "CERTIFICATE").map_err(|e| format!("the CA certificate: {e}"))?;
    let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|e| format!("the CA certificate: {e}"))?;
    let crl_der = pem_block(crl_pem, "X509 CRL")?;
    let (_, crl) = CertificateRevocationList::from_der(&crl_der).map_err(|e| format!("unreadable CRL: {e}"))?;
    if crl.issuer() != ca.subject() {
        return Err(format!("issued by {}, not by the fleet CA {}", crl.issuer(), ca.subject()));
    }
    crl.verify_signature(ca.public_key()).map_err(|e| format!("not signed by the fleet CA: {e}"))?;
    Ok(RevokedSerials {
        serials: crl.iter_revoked_certificates().map(|r| r.serial().to_bytes_be()).collect(),
        number: crl.crl_number().and_then(|n| u64::try_from(n).ok()).unwrap_or(0),
        pem: crl_pem.to_vec(),
    })
}

/// The list this process enforces; empty until [`watch`] loads one. A watch channel, so that calls already
/// running can learn of a new list ([`subscribe`], [`crate::revoked_calls`]).
static CURRENT: LazyLock<tokio::sync::watch::Sender<Arc<RevokedSerials>>> =
    LazyLock::new(|| tokio::sync::watch::Sender::new(Arc::default()));

/// The list this process enforces now.
pub fn current() -> Arc<RevokedSerials> {
    CURRENT.borrow().clone()
}

/// A receiver that sees every list put in force from now on.
pub fn subscribe() -> tokio::sync::watch::Receiver<Arc<RevokedSerials>> {
    CURRENT.subscribe()
}

/// Puts `list` in force unless the one in force is later (a larger number): a list never goes back, whether it
/// comes from the file or from the coordinator. Returns whether it was put in force.
fn install(list: RevokedSerials) -> bool {
    CURRENT.send_if_modified(|current| {
        let later = is_later(&list, current);
        if later {
            *current = Arc::new(list);
        }
        later
    })
}

/// Whether `list` replaces `current`: a larger number, or the same number with other contents (lists made by
/// other tools may carry no number at all).
fn is_later(list: &RevokedSerials, current: &RevokedSerials) -> bool {
    list.number > current.number || (list.number == current.number && list.serials != current.serials)
}

/// Puts in force a list the coordinator handed on (`crl_pem`), after checking that the fleet CA in `tls`
/// signed it, when it is later than the one in force. Returns the number of the list put in force, if any.
///
/// It is kept in memory only: the `[tls] crl` file may be the CA's own list (the all-in-one fleet's is), which
/// a write here could put back to an earlier one while `ember certs revoke` writes the next. A restarted agent
/// starts from its file and has the coordinator's list again at its first heartbeat.
pub fn adopt(tls: &TlsFiles, crl_pem: &[u8]) -> Result<Option<u64>, CrlError> {
    let path = tls.crl.clone().unwrap_or_default();
    let err = |reason: String| CrlError { path: path.clone(), reason };
    let ca = std::fs::read(&tls.ca).map_err(|e| err(format!("reading the CA {}: {e}", tls.ca.display())))?;
    let list = parse(&ca, crl_pem).map_err(|e| err(format!("from the coordinator: {e}")))?;
    let number = list.number;
    Ok(install(list).then_some(number))
}

/// The fleet CA's certificates in `ca_pem`, as the roots rustls checks peers' certificates against (servers'
/// by [`ServerVerifier`], clients' by a daemon's server, [`crate::tls::TlsFiles::server_config`]).
pub fn fleet_roots(ca_pem: &[u8]) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.map_err(|e| format!("the CA certificate: {e}"))?).map_err(|e| e.to_string())?;
    }
    Ok(roots)
}

/// The server-certificate check of a daemon calling another: the fleet CA's chain and the server's name, as
/// rustls checks them, and then the list in force, so that a retired node's certificate, revoked, cannot pose
/// as a storage node (which is sent volume data, CHAP secrets and LUKS passphrases) or as the coordinator.
/// The list is consulted when a connection is made (servers check every call, clients choose whom to talk
/// to): a client that keeps connections makes new ones when the list changes, as the coordinator does.
#[derive(Debug)]
pub struct ServerVerifier {
    chain: Arc<rustls::client::WebPkiServerVerifier>,
    /// The serial number of the last server certificate it accepted.
    accepted: AcceptedServer,
}

/// The serial number of the server certificate a channel's verifier last accepted (none before it connects):
/// a client with a long stream to that server checks it against lists that come into force meanwhile.
pub type AcceptedServer = Arc<std::sync::Mutex<Option<Vec<u8>>>>;

/// Whether the list in force revokes the server certificate `accepted` names.
pub fn revokes(accepted: &AcceptedServer) -> bool {
    let serial = accepted.lock().expect("accepted server").clone();
    serial.is_some_and(|s| current().contains_serial(&s))
}

impl ServerVerifier {
    /// A verifier trusting the CA certificates in `ca_pem`.
    pub fn new(ca_pem: &[u8]) -> Result<ServerVerifier, String> {
        let roots = fleet_roots(ca_pem)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(ServerVerifier { chain, accepted: AcceptedServer::default() })
    }

    /// Where it notes the serial number of each server certificate it accepts.
    pub fn accepted(&self) -> AcceptedServer {
        self.accepted.clone()
    }
}

impl rustls::client::danger::ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        let (_, cert) = X509Certificate::from_der(end_entity.as_ref())
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        if current().contains(&cert) {
            tracing::warn!(
                server = ?server_name,
                serial = %serial_hex(&cert.tbs_certificate.serial.to_bytes_be()),
                "refusing a server whose certificate is revoked"
            );
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked));
        }
        *self.accepted.lock().expect("accepted server") = Some(cert.tbs_certificate.serial.to_bytes_be());
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// Why a CRL could not be put in force.
#[derive(Debug, thiserror::Error)]
#[error("crl {path}: {reason}")]
pub struct CrlError {
    /// The CRL file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

/// What the CRL file holds now: `None` when it does not exist.
fn read(tls: &TlsFiles, crl: &Path) -> Result<Option<(Vec<u8>, RevokedSerials)>, CrlError> {
    let err = |reason: String| CrlError { path: crl.to_path_buf(), reason };
    let bytes = match std::fs::read(crl) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e.to_string())),
    };
    let ca = std::fs::read(&tls.ca).map_err(|e| err(format!("reading the CA {}: {e}", tls.ca.display())))?;
    let list = parse(&ca, &bytes).map_err(err)?;
    Ok(Some((bytes, list)))
}

/// Puts the CRL named in `tls` (if any) in force for this process, and keeps it current: a task looks at
/// the file every [`RELOAD_EVERY`] and installs each new list that the fleet CA signed. A file that does
/// not exist yet revokes nothing (a fleet configures the path before it first revokes anything); one that
/// exists but cannot be trusted is an error.
pub fn watch(tls: &TlsFiles) -> Result<(), CrlError> {
    let Some(crl) = tls.crl.clone() else { return Ok(()) };
    // Called before a daemon's first outgoing call and again when it starts serving: one watcher is enough.
    static WATCHING: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut watching = WATCHING.lock().expect("revocation watcher lock");
    if *watching {
        return Ok(());
    }
    let mut seen = match read(tls, &crl)? {
        Some((bytes, list)) => {
            tracing::info!(crl = %crl.display(), revoked = list.len(), "certificate revocation list in force");
            install(list);
            Some(bytes)
        }
        None => {
            tracing::info!(crl = %crl.display(), "no certificate revocation list yet: nothing is revoked");
            None
        }
    };
    *watching = true;
    let tls = tls.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RELOAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refused: Option<String> = None;
        loop {
            tick.tick().await;
            let path = crl.clone();
            let outcome = match tokio::task::spawn_blocking({
                let tls = tls.clone();
                move || read(&tls, &path)
            })
            .await
            {
                Ok(outcome) => outcome,
                Err(e) => Err(CrlError { path: crl.clone(), reason: e.to_string() }),
            };
            match outcome {
                Ok(Some((bytes, list))) if seen.as_ref() != Some(&bytes) => {
                    let (revoked, number) = (list.len(), list.number);
                    if install(list) {
                        tracing::info!(crl = %crl.display(), revoked, number, "new certificate revocation list in force");
                    } else if current().pem != bytes {
                        tracing::warn!(crl = %crl.display(), number, in_force = current().number, "the file holds an older list than the one in force; it is ignored");
                    }
                    seen = Some(bytes);
                    refused = None;
                }
                Ok(Some(_)) => {}
                Ok(None) if seen.is_some() && refused.is_none() => {
                    let why = "the file is gone; the last list stays in force".to_string();
                    tracing::warn!(crl = %crl.display(), "{why}");
                    refused = Some(why);
                }
                Ok(None) => {}
                Err(e) if refused.as_deref() != Some(e.reason.as_str()) => {
                    tracing::error!(error = %e, "certificate revocation list refused; the last good one stays in force");
                    refused = Some(e.reason);
                }
                Err(_) => {}
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{IssueRequest, init_ca, issue, revoke};
    use crate::identity::{Identity, Role};

    fn member(dir: &Path, name: &str) -> PathBuf {
        let identity = Identity { role: Role::Member, name: name.into(), project: Some("p1".into()) };
        let req = IssueRequest { identity, dns: vec![], ips: vec![], days: 1 };
        issue(dir, &req, dir, name).unwrap().0
    }

    fn listed(list: &RevokedSerials, cert: &Path) -> bool {
        let der = pem_block(&std::fs::read(cert).unwrap(), "CERTIFICATE").unwrap();
        list.contains(&X509Certificate::from_der(&der).unwrap().1)
    }

    #[test]
    fn a_list_never_goes_back_to_an_earlier_one() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "test CA").unwrap();
        let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let (alice, bob) = (member(dir.path(), "alice"), member(dir.path(), "bob"));
        let first = revoke(dir.path(), std::slice::from_ref(&alice), &[], &[]).unwrap();
        let first = parse(&ca, &std::fs::read(&first.crl).unwrap()).unwrap();
        let second = revoke(dir.path(), std::slice::from_ref(&bob), &[], &[]).unwrap();
        let second = parse(&ca, &std::fs::read(&second.crl).unwrap()).unwrap();
        assert_eq!((first.number, second.number), (1, 2));
        assert!(is_later(&first, &RevokedSerials::default()) && is_later(&second, &first));
        assert!(!is_later(&first, &second), "an older list does not replace a newer one");
        assert!(!is_later(&second, &second), "nor does the same one");
    }

    #[test]
    fn a_revoked_certificate_is_listed_and_the_others_are_not() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "test CA").unwrap();
        let (alice, bob, carol) = (member(dir.path(), "alice"), member(dir.path(), "bob"), member(dir.path(), "carol"));
        let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();

        let first = revoke(dir.path(), std::slice::from_ref(&alice), &[], &[]).unwrap();
        assert_eq!((first.revoked.len(), first.total), (1, 1));
        let list = parse(&ca, &std::fs::read(&first.crl).unwrap()).unwrap();
        assert!(listed(&list, &alice) && !listed(&list, &bob) && !listed(&list, &carol));

        // A second revocation keeps the first; revoking again what is revoked changes nothing.
        let second = revoke(dir.path(), &[bob.clone(), alice.clone()], &[], &[]).unwrap();
        assert_eq!(second.total, 2);
        assert_eq!(second.revoked.iter().map(|r| r.already).collect::<Vec<_>>(), [false, true]);
        let list = parse(&ca, &std::fs::read(&second.crl).unwrap()).unwrap();
        assert!(listed(&list, &alice) && listed(&list, &bob) && !listed(&list, &carol));
        assert_eq!(list.len(), 2);
    }

    #[test]
    fn every_certificate_issued_to_a_name_is_revoked_by_that_name() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "test CA").unwrap();
        let laptop = member(dir.path(), "alice");
        let identity = Identity { role: Role::Admin, name: "alice".into(), project: None };
        let req = IssueRequest { identity, dns: vec![], ips: vec![], days: 1 };
        let (desktop, _) = issue(dir.path(), &req, &dir.path().join("desktop"), "alice").unwrap();
        let bob = member(dir.path(), "bob");

        let done = revoke(dir.path(), &[], &[], &["alice".into()]).unwrap();
        assert_eq!(done.total, 2);
        let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let list = parse(&ca, &std::fs::read(&done.crl).unwrap()).unwrap();
        assert!(listed(&list, &laptop) && listed(&list, &desktop) && !listed(&list, &bob));
        let mut recorded: Vec<_> = crate::certs::issued(dir.path())
            .unwrap()
            .iter()
            .map(|c| (c.identity.name.clone(), c.identity.role.as_str(), c.state()))
            .collect();
        recorded.sort();
        assert_eq!(
            recorded,
            [
                ("alice".to_string(), "admin", "revoked"),
                ("alice".to_string(), "member", "revoked"),
                ("bob".to_string(), "member", "valid")
            ]
        );
        let err = revoke(dir.path(), &[], &[], &["carol".into()]).unwrap_err().to_string();
        assert!(err.contains("no certificate issued to \"carol\""), "{err}");
    }

    #[test]
    fn a_server_presenting_a_revoked_certificate_is_refused_by_its_callers() {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "test CA").unwrap();
        let server = |name: &str| {
            let identity = Identity { role: Role::StorageAgent, name: name.into(), project: None };
            let req = IssueRequest { identity, dns: vec![], ips: vec!["127.0.0.1".parse().unwrap()], days: 1 };
            let pem = issue(dir.path(), &req, dir.path(), name).unwrap().0;
            CertificateDer::from(pem_block(&std::fs::read(pem).unwrap(), "CERTIFICATE").unwrap())
        };
        let (retired, current_node) = (server("retired"), server("storage1"));
        let verifier = ServerVerifier::new(&std::fs::read(dir.path().join("ca.pem")).unwrap()).unwrap();
        let host = ServerName::try_from("127.0.0.1").unwrap();
        let check = |cert: &CertificateDer<'_>, host: &ServerName<'_>| {
            verifier.verify_server_cert(cert, &[], host, &[], UnixTime::now())
        };
        assert!(check(&retired, &host).is_ok(), "not revoked yet");

        let crl = revoke(dir.path(), &[dir.path().join("retired.pem")], &[], &[]).unwrap().crl;
        let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
        install(parse(&ca, &std::fs::read(crl).unwrap()).unwrap());
        let err = check(&retired, &host).unwrap_err();
        assert_eq!(err, rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked));
        assert!(check(&current_node, &host).is_ok(), "the others are still trusted");
        // The chain and the name are still checked as rustls does.
        let elsewhere = ServerName::try_from("10.0.0.1").unwrap();
        assert!(check(&current_node, &elsewhere).is_err(), "a certificate for another address");
    }

    #[test]
    fn a_list_from_another_ca_is_refused() {
        let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        init_ca(ours.path(), "ours").unwrap();
        init_ca(theirs.path(), "theirs").unwrap();
        let mallory = member(theirs.path(), "mallory");
        let crl = revoke(theirs.path(), &[mallory], &[], &[]).unwrap().crl;
        let ca = std::fs::read(ours.path().join("ca.pem")).unwrap();
        let err = parse(&ca, &std::fs::read(&crl).unwrap()).unwrap_err();
        assert!(err.contains("not by the fleet CA"), "{err}");
        assert!(parse(&ca, b"not a crl").is_err());
    }

    #[test]
    fn a_certificate_of_another_ca_is_not_revoked_by_ours() {
        let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        init_ca(ours.path(), "ours").unwrap();
        init_ca(theirs.path(), "theirs").unwrap();
        let foreign = member(theirs.path(), "eve");
        let err = revoke(ours.path(), &[foreign], &[], &[]).unwrap_err().to_string();
        assert!(err.contains("not issued by this CA"), "{err}");
        assert!(!ours.path().join(crate::certs::CRL).exists(), "nothing was written");
    }
}
