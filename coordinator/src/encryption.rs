//! Encrypted volumes (Cinder's volume encryption types, front end, LUKS): a volume type whose extra specs set
//! `encryption:provider = luks` makes its volumes LUKS containers. The data is encrypted and decrypted by QEMU
//! on the compute host, so storage nodes, their disks, migrations and backups only ever hold ciphertext.
//!
//! Each volume has its own random 256-bit passphrase. The coordinator keeps it (in place of Cinder's Barbican)
//! wrapped with AES-256-GCM under a master key held in a file beside the database (`key_file`, created 0600 on
//! first start), with the volume's id as associated data, so a wrapped key copied onto another row does not
//! open. It hands the passphrase to a storage agent to format the volume and to a compute agent to open it, both
//! over mutual TLS, and to nothing else. Losing the master key loses every encrypted volume's data: back it up
//! with the database.

use crate::error::{Error, Result};
use ember_proto::agent::v1::WrappedKey;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The extra-spec scope of encryption settings.
pub const SCOPE: &str = "encryption:";

/// How a type's volumes are encrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// dm-crypt style cipher name (`aes-xts-plain64`, the only one offered).
    pub cipher: String,
    /// Key size in bits: 256 (AES-128-XTS) or 512 (AES-256-XTS).
    pub key_size: u32,
}

/// The encryption a type's extra specs ask for: `None` without `encryption:provider`; an error naming what is
/// wrong otherwise.
pub fn spec(extra_specs: &HashMap<String, String>) -> std::result::Result<Option<Spec>, String> {
    let get = |k: &str| extra_specs.get(&format!("{SCOPE}{k}")).map(|v| v.trim().to_string());
    for key in extra_specs.keys().filter_map(|k| k.strip_prefix(SCOPE)) {
        if !matches!(key, "provider" | "cipher" | "key_size" | "control_location") {
            return Err(format!("{SCOPE}{key} is not an encryption setting (provider, cipher, key_size)"));
        }
    }
    let Some(provider) = get("provider") else {
        return match extra_specs.keys().find(|k| k.starts_with(SCOPE)) {
            Some(k) => Err(format!("{k} needs {SCOPE}provider = luks")),
            None => Ok(None),
        };
    };
    if provider != "luks" {
        return Err(format!("{SCOPE}provider {provider:?} is not supported; luks is"));
    }
    let cipher = get("cipher").unwrap_or_else(|| "aes-xts-plain64".into());
    if cipher != "aes-xts-plain64" {
        return Err(format!("{SCOPE}cipher {cipher:?} is not supported; aes-xts-plain64 is"));
    }
    let key_size = match get("key_size").as_deref() {
        None | Some("256") => 256,
        Some("512") => 512,
        Some(other) => return Err(format!("{SCOPE}key_size {other:?} must be 256 or 512")),
    };
    match get("control_location").as_deref() {
        None | Some("front-end") => {}
        Some(other) => return Err(format!("{SCOPE}control_location {other:?}: only front-end is supported")),
    }
    Ok(Some(Spec { cipher, key_size }))
}

impl Spec {
    /// QEMU's `cipher-alg` for the key size (XTS splits the key in two).
    pub fn qemu_cipher_alg(&self) -> &'static str {
        if self.key_size == 512 { "aes-256" } else { "aes-128" }
    }

    /// Bytes of the LUKS1 header QEMU writes for this key size.
    pub fn header_bytes(&self) -> u64 {
        ember_common::luks::header_bytes(u64::from(self.key_size / 8))
    }
}

/// The master key that wraps every volume's passphrase.
pub struct MasterKey {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl MasterKey {
    /// Reads the 32-byte key from `path`, creating it (mode 0600) when it does not exist.
    pub fn load_or_create(path: &Path) -> std::result::Result<MasterKey, String> {
        let rng = SystemRandom::new();
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut fresh = [0u8; 32];
                rng.fill(&mut fresh).map_err(|_| "no randomness for the master key".to_string())?;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| format!("creating {}: {e}", path.display()))?;
                file.write_all(&fresh)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                tracing::warn!(key_file = %path.display(), "master key created: back it up with the database");
                fresh.to_vec()
            }
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        let key = UnboundKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| format!("{} must hold exactly 32 bytes", path.display()))?;
        Ok(MasterKey { key: LessSafeKey::new(key), rng })
    }

    /// A fresh random passphrase: 32 bytes, hex-encoded (what QEMU's secret object reads).
    pub fn new_passphrase(&self) -> Result<String> {
        let mut raw = [0u8; 32];
        self.rng.fill(&mut raw).map_err(|_| Error::Keys("no randomness for a volume key".into()))?;
        Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// `passphrase` sealed for `owner`: nonce then ciphertext and tag.
    pub fn wrap(&self, owner: &str, passphrase: &str) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| Error::Keys("no randomness for a nonce".into()))?;
        let mut sealed = passphrase.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(owner.as_bytes()), &mut sealed)
            .map_err(|_| Error::Keys("sealing a volume key".into()))?;
        Ok([nonce.as_slice(), &sealed].concat())
    }

    /// The passphrase `wrap` sealed for `owner`.
    pub fn unwrap(&self, owner: &str, wrapped: &[u8]) -> Result<String> {
        let broken = || Error::Keys(format!("the key of {owner} does not open with this master key"));
        if wrapped.len() < NONCE_LEN {
            return Err(broken());
        }
        let (nonce, sealed) = wrapped.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| broken())?;
        let mut sealed = sealed.to_vec();
        let plain = self.key.open_in_place(nonce, Aad::from(owner.as_bytes()), &mut sealed).map_err(|_| broken())?;
        String::from_utf8(plain.to_vec()).map_err(|_| broken())
    }
}

