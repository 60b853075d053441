//! Table tests for every filter and weigher rule.

use super::*;

fn pool(name: &str) -> PoolState {
    PoolState {
        host: "node".into(),
        backend: name.into(),
        availability_zone: "nova".into(),
        total: Capacity::Gb(100.0),
        free: Capacity::Gb(100.0),
        provisioned_gb: 0.0,
        reserved_percentage: 0,
        max_over_subscription_ratio: 1.0,
        thin: false,
        thick: true,
        capabilities: [("volume_backend_name".to_string(), name.to_string())].into(),
    }
}

fn req(size: u64) -> Request {
    Request { size_gb: size, ..Default::default() }
}

fn specs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn capacity_filter_table() {
    struct Case {
        what: &'static str,
        total: Capacity,
        free: Capacity,
        provisioned: f64,
        reserved: u32,
        ratio: f64,
        thin: bool,
        thick: bool,
        spec: Option<&'static str>,
        size: u64,
        pass: bool,
    }
    use Capacity::*;
    let c = |what, total, free, provisioned, reserved, ratio, thin, thick, spec, size, pass| Case {
        what,
        total,
        free,
        provisioned,
        reserved,
        ratio,
        thin,
        thick,
        spec,
        size,
        pass,
    };
    let cases = [
        c("thick fits", Gb(100.0), Gb(100.0), 0.0, 0, 1.0, false, true, None, 100, true),
        c("thick one too many", Gb(100.0), Gb(100.0), 0.0, 0, 1.0, false, true, None, 101, false),
        c("thick limited by free", Gb(100.0), Gb(10.0), 0.0, 0, 1.0, false, true, None, 11, false),
        c("thick limited by provisioned", Gb(100.0), Gb(100.0), 95.0, 0, 1.0, false, true, None, 6, false),
        c("thick reserved 10% = 10 GiB", Gb(100.0), Gb(100.0), 0.0, 10, 1.0, false, true, None, 90, true),
        c("thick reserved 10% blocks 91", Gb(100.0), Gb(100.0), 0.0, 10, 1.0, false, true, None, 91, false),
        c("reserved rounds down: floor(99*0.15)=14", Gb(99.0), Gb(99.0), 0.0, 15, 1.0, false, true, None, 85, true),
        c("thin oversubscribed 20x", Gb(100.0), Gb(50.0), 1500.0, 0, 20.0, true, false, None, 500, true),
        c("thin beyond 20x", Gb(100.0), Gb(50.0), 1500.0, 0, 20.0, true, false, None, 501, false),
        c("thin with reserve", Gb(100.0), Gb(60.0), 0.0, 50, 2.0, true, false, None, 100, true),
        c("thin with reserve, one over", Gb(100.0), Gb(60.0), 0.0, 50, 2.0, true, false, None, 101, false),
        c("thin physically into reserve", Gb(100.0), Gb(5.0), 0.0, 10, 20.0, true, false, None, 1, false),
        c("thin ratio below 1", Gb(100.0), Gb(100.0), 0.0, 0, 0.5, true, false, None, 1, false),
        c("thick type on thin-only pool", Gb(100.0), Gb(100.0), 0.0, 0, 20.0, true, false, Some("thick"), 1, false),
        c("thin type on thick-only pool", Gb(100.0), Gb(100.0), 0.0, 0, 1.0, false, true, Some("thin"), 1, false),
        c(
            "thick type on dual pool uses thick math",
            Gb(100.0),
            Gb(100.0),
            50.0,
            0,
            20.0,
            true,
            true,
            Some("thick"),
            51,
            false,
        ),
        c("thin default on dual pool uses thin math", Gb(100.0), Gb(100.0), 50.0, 0, 20.0, true, true, None, 51, true),
        c("free infinite passes", Gb(100.0), Infinite, 0.0, 0, 1.0, false, true, None, 10_000, true),
        c("free unknown passes", Gb(100.0), Unknown, 0.0, 0, 1.0, false, true, None, 10_000, true),
        c("total unknown, no reserve", Unknown, Gb(10.0), 0.0, 0, 1.0, false, true, None, 50, true),
        c("total unknown with reserve", Unknown, Gb(10.0), 0.0, 5, 1.0, false, true, None, 1, false),
        c("total zero", Gb(0.0), Gb(0.0), 0.0, 0, 1.0, false, true, None, 1, false),
    ];
    for case in cases {
        let mut p = pool("p");
        p.total = case.total;
        p.free = case.free;
        p.provisioned_gb = case.provisioned;
        p.reserved_percentage = case.reserved;
        p.max_over_subscription_ratio = case.ratio;
        p.thin = case.thin;
        p.thick = case.thick;
        let mut r = req(case.size);
        if let Some(t) = case.spec {
            r.extra_specs = specs(&[("provisioning:type", t)]);
        }
        assert_eq!(capacity_filter(&r, &p).is_ok(), case.pass, "{}: {:?}", case.what, capacity_filter(&r, &p));
    }
}

