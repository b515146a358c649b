"""What the tests share: the reference fixtures and their expected readings (helpers), real servers
(servers: docker-registry, nginx; faults: the fault proxy; resolver: a local name service), real
mounts (mounts), bounded reads (reads), hostile archives (corpus), load generation (load), fakes
for fault-path unit tests (fakes), and the one trio runner (aio). Test modules import from here,
never from each other or from a conftest."""