/// A volume's (or backup's) key as stored: the libvirt secret UUID compute hosts file the passphrase under, the
/// passphrase, and the size of the LUKS header it goes with.
#[derive(Debug, Clone)]
pub struct VolumeKey {
    /// UUID of the passphrase's libvirt secret.
    pub secret_uuid: String,
    /// The passphrase.
    pub passphrase: String,
    /// Bytes of the LUKS header before the payload (fixed for the life of the data: a copy keeps its source's).
    pub header_bytes: u64,
}

/// Records a new random key for `owner` (a volume id, to be formatted as `spec` says), in `conn`'s transaction.
pub async fn create_key(
    conn: &mut sqlx::SqliteConnection,
    master: &MasterKey,
    owner: &str,
    spec: &Spec,
) -> Result<VolumeKey> {
    let key = VolumeKey {
        secret_uuid: uuid::Uuid::new_v4().to_string(),
        passphrase: master.new_passphrase()?,
        header_bytes: spec.header_bytes(),
    };
    store(conn, master, owner, &key).await?;
    Ok(key)
}

async fn store(conn: &mut sqlx::SqliteConnection, master: &MasterKey, owner: &str, key: &VolumeKey) -> Result<()> {
    let wrapped = master.wrap(owner, &key.passphrase)?;
    let sealed = WrappedKey { wrapped, secret_uuid: key.secret_uuid.clone(), header_bytes: key.header_bytes };
    store_sealed(conn, owner, &sealed).await
}

/// Records `owner`'s key as sealed, replacing any it had.
async fn store_sealed(conn: &mut sqlx::SqliteConnection, owner: &str, key: &WrappedKey) -> Result<()> {
    sqlx::query(
        "INSERT OR REPLACE INTO volume_keys (owner_id, secret_uuid, wrapped, header_bytes, created_at) \
         VALUES (?, ?, ?, ?, ?)",
    )
    .bind(owner)
    .bind(&key.secret_uuid)
    .bind(&key.wrapped)
    .bind(key.header_bytes as i64)
    .bind(crate::clock::now_ms())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The key of `owner`, if it has one.
pub async fn load(conn: &mut sqlx::SqliteConnection, master: &MasterKey, owner: &str) -> Result<Option<VolumeKey>> {
    sealed(conn, owner)
        .await?
        .map(|k| {
            let passphrase = master.unwrap(owner, &k.wrapped)?;
            Ok(VolumeKey { secret_uuid: k.secret_uuid, passphrase, header_bytes: k.header_bytes })
        })
        .transpose()
}

/// The key of `owner` as stored, still sealed for it: what a backup's manifest records, so that the key can be
/// adopted with the backup (see [`adopt_sealed`]).
pub async fn sealed(conn: &mut sqlx::SqliteConnection, owner: &str) -> Result<Option<WrappedKey>> {
    let row: Option<(String, Vec<u8>, i64)> =
        sqlx::query_as("SELECT secret_uuid, wrapped, header_bytes FROM volume_keys WHERE owner_id = ?")
            .bind(owner)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(row.map(|(secret_uuid, wrapped, header)| WrappedKey { wrapped, secret_uuid, header_bytes: header as u64 }))
}

/// Records, as it is, the sealed key a repository's manifest carries for backup `owner`, and says whether it
/// opens with this coordinator's master key. One that does not is recorded all the same: the backup then counts
/// as encrypted, and its restores are refused, naming the key, rather than making a plain volume of
/// ciphertext.
pub async fn adopt_sealed(
    conn: &mut sqlx::SqliteConnection,
    master: &MasterKey,
    owner: &str,
    key: &WrappedKey,
) -> Result<bool> {
    store_sealed(conn, owner, key).await?;
    Ok(master.unwrap(owner, &key.wrapped).is_ok())
}

/// Gives `to` the same passphrase as `from` (a clone, a restore), under a secret UUID of its own. False when
/// `from` has no key. A key sealed under another master key (a backup adopted from a repository) refuses the
/// copy, naming `from`.
pub async fn copy_key(conn: &mut sqlx::SqliteConnection, master: &MasterKey, from: &str, to: &str) -> Result<bool> {
    let key = load(conn, master, from).await.map_err(|e| match e {
        Error::Keys(_) => Error::FailedPrecondition(format!(
            "the key of {from} does not open with this coordinator's master key (key_file): it was sealed under \
             another; use it where that master key is, or put that key file here"
        )),
        other => other,
    })?;
    let Some(key) = key else { return Ok(false) };
    let copy = VolumeKey { secret_uuid: uuid::Uuid::new_v4().to_string(), ..key };
    store(conn, master, to, &copy).await?;
    Ok(true)
}

/// Whether `owner` (a volume or backup id) has a key: its data is encrypted.
pub async fn has_key(conn: &mut sqlx::SqliteConnection, owner: &str) -> Result<bool> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM volume_keys WHERE owner_id = ?")
        .bind(owner)
        .fetch_one(&mut *conn)
        .await?;
    Ok(n > 0)
}

