"""Benchmark minikernel against ipykernel and a pyzmq echo floor, interleaved, with one raw client.

    python bench/compare.py                      # all kernels present, 5 reps
    python bench/compare.py --quick              # minikernel + floor, under a minute
    python bench/compare.py --kernels minikernel,ipykernel --reps 3

Prints a markdown table: per row the median (min–max) of each kernel, its ratio to minikernel,
and whether minikernel meets the row's target from issue 6. Exits 1 if a kernel fails to answer.
"""

import argparse
import hashlib
import hmac
import importlib.metadata
import importlib.util
import json
import operator
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone

import psutil
import zmq

HERE = os.path.dirname(os.path.abspath(__file__))
MINIKERNEL = os.path.join(os.path.dirname(HERE), "minikernel.py")
COMMANDS = {
    "minikernel": [sys.executable, MINIKERNEL, "-f"],
    "ipykernel": [sys.executable, "-m", "ipykernel_launcher", "-f"],
    "floor": [sys.executable, os.path.join(HERE, "floor.py"), "-f"],
}
DELIM = b"<IDS|MSG>"
CLIENTS, EXECS = 10, 50
LINES_CODE = "for i in range(100000): print(i)"
LINES_TEXT = "".join(f"{i}\n" for i in range(100000))
BIG = 10 * 2**20
BIG_CODE = f"print('x' * {BIG - 1})"  # print's newline makes it exactly 10 MiB
OUTPUT_RUNS = 3  # each output row runs this often per kernel life: warm runs count too


################ Connection files


def write_connection_file(directory):
    """Write a fresh connection file with free ports and a random key; return (path, dict)."""
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(5)]  # all open: distinct
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    names = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
    conn = dict(zip(names, ports), ip="127.0.0.1", key=uuid.uuid4().hex, transport="tcp",
                signature_scheme="hmac-sha256", kernel_name="")
    path = os.path.join(directory, "kernel-bench.json")
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        json.dump(conn, f)
    return path, conn


################ The client: the wire format, signed and checked like jupyter_client


class Client:
    """One frontend: shell and control DEALERs and an iopub SUB, on raw pyzmq."""

    def __init__(self, ctx, conn):
        self.ctx, self.key, self.proc = ctx, conn["key"].encode(), None
        self.url = f"tcp://{conn['ip']}:"
        self.session = uuid.uuid4().hex
        self.shell = self.dealer(conn["shell_port"])
        self.control = self.dealer(conn["control_port"])
        self.iopub = ctx.socket(zmq.SUB)
        self.iopub.setsockopt(zmq.RCVHWM, 0)  # never drop output: the exactness rows count it
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self.iopub.connect(self.url + str(conn["iopub_port"]))

    def dealer(self, port):
        """A DEALER connected to the kernel's ROUTER on port."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.connect(self.url + str(port))
        return sock

    def sign(self, parts):
        """Hex HMAC-SHA256 over the four JSON frames."""
        return hmac.new(self.key, b"".join(parts), hashlib.sha256).hexdigest().encode()

    def send(self, sock, msg_type, content):
        """Sign and send one request; return its msg_id."""
        header = {"msg_id": uuid.uuid4().hex, "session": self.session, "username": "bench",
                  "date": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
                  "msg_type": msg_type, "version": "5.3"}
        parts = [json.dumps(d).encode() for d in (header, {}, {}, content)]
        sock.send_multipart([DELIM, self.sign(parts), *parts])
        return header["msg_id"]

    def recv(self, sock, deadline):
        """Receive and verify one message as (msg_type, parent msg_id, content)."""
        while not sock.poll(100):  # wake up often to notice a kernel that died
            if self.proc.poll() is not None:
                raise RuntimeError(f"kernel exited with code {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("kernel did not answer in time")
        frames = sock.recv_multipart()
        i = frames.index(DELIM)
        parts = frames[i + 2 : i + 6]
        if not hmac.compare_digest(frames[i + 1], self.sign(parts)):
            raise ValueError("kernel sent a message with a bad signature")
        header, parent, _, content = (json.loads(p) for p in parts)
        return header["msg_type"], parent.get("msg_id"), content

    def reply(self, sock, msg_id, timeout):
        """Wait for the reply to msg_id on sock, skipping stale replies."""
        deadline = time.monotonic() + timeout
        while True:
            msg_type, parent, content = self.recv(sock, deadline)
            if parent == msg_id:
                if content.get("status") != "ok":
                    raise RuntimeError(f"{msg_type}: {content}")
                return content

    def until_idle(self, msg_id, timeout):
        """Collect the iopub messages of msg_id up to its status idle; skip other parents'."""
        deadline, msgs = time.monotonic() + timeout, []
        while True:
            msg = self.recv(self.iopub, deadline)
            if msg[1] == msg_id:
                msgs.append(msg)
                if msg[0] == "status" and msg[2]["execution_state"] == "idle":
                    return msgs

    def sync(self, timeout=30):
        """Nudge with kernel_info until its idle arrives on iopub (the slow-joiner dance)."""
        deadline = time.monotonic() + timeout
        while True:
            msg_id = self.send(self.shell, "kernel_info_request", {})
            self.reply(self.shell, msg_id, timeout)
            try:
                self.until_idle(msg_id, 0.2)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise

    def execute(self, code, timeout=30):
        """Run code; return (s to reply, s to idle, stdout text, number of iopub messages)."""
        t0 = time.perf_counter()
        msg_id = self.send(self.shell, "execute_request", execute_content(code))
        self.reply(self.shell, msg_id, timeout)
        t_reply = time.perf_counter() - t0
        msgs = self.until_idle(msg_id, timeout)
        t_idle = time.perf_counter() - t0
        text = "".join(c["text"] for t, _, c in msgs if t == "stream" and c["name"] == "stdout")
        return t_reply, t_idle, text, len(msgs)

    def close(self):
        """Close the three sockets without lingering."""
        for sock in (self.shell, self.control, self.iopub):
            sock.close(linger=0)


