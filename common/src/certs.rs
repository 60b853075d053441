//! The fleet certificate authority: create it once, then issue a certificate and key per identity.
//!
//! Keys are ECDSA P-256. Every issued certificate is valid for both client and server authentication so that
//! a daemon uses one certificate for serving and for dialling; its identity rides in URI SANs (see
//! [`crate::identity`]), its reachability in DNS/IP SANs.

use crate::identity::{Identity, Role, valid_name};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{CertificateRevocationList, FromDer, GeneralName, X509Certificate};

/// Why a certificate operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Generation or parsing failed.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The request itself was wrong.
    #[error("{0}")]
    Invalid(String),
}

/// File names of a CA directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key file.
pub const CA_KEY: &str = "ca.key";
/// The CA's certificate revocation list, written by [`revoke`].
pub const CRL: &str = "crl.pem";
/// The CA's record of what it issued: a copy of each certificate (never a key), `issued/<serial>.pem`, so that
/// [`revoke`] can find a holder's certificates by name.
pub const ISSUED: &str = "issued";

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| CertError::Io { path: path.to_path_buf(), source };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)
}

fn read_file(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io { path: path.to_path_buf(), source })
}

/// Creates a new fleet CA (`ca.pem`, `ca.key`) in `dir`. Refuses to overwrite an existing one.
pub fn init_ca(dir: &Path, common_name: &str) -> Result<(PathBuf, PathBuf), CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io { path: dir.to_path_buf(), source })?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.distinguished_name.push(DnType::OrganizationName, "ember");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(3650);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    write_file(&cert_path, &cert.pem(), false)?;
    write_file(&key_path, &key.serialize_pem(), true)?;
    Ok((cert_path, key_path))
}

/// What to put in an issued certificate.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The identity it carries.
    pub identity: Identity,
    /// DNS names it is valid for (servers).
    pub dns: Vec<String>,
    /// IP addresses it is valid for (servers).
    pub ips: Vec<IpAddr>,
    /// Validity in days.
    pub days: i64,
}

/// Issues a certificate and key signed by the CA in `ca_dir`, written to `<out_dir>/<file_stem>.pem` and
/// `<out_dir>/<file_stem>.key`. Refuses to overwrite existing files.
pub fn issue(
    ca_dir: &Path,
    req: &IssueRequest,
    out_dir: &Path,
    file_stem: &str,
) -> Result<(PathBuf, PathBuf), CertError> {
    let id = &req.identity;
    if !valid_name(&id.name) {
        return Err(CertError::Invalid(format!(
            "name {:?} is not valid: use 1-63 of a-z 0-9 - _ . starting with a letter or digit",
            id.name
        )));
    }
    match (&id.project, id.role) {
        (None, Role::Member) => return Err(CertError::Invalid("a member certificate needs --project".into())),
        (Some(p), Role::Member) if !valid_name(p) => {
            return Err(CertError::Invalid(format!("project {p:?} is not valid")));
        }
        (Some(_), r) if r != Role::Member => {
            return Err(CertError::Invalid("only member certificates carry a project".into()));
        }
        _ => {}
    }
    let ca_key = KeyPair::from_pem(&read_file(&ca_dir.join(CA_KEY))?)?;
    let issuer = Issuer::from_ca_cert_pem(&read_file(&ca_dir.join(CA_CERT))?, ca_key)?;

    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, format!("{} {}", id.role, id.name));
    params.distinguished_name.push(DnType::OrganizationName, "ember");
    let mut sans = Vec::new();
    for uri in id.to_uris() {
        sans.push(SanType::URI(uri.try_into()?));
    }
    for dns in &req.dns {
        sans.push(SanType::DnsName(dns.clone().try_into()?));
    }
    sans.extend(req.ips.iter().copied().map(SanType::IpAddress));
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(req.days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;

    // Recorded first: no certificate exists that the CA cannot find to revoke.
    let issued = ca_dir.join(ISSUED);
    std::fs::create_dir_all(&issued).map_err(|source| CertError::Io { path: issued.clone(), source })?;
    let (_, parsed) = X509Certificate::from_der(cert.der())
        .map_err(|e| CertError::Invalid(format!("reading the new certificate: {e}")))?;
    let serial = crate::revocation::serial_hex(&parsed.tbs_certificate.serial.to_bytes_be());
    write_file(&issued.join(format!("{serial}.pem")), &cert.pem(), false)?;

    std::fs::create_dir_all(out_dir).map_err(|source| CertError::Io { path: out_dir.to_path_buf(), source })?;
    let (cert_path, key_path) = (out_dir.join(format!("{file_stem}.pem")), out_dir.join(format!("{file_stem}.key")));
    write_file(&cert_path, &cert.pem(), false)?;
    write_file(&key_path, &key.serialize_pem(), true)?;
    Ok((cert_path, key_path))
}

