//! Volume types and their extra specs (Cinder's `type-*` and `extra-specs` commands). Anyone may read a public
//! type, and the projects granted a private one read that ([`crate::type_access`]); admins write. Every write
//! validates first, then changes the database in one transaction.

use crate::auth::{require_admin, who};
use crate::clock::{now_ms, timestamp};
use crate::error::{Error, Result};
use crate::type_access;
use crate::validate;
use ember_common::identity::{Identity, Role};
use ember_proto::v1::volume_type_service_server::VolumeTypeService;
use ember_proto::v1::*;
use sqlx::{Row, SqliteConnection, SqlitePool};
use std::collections::HashMap;
use tonic::{Request, Response, Status};

/// The gRPC service.
pub struct VolumeTypes {
    db: SqlitePool,
}

impl VolumeTypes {
    /// Serves volume types from `db`.
    pub fn new(db: SqlitePool) -> Self {
        VolumeTypes { db }
    }
}

fn check_specs(specs: &HashMap<String, String>) -> Result<()> {
    check_each(specs)?;
    check_together(specs)
}

/// The checks of each spec on its own.
fn check_each(specs: &HashMap<String, String>) -> Result<()> {
    for (k, v) in specs {
        validate::spec_key("extra_specs", k)?;
        validate::spec_value("extra_specs", k, v)?;
    }
    Ok(())
}

/// The checks that concern several specs at once, run on a type's whole set.
fn check_together(specs: &HashMap<String, String>) -> Result<()> {
    front_end_qos(specs)?;
    crate::encryption::spec(specs).map_err(|message| Error::invalid("extra_specs", message))?;
    size_bounds(specs).map(drop)
}

/// Refuses to change how type `id` encrypts (its `encryption:` specs, `keys` being set or unset) while volumes of
/// it exist: their data is already encrypted, or not, the way the type said when they were made.
async fn refuse_encryption_change(conn: &mut SqliteConnection, id: &str, keys: &[&String]) -> Result<()> {
    if !keys.iter().any(|k| k.starts_with(crate::encryption::SCOPE)) {
        return Ok(());
    }
    let used: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM volumes WHERE volume_type_id = ?")
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    if used > 0 {
        return Err(Error::FailedPrecondition(format!(
            "type {id} has {used} volume(s); its encryption settings change only while it has none"
        )));
    }
    Ok(())
}

/// The sizes a type allows (`provisioning:min_vol_size`, `provisioning:max_vol_size`, GiB, as Cinder), checked.
pub fn size_bounds(specs: &HashMap<String, String>) -> Result<(u64, u64)> {
    let bound = |key: &str, default: u64| match specs.get(key) {
        None => Ok(default),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(Error::invalid("extra_specs", format!("{key}: {v:?} is not a whole number of GiB from 1"))),
        },
    };
    let (min, max) = (bound("provisioning:min_vol_size", 1)?, bound("provisioning:max_vol_size", u64::MAX)?);
    if min > max {
        return Err(Error::invalid(
            "extra_specs",
            format!("provisioning:min_vol_size {min} is above provisioning:max_vol_size {max}"),
        ));
    }
    Ok((min, max))
}

/// Checks that type `t` allows a volume of `size_gb` GiB (the request's `field`).
pub fn check_size(t: &VolumeType, field: &'static str, size_gb: u64) -> Result<()> {
    let (min, max) = size_bounds(&t.extra_specs)?;
    if size_gb < min || size_gb > max {
        let range = if max == u64::MAX { format!("at least {min}") } else { format!("{min} to {max}") };
        return Err(Error::invalid(field, format!("{size_gb} GiB: volume type {} allows {range} GiB", t.name)));
    }
    Ok(())
}

/// The front-end QoS limits of type `type_id`, as a compute agent takes them (`iotune`).
pub async fn disk_limits(conn: &mut SqliteConnection, type_id: &str) -> Result<HashMap<String, u64>> {
    Ok(front_end_qos(&load(conn, type_id).await?.extra_specs)?.into_iter().collect())
}