def execute_content(code):
    """An execute_request's content, as a notebook sends it."""
    return {"code": code, "silent": False, "store_history": True, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True}


################ Measurements: one kernel's whole life per rep


def throughput(client, conn):
    """10 shell clients, each with one execute in flight, 50 each; return exec/s."""
    socks = [client.dealer(conn["shell_port"]) for _ in range(CLIENTS)]
    for sock in socks:  # connect all before the clock starts
        client.reply(sock, client.send(sock, "kernel_info_request", {}), 30)
    poller, sent, done = zmq.Poller(), dict.fromkeys(socks, 1), 0
    deadline = time.monotonic() + 60
    t0 = time.perf_counter()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
        client.send(sock, "execute_request", execute_content("1+1"))
    while done < CLIENTS * EXECS:
        for sock, _ in poller.poll(100):
            msg_type, _, content = client.recv(sock, deadline)
            if content.get("status") != "ok":
                raise RuntimeError(f"{msg_type}: {content}")
            done += 1
            if sent[sock] < EXECS:
                client.send(sock, "execute_request", execute_content("1+1"))
                sent[sock] += 1
        if time.monotonic() > deadline:
            raise TimeoutError("10 × 50 executes did not finish in time")
    rate = done / (time.perf_counter() - t0)
    for sock in socks:
        sock.close(linger=0)
    client.sync()  # drain their busy/idle from our iopub before the next row
    return rate


def add(r, **values):
    """Append each value to its row's list of samples."""
    for key, value in values.items():
        r.setdefault(key, []).append(value)


