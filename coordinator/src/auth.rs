//! Authorization inside the public API: who may change what, and which project a caller acts for.

use crate::error::{Error, Result};
use ember_common::identity::{Identity, Role, caller};
use tonic::Request;

/// The caller, as the interceptor verified it.
pub fn who<T>(req: &Request<T>) -> Result<Identity> {
    caller(req).cloned().map_err(|s| Error::PermissionDenied(s.message().to_string()))
}

/// Refuses callers that are not admins; `what` completes "only admins may …".
pub fn require_admin<T>(req: &Request<T>, what: &str) -> Result<Identity> {
    let id = who(req)?;
    if id.role == Role::Admin { Ok(id) } else { Err(Error::PermissionDenied(format!("only admins may {what}"))) }
}

/// The project a call acts on: a member's own (naming another is refused), or for admins the one they name.
pub fn project_for(id: &Identity, requested: &str) -> Result<String> {
    match (&id.project, id.role) {
        (Some(own), Role::Member) => {
            if requested.is_empty() || requested == own {
                Ok(own.clone())
            } else {
                Err(Error::PermissionDenied(format!("project {requested}: members may only act on their own project")))
            }
        }
        _ if requested.is_empty() => Err(Error::invalid("project", "admins must name a project")),
        _ => Ok(requested.to_string()),
    }
}

/// The project that will own a new resource: a member's own; for an admin the one named, else `admin`.
pub fn owner_project(id: &Identity, requested: &str) -> Result<String> {
    match id.role {
        Role::Admin if requested.is_empty() => Ok("admin".into()),
        _ => project_for(id, requested),
    }
}

/// Whether `who` may see resources of `project`.
pub fn can_see(who: &Identity, project: &str) -> bool {
    who.role == Role::Admin || who.project.as_deref() == Some(project)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_is_confined_to_its_project() {
        let m = Identity { role: Role::Member, name: "alice".into(), project: Some("a".into()) };
        assert_eq!(project_for(&m, "").unwrap(), "a");
        assert_eq!(project_for(&m, "a").unwrap(), "a");
        assert!(matches!(project_for(&m, "b"), Err(Error::PermissionDenied(_))));
        let admin = Identity { role: Role::Admin, name: "root".into(), project: None };
        assert_eq!(project_for(&admin, "b").unwrap(), "b");
        assert!(project_for(&admin, "").is_err());
    }
}
