//! Who is calling: the role, name and project carried in a client certificate issued by the fleet CA.
//!
//! Certificates carry URI SANs `urn:ember:role:<role>`, `urn:ember:name:<name>` and, for members,
//! `urn:ember:project:<project>`. The TLS layer has already verified the chain against the fleet CA; these
//! functions read the verified leaf, refuse it if the fleet's revocation list names it
//! ([`crate::revocation`]), and decide whether its role may call a service.

use std::fmt;
use std::str::FromStr;
use tonic::{Request, Status};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

const ROLE_PREFIX: &str = "urn:ember:role:";
const NAME_PREFIX: &str = "urn:ember:name:";
const PROJECT_PREFIX: &str = "urn:ember:project:";

/// A role in the fleet, fixed at certificate issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The coordinator: the only caller of agent APIs.
    Coordinator,
    /// A storage node's agent.
    StorageAgent,
    /// A compute node's agent.
    ComputeAgent,
    /// A backup node's agent.
    BackupAgent,
    /// A fleet administrator: every project, admin-only calls.
    Admin,
    /// A member of one project.
    Member,
}

impl Role {
    /// Every role, for help texts.
    pub const ALL: [Role; 6] =
        [Role::Coordinator, Role::StorageAgent, Role::ComputeAgent, Role::BackupAgent, Role::Admin, Role::Member];

    /// The role's name as written in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::StorageAgent => "storage-agent",
            Role::ComputeAgent => "compute-agent",
            Role::BackupAgent => "backup-agent",
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }

    /// Whether this role is one of the three agents.
    pub fn is_agent(self) -> bool {
        matches!(self, Role::StorageAgent | Role::ComputeAgent | Role::BackupAgent)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            let names: Vec<_> = Role::ALL.iter().map(|r| r.as_str()).collect();
            format!("unknown role {s:?}; expected one of {}", names.join(", "))
        })
    }
}

/// The verified identity of a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// What the peer may do.
    pub role: Role,
    /// Node name for agents and the coordinator, user name for people.
    pub name: String,
    /// The member's project; `None` for every other role.
    pub project: Option<String>,
}

impl Identity {
    /// The URI SANs that encode this identity in a certificate.
    pub fn to_uris(&self) -> Vec<String> {
        let mut uris = vec![format!("{ROLE_PREFIX}{}", self.role), format!("{NAME_PREFIX}{}", self.name)];
        if let Some(p) = &self.project {
            uris.push(format!("{PROJECT_PREFIX}{p}"));
        }
        uris
    }

    /// Reads the identity from a DER certificate's URI SANs.
    pub fn from_der(der: &[u8]) -> Result<Identity, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
        Identity::from_cert(&cert)
    }

    /// Reads the identity from a parsed certificate's URI SANs.
    pub fn from_cert(cert: &X509Certificate<'_>) -> Result<Identity, String> {
        let san = cert
            .subject_alternative_name()
            .map_err(|e| format!("bad subjectAltName: {e}"))?
            .ok_or("certificate carries no ember identity (no subjectAltName)")?;
        let (mut role, mut name, mut project) = (None, None, None);
        for gn in &san.value.general_names {
            if let GeneralName::URI(uri) = gn {
                if let Some(r) = uri.strip_prefix(ROLE_PREFIX) {
                    role = Some(r.parse::<Role>()?);
                } else if let Some(n) = uri.strip_prefix(NAME_PREFIX) {
                    name = Some(n.to_string());
                } else if let Some(p) = uri.strip_prefix(PROJECT_PREFIX) {
                    project = Some(p.to_string());
                }
            }
        }
        let role = role.ok_or("certificate carries no ember role")?;
        let name = name.ok_or("certificate carries no ember name")?;
        if role == Role::Member && project.is_none() {
            return Err("member certificate carries no project".into());
        }
        if role != Role::Member {
            project = None;
        }
        Ok(Identity { role, name, project })
    }

    /// Reads the identity of the TLS peer of a request.
    pub fn of_peer<T>(req: &Request<T>) -> Result<Identity, Status> {
        let certs = req
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("a client certificate from the fleet CA is required"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("a client certificate from the fleet CA is required"))?;
        let (_, cert) = X509Certificate::from_der(leaf.as_ref())
            .map_err(|e| Status::unauthenticated(format!("unreadable certificate: {e}")))?;
        let identity = Identity::from_cert(&cert).map_err(Status::unauthenticated)?;
        if crate::revocation::current().contains(&cert) {
            return Err(Status::unauthenticated(format!(
                "the certificate of {} {} (serial {}) is revoked",
                identity.role,
                identity.name,
                crate::revocation::serial_hex(&cert.tbs_certificate.serial.to_bytes_be())
            )));
        }
        Ok(identity)
    }
}

/// Checks that a name (node, user, project, backend) is safe to embed anywhere: 1–63 characters of
/// lowercase letters, digits, `-`, `_` and `.`, starting with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
}

/// The id as a UUID when it is in canonical form (lowercase, hyphenated): only such ids ever become file
/// names, device names or command arguments on a node.
pub fn canonical_uuid(id: &str) -> Option<uuid::Uuid> {
    uuid::Uuid::parse_str(id).ok().filter(|u| u.hyphenated().to_string() == id)
}

/// A tonic interceptor that admits only peers whose certificate carries one of `roles`, and stores their
/// [`Identity`] in the request extensions for the handler.
pub fn require_roles(roles: &'static [Role]) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut req: Request<()>| {
        let identity = Identity::of_peer(&req)?;
        if !roles.contains(&identity.role) {
            let allowed: Vec<_> = roles.iter().map(|r| r.as_str()).collect();
            return Err(Status::permission_denied(format!(
                "role {} may not call this service (allowed: {})",
                identity.role,
                allowed.join(", ")
            )));
        }
        req.extensions_mut().insert(identity);
        Ok(req)
    }
}

/// When the certificate the caller of `req` presented expires, in seconds since the Unix epoch.
pub fn peer_certificate_expiry<T>(req: &Request<T>) -> Option<i64> {
    let certs = req.peer_certs()?;
    let (_, cert) = X509Certificate::from_der(certs.first()?.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// The identity a [`require_roles`] interceptor stored on the request.
pub fn caller<T>(req: &Request<T>) -> Result<&Identity, Status> {
    req.extensions()
        .get::<Identity>()
        .ok_or_else(|| Status::internal("no caller identity on the request (interceptor missing)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("node-1.example"));
        assert!(!valid_name(""));
        assert!(!valid_name("-x"));
        assert!(!valid_name("Upper"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"a".repeat(64)));
    }

    #[test]
    fn roles_round_trip() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("root".parse::<Role>().is_err());
    }
}
