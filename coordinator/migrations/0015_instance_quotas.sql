-- Instances count against their project's quota (`instances`, `cores`, `ram` in MiB, as Nova's): the usage of
-- the instances that exist already.
INSERT INTO quota_usages (project, resource, in_use, reserved)
    SELECT project, 'instances', COUNT(*), 0 FROM instances GROUP BY project;
INSERT INTO quota_usages (project, resource, in_use, reserved)
    SELECT project, 'cores', SUM(vcpus), 0 FROM instances GROUP BY project;
INSERT INTO quota_usages (project, resource, in_use, reserved)
    SELECT project, 'ram', SUM(memory_mb), 0 FROM instances GROUP BY project;