/// One certificate a [`revoke`] named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Its serial number, in hex.
    pub serial: String,
    /// Who it was issued to, when the certificate itself was given.
    pub identity: Option<Identity>,
    /// Whether the list already held it.
    pub already: bool,
}

/// What a [`revoke`] did.
#[derive(Debug, Clone)]
pub struct Revocation {
    /// The list written.
    pub crl: PathBuf,
    /// The certificates named, in order.
    pub revoked: Vec<Revoked>,
    /// How many certificates the list now revokes.
    pub total: usize,
}

/// A certificate the CA recorded as issued (`issued/<serial>.pem`).
#[derive(Debug, Clone)]
pub struct Issued {
    /// The recorded copy.
    pub path: PathBuf,
    /// Its serial number, in hex.
    pub serial: String,
    /// Who holds it.
    pub identity: Identity,
    /// When it expires.
    pub not_after: OffsetDateTime,
    /// Whether the CA's revocation list names it.
    pub revoked: bool,
}

impl Issued {
    /// `revoked`, `expired` or `valid`.
    pub fn state(&self) -> &'static str {
        match (self.revoked, self.not_after < OffsetDateTime::now_utc()) {
            (true, _) => "revoked",
            (false, true) => "expired",
            (false, false) => "valid",
        }
    }

    /// The expiry, RFC 3339.
    pub fn expires(&self) -> String {
        self.not_after.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
    }
}

/// What the CA in `ca_dir` recorded as issued, by holder name, then expiry, then serial.
pub fn issued(ca_dir: &Path) -> Result<Vec<Issued>, CertError> {
    let dir = ca_dir.join(ISSUED);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(CertError::Io { path: dir, source }),
    };
    let crl_path = ca_dir.join(CRL);
    let revoked = match crl_path.exists() {
        true => {
            crate::revocation::parse(read_file(&ca_dir.join(CA_CERT))?.as_bytes(), read_file(&crl_path)?.as_bytes())
                .map_err(|e| CertError::Invalid(format!("{}: {e}", crl_path.display())))?
        }
        false => Default::default(),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(|source| CertError::Io { path: dir.clone(), source })?.path();
        let pem = read_file(&path)?;
        let Ok(der) = crate::revocation::pem_block(pem.as_bytes(), "CERTIFICATE") else { continue };
        let Ok((_, cert)) = X509Certificate::from_der(&der) else { continue };
        let Ok(identity) = Identity::from_cert(&cert) else { continue };
        found.push(Issued {
            serial: crate::revocation::serial_hex(&cert.tbs_certificate.serial.to_bytes_be()),
            identity,
            not_after: cert.validity().not_after.to_datetime(),
            revoked: revoked.contains(&cert),
            path,
        });
    }
    found.sort_by(|a, b| (&a.identity.name, a.not_after, &a.serial).cmp(&(&b.identity.name, b.not_after, &b.serial)));
    Ok(found)
}

/// What a [`renew`] issued.
#[derive(Debug)]
pub struct Renewal {
    /// The new certificate and key.
    pub cert: PathBuf,
    /// The new key.
    pub key: PathBuf,
    /// The certificate it replaces (still valid until it expires or is revoked).
    pub replaced: Issued,
    /// What the new one carries.
    pub request: IssueRequest,
}

/// Issues a successor to the newest certificate the CA recorded for `name` that is not revoked: the same
/// identity and the same DNS names and IP addresses (which callers check against the holder's address), a new
/// key, valid for `days` (default: as long as the one it replaces was). Written to `<out_dir>/<name>.pem` and
/// `.key`, which must not exist. The old certificate stays valid, so the daemon can move to the new one when
/// it restarts; revoke the old one then, if it should not outlive that.
pub fn renew(ca_dir: &Path, name: &str, days: Option<i64>, out_dir: &Path) -> Result<Renewal, CertError> {
    let all = issued(ca_dir)?;
    let current: Vec<&Issued> = all.iter().filter(|c| c.identity.name == name && !c.revoked).collect();
    let Some(replaced) = current.last() else {
        return Err(CertError::Invalid(format!("the CA has issued no certificate to {name:?} that is not revoked")));
    };
    if current.iter().any(|c| c.identity != replaced.identity) {
        return Err(CertError::Invalid(format!(
            "{name:?} holds certificates of more than one identity; issue the new one with `certs issue`"
        )));
    }
    let pem = read_file(&replaced.path)?;
    let invalid = |e: String| CertError::Invalid(format!("{}: {e}", replaced.path.display()));
    let der = crate::revocation::pem_block(pem.as_bytes(), "CERTIFICATE").map_err(invalid)?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| invalid(e.to_string()))?;
    let (mut dns, mut ips) = (Vec::new(), Vec::new());
    if let Ok(Some(sans)) = cert.subject_alternative_name() {
        for san in &sans.value.general_names {
            match san {
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(bytes) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                        ips.push(IpAddr::from(v4));
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                        ips.push(IpAddr::from(v6));
                    }
                }
                _ => {}
            }
        }
    }
    // `issue` starts a certificate an hour back (clock skew): its validity is the rest, in whole days.
    let validity = cert.validity();
    let lasted = (validity.not_after.timestamp() - validity.not_before.timestamp() - 3600) / 86_400;
    let request = IssueRequest { identity: replaced.identity.clone(), dns, ips, days: days.unwrap_or(lasted.max(1)) };
    let (cert, key) = issue(ca_dir, &request, out_dir, name)?;
    Ok(Renewal { cert, key, replaced: (*replaced).clone(), request })
}