/// The front-end QoS limits (`qos:` extra specs) a type sets on its volumes' disks, checked.
pub fn front_end_qos(specs: &HashMap<String, String>) -> Result<std::collections::BTreeMap<String, u64>> {
    ember_common::qos::from_specs(specs).map_err(|e| Error::invalid("extra_specs", e))
}

/// Finds a type's id by id or name.
pub async fn resolve(conn: &mut SqliteConnection, id_or_name: &str) -> Result<String> {
    if id_or_name.is_empty() {
        return Err(Error::invalid("id_or_name", "must not be empty"));
    }
    sqlx::query_scalar("SELECT id FROM volume_types WHERE id = ?1 OR name = ?1")
        .bind(id_or_name)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| Error::not_found("volume type", id_or_name))
}

/// Reads a whole type.
pub async fn load(conn: &mut SqliteConnection, id: &str) -> Result<VolumeType> {
    let row =
        sqlx::query("SELECT id, name, description, is_default, created_at, is_public FROM volume_types WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| Error::not_found("volume type", id))?;
    let specs = sqlx::query("SELECT key, value FROM volume_type_extra_specs WHERE type_id = ?")
        .bind(id)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
        .collect();
    Ok(VolumeType {
        id: row.get(0),
        name: row.get(1),
        description: row.get(2),
        is_default: row.get::<i64, _>(3) != 0,
        created_at: Some(timestamp(row.get(4))),
        extra_specs: specs,
        is_public: row.get::<i64, _>(5) != 0,
    })
}

async fn name_taken(conn: &mut SqliteConnection, name: &str, except_id: &str) -> Result<bool> {
    Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM volume_types WHERE name = ? AND id != ?)")
        .bind(name)
        .bind(except_id)
        .fetch_one(&mut *conn)
        .await?)
}

async fn make_default(conn: &mut SqliteConnection, id: &str) -> Result<()> {
    sqlx::query("UPDATE volume_types SET is_default = 0 WHERE is_default = 1").execute(&mut *conn).await?;
    sqlx::query("UPDATE volume_types SET is_default = 1 WHERE id = ?").bind(id).execute(&mut *conn).await?;
    Ok(())
}

