"""The floor: a pyzmq ROUTER echo "kernel" that verifies, signs and replies at once.

No Python kernel should beat it, beyond noise: it imports only what any kernel must (zmq, json,
hmac, uuid, datetime), runs no code and prints nothing. bench/compare.py starts it as
`python floor.py -f CONNECTION_FILE` and drives it like the real kernels.
"""

import hashlib
import hmac
import json
import os
import sys
import uuid
from datetime import datetime, timezone

import zmq

DELIM = b"<IDS|MSG>"
KERNEL_INFO = {
    "status": "ok",
    "protocol_version": "5.3",
    "implementation": "floor",
    "implementation_version": "0",
    # A realistic language_info keeps the reply about as large as a real kernel's.
    "language_info": {
        "name": "python",
        "version": sys.version.split()[0],
        "mimetype": "text/x-python",
        "file_extension": ".py",
        "pygments_lexer": "ipython3",
        "codemirror_mode": {"name": "ipython", "version": 3},
        "nbconvert_exporter": "python",
    },
    "banner": "floor: echoes replies, runs nothing",
    "help_links": [],
}


def main(path):
    """Serve shell and control until a shutdown_request arrives."""
    with open(path) as f:
        conn = json.load(f)
    key, session = conn["key"].encode(), uuid.uuid4().hex
    url = f"{conn['transport']}://{conn['ip']}:"
    ctx = zmq.Context()
    # One ROUTER bound to both the shell and control ports: a blocking recv, no poller, is the
    # cheapest wait there is, and replies still reach the connection they came from.
    router, iopub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    router.bind(url + str(conn["shell_port"]))
    router.bind(url + str(conn["control_port"]))
    iopub.bind(url + str(conn["iopub_port"]))
    # stdin and hb are left unbound: the benchmark's client never uses them.
    auth = hmac.new(key, digestmod=hashlib.sha256)

    def sign(parts):
        """Hex HMAC-SHA256 over the four JSON frames."""
        h = auth.copy()  # copying the keyed state is cheaper than keying anew
        for part in parts:
            h.update(part)
        return h.hexdigest().encode()

    def send(sock, ids, msg_type, content, parent):
        """Serialize, sign and send one message."""
        header = {
            "msg_id": uuid.uuid4().hex,
            "session": session,
            "username": "floor",
            "date": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            "msg_type": msg_type,
            "version": "5.3",
        }
        parts = [json.dumps(d).encode() for d in (header, parent, {}, content)]
        sock.send_multipart([*ids, DELIM, sign(parts), *parts])

    count = 0
    while True:
        frames = router.recv_multipart()
        i = frames.index(DELIM)
        ids, signature, parts = frames[:i], frames[i + 1], frames[i + 2 : i + 6]
        if not hmac.compare_digest(signature, sign(parts)):
            continue  # a kernel drops what it cannot verify
        parent = json.loads(parts[0])
        msg_type = parent["msg_type"]
        if msg_type == "execute_request":
            count += 1
            content = {"status": "ok", "execution_count": count, "user_expressions": {}}
        elif msg_type == "kernel_info_request":
            content = KERNEL_INFO
        else:
            content = {"status": "ok", "restart": False}
        send(iopub, [b"kernel.floor.status"], "status", {"execution_state": "busy"}, parent)
        send(router, ids, msg_type.replace("_request", "_reply"), content, parent)
        send(iopub, [b"kernel.floor.status"], "status", {"execution_state": "idle"}, parent)
        if msg_type == "shutdown_request":
            ctx.destroy(linger=1000)  # linger so the reply and idle leave before we exit
            os._exit(0)  # skip interpreter teardown, as a kernel may: exit is the measured row


if __name__ == "__main__":
    main(sys.argv[sys.argv.index("-f") + 1])
