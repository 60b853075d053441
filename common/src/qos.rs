//! Front-end QoS: the disk I/O limits a volume type sets (`qos:<limit>` extra specs) and a compute host applies
//! to the guest's disk with libvirt's `<iotune>`, as Nova applies Cinder's front-end QoS specs.

use std::collections::{BTreeMap, HashMap};

/// The limits, by their libvirt `<iotune>` element names: bytes or operations per second.
pub const LIMITS: [&str; 6] =
    ["total_bytes_sec", "read_bytes_sec", "write_bytes_sec", "total_iops_sec", "read_iops_sec", "write_iops_sec"];

/// The extra-spec scope of the limits.
pub const SCOPE: &str = "qos:";

/// Checks a set of limits: known names, values above zero, and no total limit together with a read or write
/// limit of the same unit (libvirt refuses those together). The error names the offending limit.
pub fn check(limits: &BTreeMap<String, u64>) -> Result<(), String> {
    for (name, value) in limits {
        if !LIMITS.contains(&name.as_str()) {
            return Err(format!("{name:?} is not a QoS limit (one of {})", LIMITS.join(", ")));
        }
        if *value == 0 {
            return Err(format!("{name} must be above 0"));
        }
    }
    for unit in ["bytes_sec", "iops_sec"] {
        let set = |dir: &str| limits.contains_key(&format!("{dir}_{unit}"));
        if set("total") && (set("read") || set("write")) {
            return Err(format!("total_{unit} cannot be set together with read_{unit} or write_{unit}"));
        }
    }
    Ok(())
}

/// The limits among a volume type's extra specs (`qos:total_iops_sec = 500`), checked.
pub fn from_specs(specs: &HashMap<String, String>) -> Result<BTreeMap<String, u64>, String> {
    let mut limits = BTreeMap::new();
    for (key, value) in specs {
        let Some(name) = key.strip_prefix(SCOPE) else { continue };
        let n = value.trim().parse::<u64>().map_err(|_| format!("{key}: {value:?} is not a whole number"))?;
        limits.insert(name.to_string(), n);
    }
    check(&limits).map_err(|e| format!("{SCOPE}{e}"))?;
    Ok(limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn limits_come_from_the_qos_scope_only() {
        let got = from_specs(&specs(&[("qos:total_iops_sec", "500"), ("volume_backend_name", "x")])).unwrap();
        assert_eq!(got, BTreeMap::from([("total_iops_sec".to_string(), 500)]));
        assert!(from_specs(&specs(&[])).unwrap().is_empty());
    }

    #[test]
    fn bad_limits_are_named() {
        let err = from_specs(&specs(&[("qos:iops", "5")])).unwrap_err();
        assert!(err.contains("\"iops\" is not a QoS limit"), "{err}");
        assert!(from_specs(&specs(&[("qos:read_iops_sec", "0")])).unwrap_err().contains("above 0"));
        assert!(from_specs(&specs(&[("qos:read_iops_sec", "fast")])).unwrap_err().contains("whole number"));
        let both = specs(&[("qos:total_bytes_sec", "1"), ("qos:write_bytes_sec", "1")]);
        assert!(from_specs(&both).unwrap_err().contains("cannot be set together"));
        assert!(from_specs(&specs(&[("qos:read_bytes_sec", "1"), ("qos:write_iops_sec", "9")])).is_ok());
    }
}
