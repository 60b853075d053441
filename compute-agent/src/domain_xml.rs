//! Libvirt XML the agent writes (disks, secrets) and reads (a domain's disks). Pure functions: every value
//! that goes into XML is escaped, and only ids, IQNs and portals from the storage agent ever get there.

/// How a disk reaches QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// QEMU's own iSCSI initiator; the CHAP secret is a libvirt secret with usage `secret_usage`.
    IscsiNetwork {
        /// `ip:port`.
        portal: String,
        /// Target IQN.
        iqn: String,
        /// LUN.
        lun: u32,
        /// CHAP user.
        username: String,
        /// Usage name of the libvirt secret holding the CHAP password.
        secret_usage: String,
        /// The host's initiator IQN (targets with IQN ACLs check it).
        initiator: String,
    },
    /// A host block device (kernel iSCSI).
    Block(String),
    /// A file (a volume on an NFS share or a local directory).
    File(String),
}

impl DiskSource {
    /// What the source points at, in the form [`disks`] reads back from a domain's XML, so the two compare.
    pub fn identity(&self) -> String {
        match self {
            DiskSource::IscsiNetwork { portal, iqn, lun, .. } => {
                let (host, port) = portal.rsplit_once(':').unwrap_or((portal, "3260"));
                format!("iscsi://{host}:{port}/{iqn}/{lun}")
            }
            DiskSource::Block(dev) => format!("block:{dev}"),
            DiskSource::File(path) => format!("file:{path}"),
        }
    }
}

/// A disk to attach.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Where its data is.
    pub source: DiskSource,
    /// Guest device name (`vdb`, …): a hint to the guest, which names disks in probe order.
    pub target: String,
    /// `<serial>`: the volume id (the guest sees its first 20 bytes).
    pub serial: String,
    /// Attach read-only.
    pub read_only: bool,
    /// Front-end QoS limits by `<iotune>` element name (checked against `ember_common::qos::LIMITS`).
    pub iotune: std::collections::BTreeMap<String, u64>,
    /// For an encrypted (LUKS) volume: the UUID of the libvirt secret holding its passphrase; empty for plain.
    pub luks_secret: String,
}

/// Escapes text for an XML attribute or element.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// The `<disk>` element: raw, no host cache (the volume's consistency must not depend on the compute host's
/// page cache), discard passed through, serial = volume id.
pub fn disk_xml(d: &DiskSpec) -> String {
    let (kind, source) = match &d.source {
        DiskSource::IscsiNetwork { portal, iqn, lun, username, secret_usage, initiator } => {
            let (host, port) = portal.rsplit_once(':').unwrap_or((portal, "3260"));
            let initiator = if initiator.is_empty() {
                String::new()
            } else {
                format!("\n    <initiator><iqn name='{}'/></initiator>", escape(initiator))
            };
            (
                "network",
                format!(
                    "<source protocol='iscsi' name='{}/{lun}'>\n    <host name='{}' port='{}'/>\n    \
                     <auth username='{}'><secret type='iscsi' usage='{}'/></auth>{initiator}\n  </source>",
                    escape(iqn),
                    escape(host),
                    escape(port),
                    escape(username),
                    escape(secret_usage)
                ),
            )
        }
        DiskSource::Block(dev) => ("block", format!("<source dev='{}'/>", escape(dev))),
        DiskSource::File(path) => ("file", format!("<source file='{}'/>", escape(path))),
    };
    let readonly = if d.read_only { "\n  <readonly/>" } else { "" };
    // QEMU opens the LUKS container itself; the guest sees the decrypted payload.
    let encryption = if d.luks_secret.is_empty() {
        String::new()
    } else {
        format!(
            "\n  <encryption format='luks'><secret type='passphrase' uuid='{}'/></encryption>",
            escape(&d.luks_secret)
        )
    };
    // Element names come from the fixed list only: a name is not text that escaping could make safe.
    let limits: String = d
        .iotune
        .iter()
        .filter(|(name, _)| ember_common::qos::LIMITS.contains(&name.as_str()))
        .map(|(name, value)| format!("\n    <{name}>{value}</{name}>"))
        .collect();
    let iotune = if limits.is_empty() { String::new() } else { format!("\n  <iotune>{limits}\n  </iotune>") };
    format!(
        "<disk type='{kind}' device='disk'>\n  <driver name='qemu' type='raw' cache='none' discard='unmap'/>\n  \
         {source}\n  <target dev='{}' bus='virtio'/>\n  <serial>{}</serial>{readonly}{iotune}{encryption}\n</disk>\n",
        escape(&d.target),
        escape(&d.serial)
    )
}