def run_kernel(name, ctx, samples):
    """Start one kernel, measure every row on it, shut it down; return {row key: [values]}."""
    r = {}
    with tempfile.TemporaryDirectory() as tmp, open(os.path.join(tmp, "stderr"), "w+") as err:
        path, conn = write_connection_file(tmp)
        client = Client(ctx, conn)  # connected before the kernel binds: zmq queues and retries
        t0 = time.perf_counter()
        client.proc = proc = subprocess.Popen([*COMMANDS[name], path], stdin=subprocess.DEVNULL,
                                              stdout=subprocess.DEVNULL, stderr=err)
        rss = lambda: psutil.Process(proc.pid).memory_info().rss / 2**20  # in MiB
        try:
            client.reply(client.shell, client.send(client.shell, "kernel_info_request", {}), 60)
            add(r, startup=1e3 * (time.perf_counter() - t0))
            client.sync()
            add(r, rss_start=rss())
            for _ in range(samples):
                t = time.perf_counter()
                msg_id = client.send(client.shell, "kernel_info_request", {})
                client.reply(client.shell, msg_id, 30)
                add(r, info=1e3 * (time.perf_counter() - t))
                client.until_idle(msg_id, 30)
            for _ in range(samples):
                t_reply, t_idle, _, _ = client.execute("1+1")
                add(r, exec_reply=1e3 * t_reply, exec_idle=1e3 * t_idle)
            add(r, concurrency=throughput(client, conn))
            if name != "floor":  # the floor runs no code, so it has no output rows
                rss_before = rss()
                for _ in range(OUTPUT_RUNS):
                    _, t, text, n = client.execute(LINES_CODE, timeout=300)
                    add(r, lines_time=1e3 * t, lines_msgs=n, lines_exact=text == LINES_TEXT)
                    _, t, text, _ = client.execute(BIG_CODE, timeout=300)
                    add(r, big_rate=BIG / 2**20 / t, big_exact=text == "x" * (BIG - 1) + "\n")
                add(r, rss_end=rss())
                add(r, rss_growth=r["rss_end"][-1] - rss_before)
            t = time.perf_counter()
            client.send(client.control, "shutdown_request", {"restart": False})
            proc.wait(30)
            add(r, shutdown=1e3 * (time.perf_counter() - t))
        except Exception as exc:
            err.seek(0)
            raise RuntimeError(f"{name}: {exc}\n--- {name} stderr (tail) ---\n"
                               f"{err.read()[-2000:]}") from exc
        finally:
            client.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return r


################ The table

# key, label, statistic, minikernel's target as (reference kernel or None, op, bound): a target
# with a reference compares minikernel's ratio to it, one without compares the value itself.
ROWS = [
    ("startup", "startup → kernel_info_reply, ms", "median", ("floor", "≤", 1.5)),
    ("info", "kernel_info round trip, ms", "median", ("floor", "≤", 1.5)),
    ("exec_reply", "execute 1+1 → reply, ms", "median", ("floor", "≤", 2)),
    ("exec_reply", "execute 1+1 → reply, p99 ms", "p99", None),
    ("exec_idle", "execute 1+1 → idle, ms", "median", ("floor", "≤", 2)),
    ("exec_idle", "execute 1+1 → idle, p99 ms", "p99", None),
    ("concurrency", f"{CLIENTS} clients × {EXECS} executes, exec/s", "median",
     ("ipykernel", "≥", 10)),
    # Half ipykernel's time is twice its lines/s.
    ("lines_time", "100k print lines → idle, ms", "median", ("ipykernel", "≤", 0.5)),
    ("lines_msgs", "100k lines: iopub messages", "median", (None, "≤", 50)),
    ("lines_exact", "100k lines: text exact", "all", (None, "=", True)),
    ("big_rate", "10 MiB print, MiB/s", "median", ("ipykernel", "≥", 1)),
    ("big_exact", "10 MiB print: text exact", "all", (None, "=", True)),
    ("rss_start", "RSS after startup, MiB", "median", (None, "≤", 25)),
    ("rss_end", "RSS after output rows, MiB", "median", None),
    ("rss_growth", "RSS growth across the output rows, MiB", "median", (None, "<", 2)),
    ("shutdown", "shutdown_request → exit, ms", "median", (None, "≤", 50)),
]
OPS = {"≤": operator.le, "≥": operator.ge, "<": operator.lt, "=": operator.eq}


