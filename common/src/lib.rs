//! Pieces every ember daemon and the CLI share: identities carried in certificates and the mTLS set-up,
//! the certificate authority, server bootstrap (reflection, health, graceful shutdown), logging, config
//! loading, the one runner for external commands, and the agents' registration loop.

pub mod access_log;
pub mod agent;
pub mod certs;
pub mod config;
pub mod direct_io;
pub mod failpoint;
pub mod identity;
pub mod image_source;
pub mod logging;
pub mod luks;
pub mod nfs;
pub mod own_certificate;
pub mod qos;
pub mod revocation;
pub mod revoked_calls;
pub mod runner;
pub mod server;
pub mod stub;
pub mod tls;
pub mod tls_incoming;

/// This build's software version, reported at registration.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Installs rustls' ring crypto provider as the process default. Call first thing in `main`: with no
/// provider (or two) installed, the TLS stack panics at the first handshake.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Makes every file and directory this process creates from now on private to its user (umask 077). Volume and
/// snapshot files, backup chunks and manifests, the database and an agent's export state hold tenants' data and
/// secrets (CHAP passwords, wrapped keys), which no other local user of the node may read. Call first thing in
/// `main` of the coordinator and of the storage and backup agents (not the compute agent: QEMU, running as
/// another user, must read what it writes for a guest).
pub fn private_files() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}
