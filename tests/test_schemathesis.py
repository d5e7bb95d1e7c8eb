from __future__ import annotations

import os
import subprocess
import sys

REPORT = "/tmp/st/out.txt"


def test_explore(server, sim, cluster, api):
    cmd = [sys.executable, "-m", "schemathesis.cli", "run",
           server.url + "/imageapi/v1/swagger.json", "--checks", "all",
           "--max-examples", os.environ.get("N", "10"), "--workers", "1", "--seed", "1",
           "--generation-deterministic", "--no-color", "--request-timeout", "30",
           "--report", "ndjson", "--report-dir", "/tmp/st/report"]
    env = {**os.environ}
    if os.environ.get("HOOKS"):
        env["SCHEMATHESIS_HOOKS"] = os.environ["HOOKS"]
    env["FUZZ_MONS"] = ",".join(cluster.monitors)
    env["FUZZ_NAME"] = cluster.key_name
    env["FUZZ_SECRET"] = cluster.secret
    env["FUZZ_FSID"] = cluster.fsid
    with open(REPORT, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=1200)
    print(api.get("/attach/rbd"), api.get("/mount"))
    with open("/tmp/st/state.txt", "w") as f:
        f.write(repr(api.get("/attach/rbd")) + "\n" + repr(api.get("/mount")) + "\n")
        f.write(server.log_text())
    for m in sorted(api.get("/mount"), key=lambda m: -m["mount_id"]):
        api.request("DELETE", f"/mount/{m['kind']}/{m['mount_id']}")
    for r in api.get("/attach/rbd"):
        api.request("DELETE", f"/attach/rbd/{r['id']}")
    assert proc.returncode == 0