def num(x):
    """About three significant digits, never in scientific notation."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def stat(values, how):
    """The row's statistic over all reps' samples: median, p99 or all-true."""
    if how == "all":
        return all(values)
    if how == "p99":
        return sorted(values)[max(0, -(-99 * len(values) // 100) - 1)]
    return statistics.median(values)


def table(results):
    """Markdown table: each kernel's median (min–max) ×ratio to minikernel, then the target."""
    names = list(results)
    lines = ["| row | " + " | ".join(names) + " | minikernel target |",
             "|---" * (len(names) + 2) + "|"]
    for key, label, how, target in ROWS:
        center = {n: stat(results[n][key], how) for n in names if results[n].get(key)}
        cells = []
        for n in names:
            if n not in center:
                cells.append("—")
            elif how == "all":
                cells.append("yes" if center[n] else "**no**")
            else:
                vals, cell = results[n][key], num(center[n])
                if how == "median" and num(min(vals)) != num(max(vals)):
                    cell += f" ({num(min(vals))}–{num(max(vals))})"
                mini = center.get("minikernel")
                if n != "minikernel" and mini and mini > 0 and center[n] > 0:
                    cell += f" ×{center[n] / mini:.2f}"
                cells.append(cell)
        cells.append(verdict(center, target))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(center, target):
    """'target: value ✓/✗' for minikernel, or — when the row has no target or no data."""
    if target is None or "minikernel" not in center or target[0] and target[0] not in center:
        return "—"
    ref, op, bound = target
    value = center["minikernel"] / center[ref] if ref else center["minikernel"]
    mark = "✓" if OPS[op](value, bound) else "✗"
    if ref:
        return f"{op} {bound}× {ref}: {value:.2f}× {mark}"
    return f"{'yes' if bound is True else f'{op} {bound}'} {mark}"


def machine_line(kernels, reps, samples):
    """Date, CPU, cores, Python and pyzmq versions, so a pasted table carries its context."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    parts = [f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", f"{cpu}, {os.cpu_count()} cores",
             platform.system(), f"Python {platform.python_version()}",
             f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()})"]
    if "ipykernel" in kernels:
        parts.append(f"ipykernel {importlib.metadata.version('ipykernel')}")
    parts += [f"reps={reps}, {samples} round trips each",
              f"`{' '.join(['python bench/compare.py', *sys.argv[1:]])}`"]
    return " · ".join(parts)


################ Main


def main():
    """Parse options, run the kernels interleaved rep by rep, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", help="comma-separated, from minikernel,ipykernel,floor "
                   "(default: those present; with --quick: minikernel,floor)")
    p.add_argument("--reps", type=int, help="kernel lives per kernel (default 5, --quick 3)")
    p.add_argument("--quick", action="store_true", help="fewer reps and round trips")
    args = p.parse_args()
    present = {"minikernel": os.path.exists(MINIKERNEL),
               "ipykernel": importlib.util.find_spec("ipykernel") is not None, "floor": True}
    default = ["minikernel", "floor"] if args.quick else list(COMMANDS)
    kernels = args.kernels.split(",") if args.kernels else [k for k in default if present[k]]
    if unknown := set(kernels) - set(COMMANDS):
        p.error(f"unknown kernels: {', '.join(sorted(unknown))}")
    reps = args.reps or (3 if args.quick else 5)
    samples = 50 if args.quick else 200

    ctx = zmq.Context()
    # Retry connects every 5 ms, not zmq's 100 ms, so startup is not rounded up to 100 ms steps.
    ctx.setsockopt(zmq.RECONNECT_IVL, 5)
    results = {name: {} for name in kernels}
    try:
        for rep in range(reps):
            for name in kernels:  # A, B, C, A, B, C …: noise hits every kernel alike
                print(f"rep {rep + 1}/{reps}: {name}", file=sys.stderr, flush=True)
                for key, values in run_kernel(name, ctx, samples).items():
                    results[name].setdefault(key, []).extend(values)
    except Exception as exc:
        print(f"FAILED {exc}", file=sys.stderr)
        return 1
    finally:
        ctx.destroy(linger=0)
    print(machine_line(kernels, reps, samples))
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
