//! Choosing a backend pool for a volume, with Cinder's filter and weigher semantics (restated in
//! ../shared/CINDER.md §4): availability zone, capacity and capabilities filters, never a backend already
//! tried, and the capacity weigher. Every rule is a small pure function so the table tests can pin it.

use std::collections::BTreeMap;

/// A capacity figure as a driver reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Capacity {
    /// A number of GiB.
    Gb(f64),
    /// The backend cannot run out.
    Infinite,
    /// The backend does not know.
    Unknown,
}

/// One candidate pool, from the latest report of an up, enabled storage service.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolState {
    /// `host`.
    pub host: String,
    /// Backend name.
    pub backend: String,
    /// Availability zone of the backend.
    pub availability_zone: String,
    /// Total capacity.
    pub total: Capacity,
    /// Free capacity.
    pub free: Capacity,
    /// GiB provisioned to volumes, including creates in flight.
    pub provisioned_gb: f64,
    /// Percent of total kept free.
    pub reserved_percentage: u32,
    /// Thin over-subscription ratio.
    pub max_over_subscription_ratio: f64,
    /// Thin provisioning supported.
    pub thin: bool,
    /// Thick provisioning supported.
    pub thick: bool,
    /// Capabilities matched by extra specs (flat; nested keys joined with `:`).
    pub capabilities: BTreeMap<String, String>,
}

impl PoolState {
    /// `host@backend`.
    pub fn name(&self) -> String {
        format!("{}@{}", self.host, self.backend)
    }
}

/// What is asked for.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// GiB needed.
    pub size_gb: u64,
    /// Required availability zone; `None` accepts any.
    pub availability_zone: Option<String>,
    /// The volume type's extra specs.
    pub extra_specs: BTreeMap<String, String>,
    /// `host@backend` names already tried for this request.
    pub tried: Vec<String>,
    /// When set, only this `host@backend` may take the volume (a copy of a local snapshot or volume).
    pub only: Option<String>,
    /// Storage hosts the volume must be on (each of them: two different hosts cannot both hold it).
    pub same_host: Vec<String>,
    /// Storage hosts the volume must not be on.
    pub different_host: Vec<String>,
}

impl Request {
    /// Whether the type asks for thin provisioning (anything but `provisioning:type=thick`).
    fn wants_thin(&self) -> bool {
        self.extra_specs.get("provisioning:type").map(|v| v.trim() != "thick").unwrap_or(true)
    }
}

/// The zones a volume type allows (`RESKEY:availability_zones = "az1, az2"`), empty for any.
pub fn type_zones(extra_specs: &BTreeMap<String, String>) -> Vec<String> {
    extra_specs
        .get("RESKEY:availability_zones")
        .map(|v| v.split(',').map(str::trim).filter(|z| !z.is_empty()).map(String::from).collect())
        .unwrap_or_default()
}

/// AvailabilityZoneFilter: the type's zone list when it has one, else the requested zone, else any.
pub fn az_filter(req: &Request, pool: &PoolState) -> Result<(), String> {
    let zones = type_zones(&req.extra_specs);
    if !zones.is_empty() {
        return if zones.contains(&pool.availability_zone) {
            Ok(())
        } else {
            Err(format!("availability zone {} is not one of {}", pool.availability_zone, zones.join(", ")))
        };
    }
    match &req.availability_zone {
        Some(az) if *az != pool.availability_zone => {
            Err(format!("availability zone {} is not the requested {az}", pool.availability_zone))
        }
        _ => Ok(()),
    }
}

/// IgnoreAttemptedHostsFilter, and the pinning of copies to their source's backend.
pub fn placement_filter(req: &Request, pool: &PoolState) -> Result<(), String> {
    let name = pool.name();
    if req.tried.contains(&name) {
        return Err("already tried for this request".into());
    }
    match &req.only {
        Some(only) if *only != name => Err(format!("the source lives on {only}")),
        _ => Ok(()),
    }
}

/// SameHostFilter (Cinder's SameBackendFilter, by storage host): on the host of every volume named.
pub fn same_host_filter(req: &Request, pool: &PoolState) -> Result<(), String> {
    match req.same_host.iter().find(|h| **h != pool.host) {
        Some(other) => Err(format!("scheduler hint same_host asks for storage host {other}")),
        None => Ok(()),
    }
}

/// DifferentHostFilter (Cinder's DifferentBackendFilter, by storage host): off the host of every volume named.
pub fn different_host_filter(req: &Request, pool: &PoolState) -> Result<(), String> {
    if req.different_host.contains(&pool.host) {
        return Err(format!("scheduler hint different_host keeps the volume off storage host {}", pool.host));
    }
    Ok(())
}