/// A private, persistent passphrase secret for a LUKS volume, its usage the volume's name (`ember-luks-<id>`);
/// its value is set separately, never in XML.
pub fn luks_secret_xml(uuid: &str, volume_id: &str) -> String {
    format!(
        "<secret ephemeral='no' private='yes'>\n  <uuid>{}</uuid>\n  <usage type='volume'><volume>ember-luks-{}</volume></usage>\n</secret>\n",
        escape(uuid),
        escape(volume_id)
    )
}

/// A private, persistent iSCSI secret with a usage name (its value is set separately, never in XML).
pub fn secret_xml(uuid: &str, usage: &str) -> String {
    format!(
        "<secret ephemeral='no' private='yes'>\n  <uuid>{}</uuid>\n  <usage type='iscsi'><target>{}</target></usage>\n</secret>\n",
        escape(uuid),
        escape(usage)
    )
}

/// One disk of a domain, as its XML shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    /// Guest device name.
    pub target: String,
    /// `<serial>`, when set.
    pub serial: String,
    /// What its `<source>` points at, as [`DiskSource::identity`] writes it (empty for a disk without one).
    pub source: String,
}

/// The identity of a `<disk>` element's source (see [`DiskSource::identity`]).
fn source_identity(disk: roxmltree::Node) -> String {
    let Some(source) = disk.children().find(|c| c.has_tag_name("source")) else { return String::new() };
    match disk.attribute("type") {
        Some("network") => {
            let host = source.children().find(|c| c.has_tag_name("host"));
            let name = host.and_then(|h| h.attribute("name")).unwrap_or_default();
            let port = host.and_then(|h| h.attribute("port")).unwrap_or("3260");
            format!("{}://{name}:{port}/{}", source.attribute("protocol").unwrap_or_default(), {
                source.attribute("name").unwrap_or_default()
            })
        }
        Some("block") => format!("block:{}", source.attribute("dev").unwrap_or_default()),
        Some("file") => format!("file:{}", source.attribute("file").unwrap_or_default()),
        _ => String::new(),
    }
}

/// The disks in a domain's XML (live or persistent).
pub fn disks(domain_xml: &str) -> Result<Vec<DomainDisk>, String> {
    let doc = roxmltree::Document::parse(domain_xml).map_err(|e| format!("domain XML: {e}"))?;
    let mut out = Vec::new();
    for disk in doc.descendants().filter(|n| n.has_tag_name("disk") && n.attribute("device") == Some("disk")) {
        let child = |name: &str| disk.children().find(|c| c.has_tag_name(name));
        let target = child("target").and_then(|t| t.attribute("dev")).unwrap_or_default().to_string();
        let serial = child("serial").and_then(|s| s.text()).unwrap_or_default().trim().to_string();
        out.push(DomainDisk { target, serial, source: source_identity(disk) });
    }
    Ok(out)
}

