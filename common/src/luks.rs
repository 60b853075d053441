//! Facts of QEMU's LUKS1 format shared by the coordinator (which records how much of an encrypted volume the
//! guest does not see) and the storage agent (which formats volumes to fill them exactly).

/// Bytes of the LUKS1 header QEMU writes for a key of `key_bytes`: 4 KiB of header, then 8 key slots of 4000
/// anti-forensic stripes of the key each, every slot 4 KiB-aligned; the payload starts right after.
pub fn header_bytes(key_bytes: u64) -> u64 {
    let slot = (key_bytes * 4000).div_ceil(4096) * 4096;
    4096 + 8 * slot
}

#[cfg(test)]
mod tests {
    #[test]
    fn header_sizes_match_what_qemu_img_writes() {
        // qemu-img 7.2 `create -f luks` of a 1 GiB payload with aes-256-xts made a file of 1075810304 bytes.
        assert_eq!(super::header_bytes(64), 1075810304 - (1 << 30));
        assert_eq!(super::header_bytes(32), 4096 + 8 * 131072);
    }
}