/// Refuses `what` (an action, e.g. "unmanaged") on volume `id` when it is encrypted, saying `why`.
pub async fn refuse_if_encrypted(conn: &mut sqlx::SqliteConnection, id: &str, what: &str, why: &str) -> Result<()> {
    if has_key(conn, id).await? {
        return Err(Error::FailedPrecondition(format!("volume {id} is encrypted and cannot be {what}: {why}")));
    }
    Ok(())
}

/// Before a restore of backup `backup_id` onto volume `volume_id`: encrypted data goes only onto an encrypted
/// volume, which takes the backup's key (the restore replaces all its ciphertext), and plain data only onto a
/// plain one.
pub async fn key_for_restore(
    conn: &mut sqlx::SqliteConnection,
    master: &MasterKey,
    backup_id: &str,
    volume_id: &str,
) -> Result<()> {
    match (has_key(conn, backup_id).await?, has_key(conn, volume_id).await?) {
        (true, true) => copy_key(conn, master, backup_id, volume_id).await.map(drop),
        (false, false) => Ok(()),
        (true, false) => Err(Error::FailedPrecondition(format!(
            "backup {backup_id} holds encrypted data, and volume {volume_id} is not encrypted; restore it to a new \
             volume of an encrypted type"
        ))),
        (false, true) => Err(Error::FailedPrecondition(format!(
            "backup {backup_id} holds plain data, which would not open as volume {volume_id}'s LUKS container"
        ))),
    }
}

/// Forgets the key of `owner` (its volume or backup is gone).
pub async fn delete_key(conn: &mut sqlx::SqliteConnection, owner: &str) -> Result<()> {
    sqlx::query("DELETE FROM volume_keys WHERE owner_id = ?").bind(owner).execute(&mut *conn).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn reads_and_checks_encryption_specs() {
        assert_eq!(spec(&specs(&[("volume_backend_name", "x")])), Ok(None));
        let luks = spec(&specs(&[("encryption:provider", "luks")])).unwrap().unwrap();
        assert_eq!((luks.cipher.as_str(), luks.key_size, luks.qemu_cipher_alg()), ("aes-xts-plain64", 256, "aes-128"));
        assert_eq!(luks.header_bytes(), 4096 + 8 * 131072);
        let big = spec(&specs(&[("encryption:provider", "luks"), ("encryption:key_size", "512")])).unwrap().unwrap();
        assert_eq!(big.qemu_cipher_alg(), "aes-256");
        // qemu-img 7.2 wrote 1075810304 bytes for a 1 GiB payload with aes-256-xts.
        assert_eq!(big.header_bytes(), 1075810304 - (1 << 30));
        for bad in [
            vec![("encryption:provider", "plain")],
            vec![("encryption:cipher", "aes-xts-plain64")],
            vec![("encryption:provider", "luks"), ("encryption:key_size", "128")],
            vec![("encryption:provider", "luks"), ("encryption:cipher", "aes-cbc-essiv:sha256")],
            vec![("encryption:provider", "luks"), ("encryption:control_location", "back-end")],
            vec![("encryption:provider", "luks"), ("encryption:keysize", "256")],
        ] {
            assert!(spec(&specs(&bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_wrapped_key_opens_only_for_its_owner_and_master_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let master = MasterKey::load_or_create(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let passphrase = master.new_passphrase().unwrap();
        assert_eq!(passphrase.len(), 64);
        let wrapped = master.wrap("vol-1", &passphrase).unwrap();
        assert!(!wrapped.windows(16).any(|w| passphrase.as_bytes().windows(16).any(|p| p == w)), "sealed");
        assert_eq!(master.unwrap("vol-1", &wrapped).unwrap(), passphrase);
        assert!(master.unwrap("vol-2", &wrapped).is_err(), "bound to its owner");
        let again = MasterKey::load_or_create(&path).unwrap();
        assert_eq!(again.unwrap("vol-1", &wrapped).unwrap(), passphrase, "the file keeps the key");
        std::fs::write(dir.path().join("other.key"), [7u8; 32]).unwrap();
        let other = MasterKey::load_or_create(&dir.path().join("other.key")).unwrap();
        assert!(other.unwrap("vol-1", &wrapped).is_err());
    }
}