/// The virtual free capacity used by the capacity filter and weigher: `None` for infinite/unknown.
pub fn virtual_free_gb(req: &Request, pool: &PoolState) -> Option<f64> {
    let (Capacity::Gb(total), Capacity::Gb(free)) = (pool.total, pool.free) else { return None };
    let reserved = (total * f64::from(pool.reserved_percentage) / 100.0).floor();
    if req.wants_thin() && pool.thin {
        Some((total - reserved) * pool.max_over_subscription_ratio - pool.provisioned_gb)
    } else {
        Some(free.min(total - reserved - pool.provisioned_gb))
    }
}

/// CapacityFilter. One improvement on Cinder: a thin pool whose physical free space has fallen into its
/// reserved share is refused too, because Cinder's formula lets a thin pool be physically overfilled.
pub fn capacity_filter(req: &Request, pool: &PoolState) -> Result<(), String> {
    let requested = req.size_gb as f64;
    if req.size_gb == 0 {
        return Ok(());
    }
    let wants_thin = req.wants_thin();
    provisioning_filter(req, pool)?;
    match (pool.free, pool.total) {
        (Capacity::Infinite | Capacity::Unknown, _) => return Ok(()),
        (_, Capacity::Infinite | Capacity::Unknown) => {
            return if pool.reserved_percentage == 0 {
                Ok(())
            } else {
                Err("total capacity unknown with a reserved percentage".into())
            };
        }
        (_, Capacity::Gb(total)) if total <= 0.0 => return Err("no capacity".into()),
        _ => {}
    }
    if wants_thin && pool.thin && pool.max_over_subscription_ratio < 1.0 {
        return Err("max_over_subscription_ratio below 1".into());
    }
    let virtual_free = virtual_free_gb(req, pool).unwrap_or(f64::INFINITY);
    if virtual_free < requested {
        return Err(format!("{requested} GiB requested, {virtual_free:.1} GiB virtually free"));
    }
    if let (true, Capacity::Gb(total), Capacity::Gb(free)) = (wants_thin && pool.thin, pool.total, pool.free) {
        let reserved = (total * f64::from(pool.reserved_percentage) / 100.0).floor();
        if free <= reserved {
            return Err(format!("physically full: {free:.1} GiB free within the {reserved} GiB reserve"));
        }
    }
    Ok(())
}

/// The type's `provisioning:type`, when it names one, is a kind the pool provisions.
pub fn provisioning_filter(req: &Request, pool: &PoolState) -> Result<(), String> {
    match req.extra_specs.get("provisioning:type").map(|v| v.trim()) {
        Some("thick") if !pool.thick => Err("thick provisioning requested but not supported".into()),
        Some("thin") if !pool.thin => Err("thin provisioning requested but not supported".into()),
        _ => Ok(()),
    }
}

/// Whether a volume already on `pool` may take the type `req` describes without moving (a retype): the filters
/// that say what the pool is (zone, provisioning, capabilities), not whether it has room.
pub fn fits_in_place(req: &Request, pool: &PoolState) -> Result<(), String> {
    az_filter(req, pool)?;
    provisioning_filter(req, pool)?;
    capabilities_filter(req, pool)?;
    encryption_filter(req, pool)
}