/// The first `vdX` not used by any of `used` (`vda`…`vdz`, then `vdaa`…).
pub fn next_free_target(used: &[String]) -> String {
    let name = |mut i: usize| {
        let mut suffix = Vec::new();
        loop {
            suffix.push((b'a' + (i % 26) as u8) as char);
            if i < 26 {
                break;
            }
            i = i / 26 - 1;
        }
        format!("vd{}", suffix.iter().rev().collect::<String>())
    };
    (0..).map(name).find(|n| !used.contains(n)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: &str = "<domain type='qemu' id='3'><name>vm1</name><devices>\
        <disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='iscsi' name='iqn.x/1'/>\
        <target dev='vda' bus='virtio'/><serial>11111111-1111-1111-1111-111111111111</serial></disk>\
        <disk type='file' device='cdrom'><target dev='hdc' bus='ide'/></disk>\
        <disk type='file' device='disk'><source file='/x'/><target dev='vdb' bus='virtio'/></disk>\
        </devices></domain>";

    #[test]
    fn reads_disks_and_picks_the_next_free_name() {
        let d = disks(LIVE).unwrap();
        assert_eq!(
            d,
            [
                DomainDisk {
                    target: "vda".into(),
                    serial: "11111111-1111-1111-1111-111111111111".into(),
                    source: "iscsi://:3260/iqn.x/1".into()
                },
                DomainDisk { target: "vdb".into(), serial: String::new(), source: "file:/x".into() },
            ]
        );
        let used: Vec<String> = d.into_iter().map(|d| d.target).collect();
        assert_eq!(next_free_target(&used), "vdc");
        let all: Vec<String> = (0..26).map(|i| format!("vd{}", (b'a' + i) as char)).collect();
        assert_eq!(next_free_target(&all), "vdaa");
        assert!(disks("<domain").is_err());
    }

    #[test]
    fn reads_the_source_libvirt_shows_after_a_block_copy() {
        // Captured from libvirt 9.0 after `virsh blockcopy --xml … --pivot` moved a file disk onto an iSCSI LUN.
        let live = include_str!("../testdata/virsh-dumpxml-after-blockcopy.xml");
        let d = disks(live).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].serial, "probe-serial");
        assert_eq!(d[0].source, "iscsi://127.0.0.1:13260/iqn.2010-10.org.ember:volume-dst/1");
    }

    #[test]
    fn disk_xml_is_escaped_and_parses_back() {
        let spec = DiskSpec {
            source: DiskSource::IscsiNetwork {
                portal: "127.0.0.1:3260".into(),
                iqn: "iqn.2010-10.org.ember:volume-1".into(),
                lun: 1,
                username: "u'<x>".into(),
                secret_usage: "ember-volume-1".into(),
                initiator: "iqn.2025-01.org.ember:compute-1".into(),
            },
            target: "vdb".into(),
            serial: "22222222-2222-2222-2222-222222222222".into(),
            read_only: true,
            iotune: [("total_iops_sec".to_string(), 500), ("<bad/>".to_string(), 1)].into(),
            luks_secret: "33333333-3333-4333-8333-333333333333".into(),
        };
        let xml = disk_xml(&spec);
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let auth = doc.descendants().find(|n| n.has_tag_name("auth")).unwrap();
        assert_eq!(auth.attribute("username"), Some("u'<x>"));
        let host = doc.descendants().find(|n| n.has_tag_name("host")).unwrap();
        assert_eq!((host.attribute("name"), host.attribute("port")), (Some("127.0.0.1"), Some("3260")));
        assert!(doc.descendants().any(|n| n.has_tag_name("readonly")));
        let iotune = doc.descendants().find(|n| n.has_tag_name("iotune")).unwrap();
        let limits: Vec<_> =
            iotune.children().filter(|n| n.is_element()).map(|n| (n.tag_name().name(), n.text())).collect();
        assert_eq!(limits, [("total_iops_sec", Some("500"))], "only known limits become elements");
        let source = doc.descendants().find(|n| n.has_tag_name("source")).unwrap();
        assert_eq!(source.attribute("name"), Some("iqn.2010-10.org.ember:volume-1/1"));
        let wrapped = format!("<domain><devices>{xml}</devices></domain>");
        let read_back = &disks(&wrapped).unwrap()[0];
        assert_eq!(read_back.serial, "22222222-2222-2222-2222-222222222222");
        assert_eq!(read_back.source, spec.source.identity(), "what is written reads back as the same source");
        assert_eq!(read_back.source, "iscsi://127.0.0.1:3260/iqn.2010-10.org.ember:volume-1/1");
        for source in [DiskSource::Block("/dev/sdb".into()), DiskSource::File("/mnt/x/volume-2".into())] {
            let xml = disk_xml(&DiskSpec { source: source.clone(), ..spec.clone() });
            let wrapped = format!("<domain><devices>{xml}</devices></domain>");
            assert_eq!(disks(&wrapped).unwrap()[0].source, source.identity());
        }
        let secret = secret_xml("22222222-2222-2222-2222-222222222222", "ember-volume-2");
        assert!(roxmltree::Document::parse(&secret).is_ok());
        let encryption = doc.descendants().find(|n| n.has_tag_name("encryption")).unwrap();
        assert_eq!(encryption.attribute("format"), Some("luks"));
        let passphrase = encryption.children().find(|n| n.has_tag_name("secret")).unwrap();
        assert_eq!(passphrase.attribute("uuid"), Some("33333333-3333-4333-8333-333333333333"));
        let luks = luks_secret_xml("33333333-3333-4333-8333-333333333333", "22222222-2222-2222-2222-222222222222");
        let luks = roxmltree::Document::parse(&luks).unwrap();
        let usage = luks.descendants().find(|n| n.has_tag_name("usage")).unwrap();
        assert_eq!(usage.attribute("type"), Some("volume"));
    }
}
