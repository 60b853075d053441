//! Formatting a new volume as a LUKS container for an encrypted volume type, with `qemu-img create -f luks` (QEMU's
//! own LUKS, which compute hosts open in QEMU with the same key; nothing here ever decrypts). The container
//! fills the volume exactly: its header takes the first `ember_common::luks::header_bytes` and guests see the rest.
//! The volume is a file (file backends) or a block device (an LV): qemu-img formats either in place.
//!
//! The key reaches qemu-img through a private file in the agent's state directory (never a pool, never argv),
//! removed as soon as qemu-img has run. PBKDF2 is tuned to 100 ms rather than LUKS's usual 2 s: the passphrase
//! is 256 random bits, which no amount of key stretching makes harder to guess, and every attach pays the cost.
//!
//! qemu-img times PBKDF2 by the thread's CPU clock in milliseconds, starting with 32768 iterations. With SHA-256
//! (SHA-NI) those can take under a millisecond, and qemu-img then gives up with "Unable to get accurate CPU
//! usage" (14 runs in 30 on this machine kind). PBKDF2 here uses SHA-512, which takes long enough (0 failures in
//! 130 runs); should the refusal still come, it comes before anything is written, and qemu-img runs again.

use crate::error::{AgentError, Result};
use ember_common::runner;
use ember_proto::agent::v1::LuksFormat;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

/// The first bytes of every LUKS header.
pub const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";

/// How long qemu-img may take to write a header.
const FORMAT_TIMEOUT: Duration = Duration::from_secs(60);
/// How many times qemu-img is run when its PBKDF2 benchmark cannot time itself (see the module documentation).
const FORMAT_ATTEMPTS: usize = 8;

/// The key length (bytes) of an XTS `cipher_alg`: two AES keys.
fn key_bytes(cipher_alg: &str) -> Result<u64> {
    match cipher_alg {
        "aes-128" => Ok(32),
        "aes-256" => Ok(64),
        other => Err(AgentError::InvalidArgument {
            field: "luks.cipher_alg",
            message: format!("{other:?} is not aes-128 or aes-256"),
        }),
    }
}

/// Whether the file or device at `path` starts with a LUKS header.
pub fn is_formatted(path: &Path) -> Result<bool> {
    let mut head = [0u8; 6];
    let mut file = std::fs::File::open(path).map_err(AgentError::io(format!("opening {}", path.display())))?;
    Ok(file.read_exact(&mut head).is_ok() && &head == MAGIC)
}

/// The size of the file or block device at `path` (a block device's metadata says 0 bytes; its end does not).
fn size_of(path: &Path) -> Result<u64> {
    let mut file = std::fs::File::open(path).map_err(AgentError::io(format!("opening {}", path.display())))?;
    file.seek(SeekFrom::End(0)).map_err(AgentError::io("reading the formatted size"))
}

