"""krbdsim: a simulator of the kernel rbd driver's sysfs ABI, for tests on hosts without `rbd.ko`.

A FUSE filesystem shows what drivers/block/rbd.c shows under /sys/bus/rbd; each mapping is backed
by a real loop device over a file of a simulated cluster (see `cluster.py`), and a real block node
`<devdir>/rbd<id>` is made for it, so a client can map, mount and unmap as on a real host.

Run it with `python -m tests.krbdsim` (see `__main__.py`); tests use `harness.py`.

Kernel behaviour reproduced (read from drivers/block/rbd.c and net/ceph/; described in our words)
-------------------------------------------------------------------------------------------

Bus attributes (rbd_bus_attrs, rbd_bus_is_visible, add_store, remove_store):
  * `add`, `remove`, `add_single_major`, `remove_single_major` are write-only (0200);
    `supported_features` (0444) shows the driver's feature mask as "0x%llx" (0x1bf).
  * The module parameter single_major defaults to on. Then plain `add` and `remove` refuse every
    write with EINVAL. With it off, the two *_single_major attributes are not visible at all.
  * A write reaches store() through sysfs: at most one page (4096 bytes), NUL-terminated, the file
    position ignored; write(2) returns what store() returns (the count on success, -errno else).
    Opening an attribute for reading without a show(), or for writing without a store(), fails
    with EACCES even for root (kernfs_fop_open).

Mapping, do_rbd_add() / rbd_add_parse_args():
  * The buffer is "<mon_addrs> <options> <pool> <image> [<snap>]", tokens separated by C isspace
    characters (next_token). No monitor token, or an empty options, pool or image token: EINVAL.
    The snapshot defaults to "-" (the head); a name over 250 bytes is ENAMETOOLONG.
  * Monitors (ceph_parse_mon_ips -> ceph_parse_ips): comma-separated, each IPv4 or IPv6 (in
    brackets when a port follows), optional ":port"; the default port is 6789 whatever ms_mode
    says and ":0" means the default; above 65535, trailing junk or more than 31 (CEPH_MAX_MON):
    EINVAL.
  * Options (rbd_parse_options): split on ','; empty items and items starting with '=' skipped;
    "key" or "key=value" (split at the first '='). Each goes first to libceph's ceph_parameters
    (net/ceph/ceph_common.c), then to rbd_parameters; in neither: EINVAL. The fs_parse rules:
    a flag given a value, a valued option without one, an empty string, a number kstrtouint()
    (base 0: 0x.. hex, 0.. octal) rejects, an enum value outside its table: EINVAL. "no<flag>"
    works only for fsparam_flag_no options (share, crc, tcp_nodelay, cephx_sign_messages,
    cephx_require_signatures).
      rbd:     queue_depth= (>= 1), alloc_size= (>= 512, a power of 2), lock_timeout=
               (<= INT_MAX/1000), _pool_ns= (non-empty), compression_hint=none|compressible|
               incompressible, ro/read_only, rw/read_write, lock_on_read, exclusive, notrim.
      libceph: fsid= (16 hex byte pairs, punctuation skipped), ip= (one address), name=,
               secret=, key=, crush_location= (type:name|...; a repeated pair is EEXIST),
               mount_timeout=/osd_request_timeout= (<= INT_MAX/1000), osdkeepalive=/
               osd_idle_ttl= (1..INT_MAX/1000), read_from_replica=no|balance|localize,
               ms_mode=legacy|crc|secure|prefer-crc|prefer-secure, abort_on_full, rxbounce,
               [no]share, [no]crc, [no]cephx_require_signatures, [no]cephx_sign_messages,
               [no]tcp_nodelay. There is no mon_addr= here: that one belongs to the CephFS
               mount options (fs/ceph/super.c), so rbd refuses it as unknown.
  * secret= goes through ceph_crypto_key_unarmor(): base64 in whole groups of four (any other
    character, or a short group: EINVAL), then ceph_crypto_key_decode(): le16 type, 8 bytes of
    creation time, le16 length, the secret; short data or a secret over 16 bytes: EINVAL.
    key= reads the kernel keyring (get_secret); a missing key there is EPERM.
  * rbd_get_client(): unless `noshare`, an existing client with equal options whose monmap holds
    one of the given monitors is reused (ceph_compare_options), so several mappings can show the
    same client_id. A new client opens a session (__ceph_open_session):
      - no given monitor answers in the client's protocol (msgr1 for ms_mode=legacy, the default,
        on port 6789; msgr2 for the other modes, on 3300): ETIMEDOUT once mount_timeout passes;
      - cephx with no key: EINVAL from ceph_x_init ("no secret set") under msgr1;
      - the monitor answers EPERM for an unknown entity (name= defaults to "guest") or a wrong
        key (CephxServiceHandler::handle_request);
      - a monmap whose fsid differs from fsid= is dropped (ceph_check_fsid): ETIMEDOUT.
  * The pool is looked up by name (ceph_pg_poolid_by_name), then the image (rbd_dev_image_id,
    header), then the snapshot (rbd_spec_fill_snap_id): ENOENT for each. Image features the
    driver does not support: ENXIO (journaling only blocks writable mappings). exclusive or
    lock_on_read on an image without the exclusive-lock feature: EINVAL (rbd_add_acquire_lock).
  * The mapping is read-only for ro/read_only and for every snapshot (RBD_DEV_FLAG_READONLY).
  * The id is the lowest free one (ida); devices/<id> appears only once the add has fully
    succeeded (device_add comes last). The same image may be mapped more than once.

Device attributes (rbd_attrs; each a sprintf(..., "%s\\n") of):
  size (bytes), features ("0x%016llx"), major, minor, client_addr ("ip:port/nonce"), client_id
  ("client<global id>"), cluster_fsid, config_info (the written buffer as is; 0400), pool,
  pool_id, pool_ns (empty line for the default namespace), name, image_id, current_snap ("-" for
  the head), snap_id (CEPH_NOSNAP = 18446744073709551614 for the head), parent ("(no parent
  image)"), refresh (0200).

Unmapping, do_rbd_remove():
  * sscanf(buf, "%d %5s"): leading whitespace skipped, an optional '-', digits; no number or a
    negative one: EINVAL. The option word is cut at five characters and must then be "force",
    so "forced" still means force and any other word is EINVAL. An unknown id: ENOENT.
  * A device opened by anyone (open_count, which counts every open, a mount included) is EBUSY
    unless forced; a removal already under way is EINPROGRESS. With force the disk is marked
    dead and removed even though still open; I/O to it fails.

Simulation choices (not kernel facts)
-------------------------------------
  * Stricter than the kernel: tokens after the snapshot name are EINVAL (the kernel ignores them;
    a client that sends them has a bug).
  * major/minor show the backing loop device's numbers, so they agree with the block node; a
    real single_major rbd shows rbd's major and minor = id << 4.
  * "Open" is: an O_EXCL open of the loop device fails with EBUSY (mounted or otherwise claimed),
    or some process has an fd on a block device with that dev_t (found in /proc/*/fd).
  * Forced removal of a held device detaches the loop lazily (autoclear): the node and the
    devices/<id> directory go at once, the loop when its last user lets go.
  * Session failures come back at once instead of after mount_timeout.
  * cephx without a key under msgr2 gives EACCES (the monitor refuses the "none" method).
  * An unknown key type would be ENOTSUPP (524) in the kernel; FUSE cannot return errnos >= 512,
    so EOPNOTSUPP stands in for it.
  * devices/<id> is a directory (a symlink into /sys/devices/rbd in sysfs); there is no
    /sys/block/rbd<id>; the block node appears before write(2) returns (udev is asynchronous).
  * The kernel keyring read by key= is cluster.json's optional "keyring" map.
  * On shutdown a kernel would keep leftover mappings; the simulator prints them on stderr and
    detaches them, so a leak is visible and the host stays clean.
"""