fn parse_bool(s: &str) -> bool {
    matches!(s.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes" | "on" | "y" | "t")
}

/// Cinder's `extra_specs_ops.match`: does capability `value` satisfy requirement `req`?
pub fn spec_matches(value: &str, req: &str) -> bool {
    let words: Vec<&str> = req.split_whitespace().collect();
    let Some((op, rest)) = words.split_first() else { return value == req };
    let arg = rest.join(" ");
    let num = |f: fn(f64, f64) -> bool| match (value.trim().parse::<f64>(), arg.parse::<f64>()) {
        (Ok(v), Ok(a)) => f(v, a),
        _ => false,
    };
    match *op {
        "=" => num(|v, a| v >= a),
        "==" => num(|v, a| v == a),
        "!=" => num(|v, a| v != a),
        ">=" => num(|v, a| v >= a),
        "<=" => num(|v, a| v <= a),
        "s==" => value == arg,
        "s!=" => value != arg,
        "s<" => value < arg.as_str(),
        "s<=" => value <= arg.as_str(),
        "s>" => value > arg.as_str(),
        "s>=" => value >= arg.as_str(),
        "<in>" => value.contains(arg.as_str()),
        "<is>" => parse_bool(value) == parse_bool(&arg),
        "<or>" => req.split("<or>").map(str::trim).filter(|s| !s.is_empty()).any(|alt| alt == value),
        _ => value == req,
    }
}

/// CapabilitiesFilter: unscoped and `capabilities:`-scoped extra specs must match the pool's capabilities.
pub fn capabilities_filter(req: &Request, pool: &PoolState) -> Result<(), String> {
    for (key, wanted) in &req.extra_specs {
        let path = match key.split_once(':') {
            None => key.as_str(),
            Some(("capabilities", rest)) => rest,
            Some(_) => continue, // another scope: not a capability
        };
        let Some(have) = pool.capabilities.get(path) else {
            return Err(format!("capability {path} not reported"));
        };
        if !spec_matches(have, wanted) {
            return Err(format!("capability {path}={have} does not satisfy {wanted:?}"));
        }
    }
    Ok(())
}

/// EncryptionFilter: a type with `encryption:provider` needs a pool whose agent formats LUKS volumes (it reports
/// the capability `luks_encryption`).
pub fn encryption_filter(req: &Request, pool: &PoolState) -> Result<(), String> {
    if !req.extra_specs.contains_key("encryption:provider") {
        return Ok(());
    }
    match pool.capabilities.get("luks_encryption") {
        Some(v) if spec_matches(v, "<is> True") => Ok(()),
        _ => Err("the type is encrypted, and this pool does not make LUKS volumes".into()),
    }
}

/// A filter: passes a pool for a request, or says why not.
pub type Filter = fn(&Request, &PoolState) -> Result<(), String>;

/// Every filter, in Cinder's order.
pub const FILTERS: &[(&str, Filter)] = &[
    ("AvailabilityZoneFilter", az_filter),
    ("IgnoreAttemptedHostsFilter", placement_filter),
    ("SameHostFilter", same_host_filter),
    ("DifferentHostFilter", different_host_filter),
    ("CapacityFilter", capacity_filter),
    ("CapabilitiesFilter", capabilities_filter),
    ("EncryptionFilter", encryption_filter),
];

/// Min–max normalises raw weights to [0, 1]; all equal → all 0.
pub fn normalize(raw: &[f64]) -> Vec<f64> {
    let (min, max) = raw.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    if raw.is_empty() || max == min {
        return vec![0.0; raw.len()];
    }
    raw.iter().map(|v| (v - min) / (max - min)).collect()
}

/// CapacityWeigher's raw weights: virtual free, with infinite/unknown pools ranked worst.
pub fn capacity_weights(req: &Request, pools: &[&PoolState], multiplier: f64) -> Vec<f64> {
    let raw: Vec<Option<f64>> = pools.iter().map(|p| virtual_free_gb(req, p)).collect();
    let finite: Vec<f64> = raw.iter().flatten().copied().collect();
    let (lo, hi) = finite.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(*v), b.max(*v)));
    let worst = if multiplier >= 0.0 {
        -1.0
    } else if hi.is_finite() && hi > lo {
        hi + (hi - lo) * 100.0
    } else {
        hi.max(0.0) + 10000.0
    };
    let filled: Vec<f64> = raw.iter().map(|r| r.unwrap_or(worst)).collect();
    normalize(&filled).into_iter().map(|w| w * multiplier).collect()
}

/// Why no pool was chosen: every pool with the first filter that refused it.
#[derive(Debug, Clone, PartialEq)]
pub struct NoValidBackend {
    /// `host@backend` → filter and reason.
    pub rejections: Vec<(String, String)>,
}

impl std::fmt::Display for NoValidBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.rejections.is_empty() {
            return write!(f, "No valid backend was found: no storage backend is up and enabled");
        }
        let parts: Vec<String> = self.rejections.iter().map(|(p, r)| format!("{p}: {r}")).collect();
        write!(f, "No valid backend was found: {}", parts.join("; "))
    }
}

/// Filters and weighs; returns the best pool.
pub fn choose<'a>(req: &Request, pools: &'a [PoolState], multiplier: f64) -> Result<&'a PoolState, NoValidBackend> {
    let mut passed = Vec::new();
    let mut rejections = Vec::new();
    'pools: for pool in pools {
        for (name, filter) in FILTERS {
            if let Err(reason) = filter(req, pool) {
                rejections.push((pool.name(), format!("{name}: {reason}")));
                continue 'pools;
            }
        }
        passed.push(pool);
    }
    if passed.is_empty() {
        return Err(NoValidBackend { rejections });
    }
    let weights = capacity_weights(req, &passed, multiplier);
    let mut best = 0;
    for (i, w) in weights.iter().enumerate() {
        if *w > weights[best] {
            best = i;
        }
    }
    Ok(passed[best])
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