async fn upsert_specs(conn: &mut SqliteConnection, id: &str, specs: &HashMap<String, String>) -> Result<()> {
    for (k, v) in specs {
        sqlx::query(
            "INSERT INTO volume_type_extra_specs (type_id, key, value) VALUES (?, ?, ?) \
             ON CONFLICT (type_id, key) DO UPDATE SET value = excluded.value",
        )
        .bind(id)
        .bind(k)
        .bind(v)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

impl VolumeTypes {
    async fn create(&self, req: CreateVolumeTypeRequest) -> Result<VolumeType> {
        validate::required_name("name", &req.name)?;
        validate::text("description", &req.description, 255)?;
        check_specs(&req.extra_specs)?;
        if req.private && req.make_default {
            return Err(Error::invalid("private", "the default type must be public"));
        }
        let mut tx = crate::db::write(&self.db).await?;
        if name_taken(&mut tx, &req.name, "").await? {
            return Err(Error::AlreadyExists(format!("name: a volume type named {:?} already exists", req.name)));
        }
        let id = uuid::Uuid::new_v4().to_string();
        sqlx::query(
            "INSERT INTO volume_types (id, name, description, is_default, created_at, is_public) \
             VALUES (?, ?, ?, 0, ?, ?)",
        )
        .bind(&id)
        .bind(&req.name)
        .bind(&req.description)
        .bind(now_ms())
        .bind(!req.private)
        .execute(&mut *tx)
        .await?;
        upsert_specs(&mut tx, &id, &req.extra_specs).await?;
        if req.make_default {
            make_default(&mut tx, &id).await?;
        }
        let created = load(&mut tx, &id).await?;
        tx.commit().await?;
        tracing::info!(volume_type_id = %id, name = %req.name, "volume type created");
        Ok(created)
    }

    async fn update(&self, req: UpdateVolumeTypeRequest) -> Result<VolumeType> {
        if let Some(name) = &req.name {
            validate::required_name("name", name)?;
        }
        if let Some(d) = &req.description {
            validate::text("description", d, 255)?;
        }
        let mut tx = crate::db::write(&self.db).await?;
        let id = resolve(&mut tx, &req.id_or_name).await?;
        if let Some(name) = &req.name {
            if name_taken(&mut tx, name, &id).await? {
                return Err(Error::AlreadyExists(format!("name: a volume type named {name:?} already exists")));
            }
            let old = load(&mut tx, &id).await?.name;
            sqlx::query("UPDATE volume_types SET name = ? WHERE id = ?").bind(name).bind(&id).execute(&mut *tx).await?;
            if old != *name {
                crate::quota::rename_type(&mut tx, &old, name).await?;
            }
        }
        if let Some(d) = &req.description {
            sqlx::query("UPDATE volume_types SET description = ? WHERE id = ?")
                .bind(d)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(public) = req.is_public {
            sqlx::query("UPDATE volume_types SET is_public = ? WHERE id = ?")
                .bind(public)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
        if req.make_default {
            make_default(&mut tx, &id).await?;
        }
        let updated = load(&mut tx, &id).await?;
        // Every project must be able to use the type a create that names none gets (the transaction is dropped
        // if not).
        if updated.is_default && !updated.is_public {
            return Err(Error::invalid(
                "is_public",
                format!("{} is the default type, which must be public", updated.name),
            ));
        }
        tx.commit().await?;
        Ok(updated)
    }

    async fn set_specs(&self, req: SetExtraSpecsRequest) -> Result<VolumeType> {
        if req.extra_specs.is_empty() {
            return Err(Error::invalid("extra_specs", "must name at least one key"));
        }
        // Specs that concern one another are checked on the whole set below, once these are in.
        check_each(&req.extra_specs)?;
        let mut tx = crate::db::write(&self.db).await?;
        let id = resolve(&mut tx, &req.id_or_name).await?;
        refuse_encryption_change(&mut tx, &id, &req.extra_specs.keys().collect::<Vec<_>>()).await?;
        upsert_specs(&mut tx, &id, &req.extra_specs).await?;
        let updated = load(&mut tx, &id).await?;
        // The specs must hold together with those the type already had (the transaction is dropped if not).
        check_together(&updated.extra_specs)?;
        tx.commit().await?;
        Ok(updated)
    }

    async fn unset_specs(&self, req: UnsetExtraSpecsRequest) -> Result<VolumeType> {
        if req.keys.is_empty() {
            return Err(Error::invalid("keys", "must name at least one key"));
        }
        for k in &req.keys {
            validate::spec_key("keys", k)?;
        }
        let mut tx = crate::db::write(&self.db).await?;
        let id = resolve(&mut tx, &req.id_or_name).await?;
        refuse_encryption_change(&mut tx, &id, &req.keys.iter().collect::<Vec<_>>()).await?;
        for k in &req.keys {
            sqlx::query("DELETE FROM volume_type_extra_specs WHERE type_id = ? AND key = ?")
                .bind(&id)
                .bind(k)
                .execute(&mut *tx)
                .await?;
        }
        let updated = load(&mut tx, &id).await?;
        // What is left must still hold together (unsetting `encryption:provider` alone leaves a cipher orphaned).
        check_together(&updated.extra_specs)?;
        tx.commit().await?;
        Ok(updated)
    }

    async fn delete(&self, req: DeleteVolumeTypeRequest) -> Result<()> {
        let mut tx = crate::db::write(&self.db).await?;
        let id = resolve(&mut tx, &req.id_or_name).await?;
        let t = load(&mut tx, &id).await?;
        if t.is_default {
            return Err(Error::FailedPrecondition(format!(
                "volume type {} is the default; make another type the default first",
                t.name
            )));
        }
        // A volume being retyped by migration counts too: it takes this type when it arrives.
        let in_use: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM volumes WHERE volume_type_id = ?1) + (SELECT COUNT(*) FROM operations \
             WHERE state = 'running' AND kind = 'migrate_volume' AND json_extract(payload, '$.retype_to.id') = ?1)",
        )
        .bind(&id)
        .fetch_one(&mut *tx)
        .await?;
        if in_use > 0 {
            return Err(Error::FailedPrecondition(format!("volume type {} is in use by {in_use} volume(s)", t.name)));
        }
        sqlx::query("DELETE FROM volume_types WHERE id = ?").bind(&id).execute(&mut *tx).await?;
        crate::quota::forget_type(&mut tx, &t.name).await?;
        tx.commit().await?;
        tracing::info!(volume_type_id = %id, "volume type deleted");
        Ok(())
    }

    async fn list(&self, who: &Identity) -> Result<Vec<VolumeType>> {
        let mut conn = self.db.acquire().await?;
        let ids: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT id FROM volume_types t WHERE {} ORDER BY name",
            type_access::VISIBLE_SQL
        )))
        .bind(who.role == Role::Admin)
        .bind(who.project.as_deref().unwrap_or_default())
        .fetch_all(&mut *conn)
        .await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(load(&mut conn, &id).await?);
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl VolumeTypeService for VolumeTypes {
    async fn create_volume_type(&self, req: Request<CreateVolumeTypeRequest>) -> Result<Response<VolumeType>, Status> {
        require_admin(&req, "change volume types")?;
        Ok(Response::new(self.create(req.into_inner()).await?))
    }

    async fn get_volume_type(&self, req: Request<GetVolumeTypeRequest>) -> Result<Response<VolumeType>, Status> {
        let who = who(&req)?;
        let mut conn = self.db.acquire().await.map_err(Error::from)?;
        let id = type_access::resolve_for(&mut conn, &who, &req.get_ref().id_or_name).await?;
        Ok(Response::new(load(&mut conn, &id).await?))
    }

    async fn list_volume_types(
        &self,
        req: Request<ListVolumeTypesRequest>,
    ) -> Result<Response<ListVolumeTypesResponse>, Status> {
        let who = who(&req)?;
        Ok(Response::new(ListVolumeTypesResponse { volume_types: self.list(&who).await? }))
    }

    async fn update_volume_type(&self, req: Request<UpdateVolumeTypeRequest>) -> Result<Response<VolumeType>, Status> {
        require_admin(&req, "change volume types")?;
        Ok(Response::new(self.update(req.into_inner()).await?))
    }

    async fn set_extra_specs(&self, req: Request<SetExtraSpecsRequest>) -> Result<Response<VolumeType>, Status> {
        require_admin(&req, "change volume types")?;
        Ok(Response::new(self.set_specs(req.into_inner()).await?))
    }

    async fn unset_extra_specs(&self, req: Request<UnsetExtraSpecsRequest>) -> Result<Response<VolumeType>, Status> {
        require_admin(&req, "change volume types")?;
        Ok(Response::new(self.unset_specs(req.into_inner()).await?))
    }

    async fn delete_volume_type(
        &self,
        req: Request<DeleteVolumeTypeRequest>,
    ) -> Result<Response<DeleteVolumeTypeResponse>, Status> {
        require_admin(&req, "change volume types")?;
        self.delete(req.into_inner()).await?;
        Ok(Response::new(DeleteVolumeTypeResponse {}))
    }

    async fn add_type_access(&self, req: Request<TypeAccessRequest>) -> Result<Response<TypeAccessResponse>, Status> {
        require_admin(&req, "change volume types")?;
        Ok(Response::new(type_access::change(&self.db, req.into_inner(), true).await?))
    }

    async fn remove_type_access(
        &self,
        req: Request<TypeAccessRequest>,
    ) -> Result<Response<TypeAccessResponse>, Status> {
        require_admin(&req, "change volume types")?;
        Ok(Response::new(type_access::change(&self.db, req.into_inner(), false).await?))
    }

    async fn list_type_access(
        &self,
        req: Request<ListTypeAccessRequest>,
    ) -> Result<Response<TypeAccessResponse>, Status> {
        require_admin(&req, "see who may use a volume type")?;
        let mut conn = self.db.acquire().await.map_err(Error::from)?;
        let id = resolve(&mut conn, &req.get_ref().id_or_name).await?;
        Ok(Response::new(type_access::granted(&mut conn, &id).await?))
    }
}