#[test]
fn operator_table() {
    let cases = [
        ("10", "= 5", true),
        ("5", "= 5", true),
        ("4", "= 5", false),
        ("5", "== 5.0", true),
        ("5", "== 6", false),
        ("5", "!= 6", true),
        ("5", ">= 5", true),
        ("5", "<= 4", false),
        ("abc", "= 5", false),
        ("gold", "s== gold", true),
        ("gold", "s!= gold", false),
        ("abc", "s< abd", true),
        ("abc", "s<= abc", true),
        ("abd", "s> abc", true),
        ("abc", "s>= abd", false),
        ("fast-ssd", "<in> ssd", true),
        ("fast-hdd", "<in> ssd", false),
        ("True", "<is> True", true),
        ("true", "<is> True", true),
        ("False", "<is> True", false),
        ("nonsense", "<is> False", true),
        ("b", "<or> a <or> b", true),
        ("c", "<or> a <or> b", false),
        ("lvm1", "lvm1", true),
        ("lvm1", "lvm2", false),
        ("x", "?? x", false),
        ("?? x", "?? x", true),
    ];
    for (value, req, want) in cases {
        assert_eq!(spec_matches(value, req), want, "{value:?} against {req:?}");
    }
}

#[test]
fn capabilities_filter_scopes() {
    let mut p = pool("fast");
    p.capabilities.insert("thin_provisioning_support".into(), "True".into());
    let check = |pairs: &[(&str, &str)]| {
        let r = Request { extra_specs: specs(pairs), ..req(1) };
        capabilities_filter(&r, &p).is_ok()
    };
    assert!(check(&[]));
    assert!(check(&[("volume_backend_name", "fast")]), "backend routing is an exact match");
    assert!(!check(&[("volume_backend_name", "slow")]));
    assert!(check(&[("capabilities:thin_provisioning_support", "<is> True")]), "capabilities: scope is stripped");
    assert!(check(&[("provisioning:type", "thick"), ("qos:iops", "100")]), "other scopes are ignored");
    assert!(!check(&[("replication_enabled", "<is> True")]), "missing capability fails");
}

#[test]
fn az_and_placement() {
    let p = pool("b1");
    let mut r = req(1);
    assert!(az_filter(&r, &p).is_ok());
    r.availability_zone = Some("nova".into());
    assert!(az_filter(&r, &p).is_ok());
    r.availability_zone = Some("az2".into());
    assert!(az_filter(&r, &p).is_err());
    // A type's zone list wins over the requested zone.
    r.extra_specs = specs(&[("RESKEY:availability_zones", "az1, nova")]);
    assert!(az_filter(&r, &p).is_ok());
    r.extra_specs = specs(&[("RESKEY:availability_zones", "az1,az3")]);
    assert!(az_filter(&r, &p).unwrap_err().contains("az1, az3"));
    assert!(capabilities_filter(&r, &p).is_ok(), "RESKEY: is a scope the capabilities filter ignores");
    let mut r = req(1);
    r.tried = vec!["node@b1".into()];
    assert!(placement_filter(&r, &p).is_err(), "never a backend already tried");
    let r = Request { only: Some("node@b2".into()), ..req(1) };
    assert!(placement_filter(&r, &p).is_err());
    let r = Request { only: Some("node@b1".into()), ..req(1) };
    assert!(placement_filter(&r, &p).is_ok());
}