/// Adds certificates to the CA's revocation list (`<ca_dir>/crl.pem`, created on first use): each of
/// `certs` (PEM files, which must be this CA's), each of `serials` (hex, colons allowed, for a certificate
/// whose file is lost), and every certificate the CA recorded as issued to one of `names`. The list is signed
/// by the CA, numbered one past the last, and replaces the old one atomically; what it already held stays. Daemons whose `[tls] crl` names a copy of it refuse those
/// certificates within seconds of the copy changing (see [`crate::revocation`]).
pub fn revoke(ca_dir: &Path, certs: &[PathBuf], serials: &[String], names: &[String]) -> Result<Revocation, CertError> {
    use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
    let invalid = |path: &Path, why: String| CertError::Invalid(format!("{}: {why}", path.display()));
    let ca_pem = read_file(&ca_dir.join(CA_CERT))?;
    let ca_der = crate::revocation::pem_block(ca_pem.as_bytes(), "CERTIFICATE")
        .map_err(|e| invalid(&ca_dir.join(CA_CERT), e))?;
    let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|e| invalid(&ca_dir.join(CA_CERT), e.to_string()))?;

    // What the list holds now, checked as a daemon checks it.
    let crl_path = ca_dir.join(CRL);
    let (mut entries, mut number) = (Vec::<(Vec<u8>, OffsetDateTime)>::new(), 0u64);
    if crl_path.exists() {
        let pem = read_file(&crl_path)?;
        crate::revocation::parse(ca_pem.as_bytes(), pem.as_bytes()).map_err(|e| invalid(&crl_path, e))?;
        let der = crate::revocation::pem_block(pem.as_bytes(), "X509 CRL").map_err(|e| invalid(&crl_path, e))?;
        let (_, crl) = CertificateRevocationList::from_der(&der).map_err(|e| invalid(&crl_path, e.to_string()))?;
        number = crl.crl_number().and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
        for r in crl.iter_revoked_certificates() {
            entries.push((r.serial().to_bytes_be(), r.revocation_date.to_datetime()));
        }
    }

    let now = OffsetDateTime::now_utc();
    let mut revoked = Vec::new();
    let mut add = |serial: Vec<u8>, identity: Option<Identity>| {
        let already = entries.iter().any(|(s, _)| *s == serial);
        if !already {
            entries.push((serial.clone(), now));
        }
        let serial = crate::revocation::serial_hex(&serial);
        revoked.push(Revoked { serial, identity, already });
    };
    let mut certs = certs.to_vec();
    let recorded = if names.is_empty() { Vec::new() } else { issued(ca_dir)? };
    for name in names {
        let found: Vec<PathBuf> =
            recorded.iter().filter(|i| &i.identity.name == name).map(|i| i.path.clone()).collect();
        if found.is_empty() {
            return Err(CertError::Invalid(format!(
                "no certificate issued to {name:?} is recorded in {} (for one issued before the CA kept that \
                 record, give its file or --serial)",
                ca_dir.join(ISSUED).display()
            )));
        }
        certs.extend(found);
    }
    for path in &certs {
        let pem = read_file(path)?;
        let der = crate::revocation::pem_block(pem.as_bytes(), "CERTIFICATE").map_err(|e| invalid(path, e))?;
        let (_, cert) = X509Certificate::from_der(&der).map_err(|e| invalid(path, e.to_string()))?;
        if cert.issuer() != ca.subject() || cert.verify_signature(Some(ca.public_key())).is_err() {
            return Err(invalid(path, "not issued by this CA".into()));
        }
        add(cert.tbs_certificate.serial.to_bytes_be(), Identity::from_cert(&cert).ok());
    }
    for hex in serials {
        let digits: String = hex.chars().filter(|c| *c != ':').collect();
        let bytes = (0..digits.len())
            .step_by(2)
            .map(|i| digits.get(i..i + 2).and_then(|d| u8::from_str_radix(d, 16).ok()))
            .collect::<Option<Vec<u8>>>()
            .filter(|b| !b.is_empty() && digits.len().is_multiple_of(2))
            .ok_or_else(|| CertError::Invalid(format!("serial {hex:?} is not hex")))?;
        let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len() - 1);
        add(bytes[first..].to_vec(), None);
    }

    let ca_key = KeyPair::from_pem(&read_file(&ca_dir.join(CA_KEY))?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let params = CertificateRevocationListParams {
        this_update: now,
        // Daemons do not enforce it (see crate::revocation); a date far ahead keeps other readers content.
        next_update: now + Duration::days(3650),
        crl_number: SerialNumber::from(number + 1),
        issuing_distribution_point: None,
        revoked_certs: entries
            .iter()
            .map(|(serial, at)| RevokedCertParams {
                serial_number: SerialNumber::from_slice(serial),
                revocation_time: *at,
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let pem = params.signed_by(&issuer)?.pem()?;
    let tmp = ca_dir.join(format!("{CRL}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    write_file(&tmp, &pem, false)?;
    std::fs::rename(&tmp, &crl_path).map_err(|source| CertError::Io { path: crl_path.clone(), source })?;
    Ok(Revocation { crl: crl_path, revoked, total: entries.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificate_carries_identity() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "test CA").unwrap();
        assert!(init_ca(dir.path(), "again").is_err(), "must not overwrite a CA");
        let identity = Identity { role: Role::Member, name: "alice".into(), project: Some("proj-a".into()) };
        let req = IssueRequest { identity: identity.clone(), dns: vec!["localhost".into()], ips: vec![], days: 1 };
        let (cert, _) = issue(dir.path(), &req, dir.path(), "alice").unwrap();
        let pem = std::fs::read_to_string(cert).unwrap();
        let der = pem_body(&pem);
        assert_eq!(Identity::from_der(&der).unwrap(), identity);

        let bad = IssueRequest { identity: Identity { role: Role::Member, name: "bob".into(), project: None }, ..req };
        assert!(matches!(issue(dir.path(), &bad, dir.path(), "bob"), Err(CertError::Invalid(_))));
    }

    #[test]
    fn a_renewal_keeps_the_identity_and_the_addresses_with_a_new_key_and_serial() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "test CA").unwrap();
        let identity = Identity { role: Role::StorageAgent, name: "storage1".into(), project: None };
        let req = IssueRequest {
            identity: identity.clone(),
            dns: vec!["storage1.example.net".into()],
            ips: vec!["192.0.2.11".parse().unwrap(), "2001:db8::11".parse().unwrap()],
            days: 30,
        };
        let (old_cert, old_key) = issue(dir.path(), &req, &dir.path().join("old"), "storage1").unwrap();
        let renewed = renew(dir.path(), "storage1", None, &dir.path().join("new")).unwrap();
        assert_eq!(renewed.cert, dir.path().join("new/storage1.pem"));
        assert_eq!((renewed.request.identity.clone(), renewed.request.days), (identity, 30));
        assert_eq!((renewed.request.dns.clone(), renewed.request.ips.clone()), (req.dns, req.ips));
        assert_eq!(renewed.replaced.path.parent(), Some(dir.path().join(ISSUED).as_path()));
        assert_ne!(std::fs::read(&old_key).unwrap(), std::fs::read(&renewed.key).unwrap(), "a new key");
        let serial = |p: &Path| {
            let der = pem_body(&std::fs::read_to_string(p).unwrap());
            X509Certificate::from_der(&der).unwrap().1.tbs_certificate.serial.to_bytes_be()
        };
        assert_ne!(serial(&old_cert), serial(&renewed.cert));
        assert_eq!(issued(dir.path()).unwrap().len(), 2, "the CA recorded both");
        assert!(renew(dir.path(), "storage1", Some(90), &dir.path().join("new")).is_err(), "never overwrites");
        assert_eq!(renew(dir.path(), "storage1", Some(90), &dir.path().join("newer")).unwrap().request.days, 90);

        revoke(dir.path(), &[], &[], &["storage1".into()]).unwrap();
        let err = renew(dir.path(), "storage1", None, &dir.path().join("after")).unwrap_err().to_string();
        assert!(err.contains("no certificate to \"storage1\" that is not revoked"), "{err}");
    }

    fn pem_body(pem: &str) -> Vec<u8> {
        let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        parsed.contents
    }
}