/// Makes the `size` bytes at `path` a LUKS container keyed by `luks.passphrase`. A volume already formatted (a
/// repeated create) is left as it is: formatting again would lose its data.
pub async fn format(path: &Path, size: u64, luks: &LuksFormat, state_dir: &Path) -> Result<()> {
    let header = ember_common::luks::header_bytes(key_bytes(&luks.cipher_alg)?);
    if luks.passphrase.len() < 32 {
        return Err(AgentError::InvalidArgument { field: "luks.passphrase", message: "too short".into() });
    }
    if is_formatted(path)? {
        return Ok(());
    }
    if size <= header {
        return Err(AgentError::FailedPrecondition(format!("{size} bytes leave no room after a LUKS header")));
    }
    let key_file = state_dir.join(format!("luks-{}.key", uuid::Uuid::new_v4()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_file)
        .map_err(AgentError::io(format!("creating {}", key_file.display())))?;
    file.write_all(luks.passphrase.as_bytes()).map_err(AgentError::io("writing the key file"))?;
    drop(file);
    let secret = format!("secret,id=sec0,file={}", key_file.display());
    let options = format!(
        "key-secret=sec0,cipher-alg={},cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha512,iter-time=100",
        luks.cipher_alg
    );
    let (target, payload) = (path.to_string_lossy(), (size - header).to_string());
    let argv = ["create", "-q", "-f", "luks", "--object", &secret, "-o", &options, &target, &payload];
    let mut made = runner::run("qemu-img", &argv, FORMAT_TIMEOUT).await;
    for _ in 1..FORMAT_ATTEMPTS {
        match &made {
            Err(runner::CommandError::Failed { stderr, .. }) if stderr.contains("Unable to get accurate CPU usage") => {
                made = runner::run("qemu-img", &argv, FORMAT_TIMEOUT).await;
            }
            _ => break,
        }
    }
    let _ = std::fs::remove_file(&key_file);
    made?;
    let now = size_of(path)?;
    if now != size || !is_formatted(path)? {
        return Err(AgentError::FailedPrecondition(format!(
            "the LUKS container of {} takes {now} bytes, not the volume's {size}",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn formats_a_volume_file_to_its_exact_size_once() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("volume");
        let size = 64u64 << 20;
        std::fs::File::create(&volume).unwrap().set_len(size).unwrap();
        let luks = LuksFormat { passphrase: "ab".repeat(32), cipher_alg: "aes-256".into() };
        format(&volume, size, &luks, dir.path()).await.unwrap();
        assert!(is_formatted(&volume).unwrap());
        assert_eq!(std::fs::metadata(&volume).unwrap().len(), size);
        let keys: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().filter(|e| e.path() != volume).collect();
        assert!(keys.is_empty(), "the key file is gone: {keys:?}");
        // A repeat leaves the container (and so its data) alone, even with another key.
        let header = std::fs::read(&volume).unwrap()[..4096].to_vec();
        let other = LuksFormat { passphrase: "cd".repeat(32), ..luks.clone() };
        format(&volume, size, &other, dir.path()).await.unwrap();
        assert_eq!(std::fs::read(&volume).unwrap()[..4096], header[..]);
        let bad = LuksFormat { cipher_alg: "des".into(), ..luks };
        assert!(format(&dir.path().join("x"), size, &bad, dir.path()).await.is_err());
    }

    /// A loop device, detached when dropped.
    struct LoopDevice(String);

    impl LoopDevice {
        fn attach(file: &Path) -> LoopDevice {
            let out = std::process::Command::new("losetup").args(["-f", "--show"]).arg(file).output().unwrap();
            assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
            LoopDevice(String::from_utf8(out.stdout).unwrap().trim().to_string())
        }
    }

    impl Drop for LoopDevice {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup").args(["-d", &self.0]).status();
        }
    }

    /// Runs qemu-io on the LUKS container at `device`, opened with `passphrase`, and returns what it printed.
    fn qemu_io(dir: &Path, device: &str, passphrase: &str, commands: &[&str]) -> String {
        let key = dir.join("qemu-io.key");
        std::fs::write(&key, passphrase).unwrap();
        let mut cmd = std::process::Command::new("qemu-io");
        cmd.args(["--object", &format!("secret,id=sec0,file={}", key.display()), "--image-opts"]);
        cmd.arg(format!("driver=luks,key-secret=sec0,file.filename={device}"));
        for c in commands {
            cmd.args(["-c", c]);
        }
        let out = cmd.output().unwrap();
        let printed = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "qemu-io: {printed}");
        printed
    }

    /// An LV is a block device: its metadata gives no size, and qemu-img must format it in place.
    #[tokio::test]
    async fn formats_a_block_device_in_place_and_its_key_opens_it() {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("disk");
        let size = 64u64 << 20;
        std::fs::File::create(&backing).unwrap().set_len(size).unwrap();
        let device = LoopDevice::attach(&backing);
        let luks = LuksFormat { passphrase: "ef".repeat(32), cipher_alg: "aes-256".into() };
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        format(Path::new(&device.0), size, &luks, &state).await.unwrap();
        assert!(is_formatted(Path::new(&device.0)).unwrap());
        assert_eq!(std::fs::metadata(&backing).unwrap().len(), size, "the device was not grown or shrunk");
        assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0, "the key file is gone");
        // The payload fills the rest of the device, and data written through the key reads back through it.
        let header = ember_common::luks::header_bytes(64);
        let printed = qemu_io(dir.path(), &device.0, &luks.passphrase, &["write -P 0x5a 0 1M", "length"]);
        let payload_mib = format!("{:.3} MiB", (size - header) as f64 / f64::from(1 << 20));
        assert!(printed.contains(&payload_mib), "payload of {payload_mib}: {printed}");
        qemu_io(dir.path(), &device.0, &luks.passphrase, &["read -P 0x5a 0 1M"]);
        // What reached the device is ciphertext.
        let raw = std::fs::read(&backing).unwrap();
        let payload = &raw[header as usize..header as usize + (1 << 20)];
        assert!(payload.iter().filter(|&&b| b == 0x5a).count() < 16384, "the payload is not the plaintext");
    }
}
