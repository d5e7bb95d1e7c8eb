"""RBD in user space: librbd behind a FUSE file, one server process per mapping (`server`),
found and driven by the daemon (`client`); Ceph's Python bindings found by `bindings`."""
