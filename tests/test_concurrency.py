"""Many clients at once over one shared rbd mount: refs stay exact, nothing leaks."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests import hostview
from tests.apiclient import Api
from tests.conftest import Stack

CLIENTS = 16
ROUNDS = 12


def test_sixteen_clients_churn_overlays_over_one_rbd_mount(stack: Stack) -> None:
    base = stack.api.post("/mount/rbd", {"fs_type": "squashfs", "mount_options": ["ro"],
                                         "rbd": stack.rbd_spec()})
    statuses: Counter[tuple[str, int]] = Counter()
    lock = threading.Lock()
    problems: list[str] = []

    def client(n: int) -> None:
        api = Api(stack.server.url)
        try:
            for i in range(ROUNDS):
                made = api.request("POST", "/mount/overlay",
                                   json={"lower": [{"kind": "rbd", "mount_id": base["id"]}]})
                with lock:
                    statuses[("create", made.status_code)] += 1
                if made.status_code != 201:
                    problems.append(f"client {n}: create answered {made.status_code} {made.text}")
                    continue
                ovl = made.json()
                marker = Path(ovl["mountpoint"], f"client-{n}-{i}")
                marker.write_text("x")
                # The shared mount and its rbd are in use: deleting them must be refused.
                for path in (f"/mount/rbd/{base['id']}", f"/attach/rbd/{base['rbd_id']}"):
                    refused = api.request("DELETE", path)
                    with lock:
                        statuses[("delete-held", refused.status_code)] += 1
                listed = api.request("GET", f"/mount/overlay/{ovl['id']}")
                if listed.status_code != 200 or listed.json()["refs"] != 1:
                    problems.append(f"client {n}: GET overlay gave {listed.text}")
                gone = api.request("DELETE", f"/mount/overlay/{ovl['id']}")
                with lock:
                    statuses[("delete", gone.status_code)] += 1
                if marker.exists():
                    problems.append(f"client {n}: overlay {ovl['id']} still shows its file")
        finally:
            api.close()

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))

    assert not problems, "\n".join(problems[:10])
    ops = CLIENTS * ROUNDS
    assert statuses == Counter({("create", 201): ops, ("delete", 200): ops,
                                ("delete-held", 409): 2 * ops}), statuses
    after = stack.api.get(f"/mount/rbd/{base['id']}")
    assert after["refs"] == 1 and after["rbd"]["refs"] == 1
    assert stack.api.get("/mount/overlay") == []
    overlays = [m for m in hostview.mounts() if m[1] == "overlay"
                and m[0].startswith(str(stack.server.run_dir))]
    assert overlays == []
    stack.api.delete(f"/mount/rbd/{base['id']}")