#[test]
fn weigher_spreads_and_stacks() {
    let mut a = pool("a");
    a.free = Capacity::Gb(10.0);
    let b = pool("b"); // 100 free
    let mut inf = pool("inf");
    inf.free = Capacity::Infinite;
    let pools = [&a, &b, &inf];
    let spread = capacity_weights(&req(1), &pools, 1.0);
    assert_eq!(spread[1], 1.0, "most free wins when spreading: {spread:?}");
    assert!(spread[2] < spread[0], "infinite/unknown rank worst: {spread:?}");
    let stack = capacity_weights(&req(1), &pools, -1.0);
    assert!(stack[0] > stack[1], "least free wins when stacking: {stack:?}");
    assert!(stack[2] < stack[1], "infinite ranks worst when stacking too: {stack:?}");
    assert_eq!(normalize(&[3.0, 3.0]), vec![0.0, 0.0]);
    assert_eq!(normalize(&[1.0, 3.0, 2.0]), vec![0.0, 1.0, 0.5]);

    let all = [a.clone(), b.clone()];
    assert_eq!(choose(&req(1), &all, 1.0).unwrap().backend, "b");
    assert_eq!(choose(&req(1), &all, -1.0).unwrap().backend, "a");
}

#[test]
fn no_valid_backend_lists_every_pool() {
    let mut full = pool("full");
    full.free = Capacity::Gb(0.0);
    let mut elsewhere = pool("elsewhere");
    elsewhere.availability_zone = "az9".into();
    let r = Request { availability_zone: Some("nova".into()), ..req(5) };
    let err = choose(&r, &[full, elsewhere], 1.0).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("node@full: CapacityFilter"), "{text}");
    assert!(text.contains("node@elsewhere: AvailabilityZoneFilter"), "{text}");
    assert!(choose(&r, &[], 1.0).unwrap_err().to_string().contains("no storage backend is up"));
}

#[test]
fn scheduler_hints_compare_storage_hosts() {
    let mut other = pool("b1");
    other.host = "node2".into();
    let (here, there) = (pool("b1"), other);
    let apart = Request { different_host: vec!["node".into()], ..req(1) };
    assert!(different_host_filter(&apart, &here).unwrap_err().contains("off storage host node"));
    assert!(different_host_filter(&apart, &there).is_ok());
    let together = Request { same_host: vec!["node2".into()], ..req(1) };
    assert!(same_host_filter(&together, &here).unwrap_err().contains("asks for storage host node2"));
    assert!(same_host_filter(&together, &there).is_ok());
    let torn = Request { same_host: vec!["node".into(), "node2".into()], ..req(1) };
    assert!(same_host_filter(&torn, &here).is_err() && same_host_filter(&torn, &there).is_err());
    assert_eq!(choose(&apart, &[here.clone(), there.clone()], 1.0).unwrap().host, "node2");
    let both = [here, there];
    let err = choose(&Request { different_host: vec!["node".into(), "node2".into()], ..req(1) }, &both, 1.0);
    assert!(err.unwrap_err().to_string().contains("node@b1: DifferentHostFilter"));
}

#[test]
fn an_encrypted_type_needs_a_pool_that_makes_luks_volumes() {
    let mut luks = pool("luks");
    luks.capabilities.insert("luks_encryption".into(), "True".into());
    let other = pool("other"); // a pool that does not say it makes LUKS volumes
    let plain = req(1);
    let mut encrypted = req(1);
    encrypted.extra_specs.insert("encryption:provider".into(), "luks".into());
    assert!(encryption_filter(&plain, &other).is_ok());
    assert!(encryption_filter(&encrypted, &other).unwrap_err().contains("LUKS"));
    assert!(encryption_filter(&encrypted, &luks).is_ok());
    assert_eq!(choose(&encrypted, &[other, luks], 1.0).unwrap().backend, "luks");
}
