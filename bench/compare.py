"""Benchmark minikernel against its peers and a pyzmq echo floor, interleaved, with one raw client.

    python bench/compare.py                      # all kernels present, 5 reps, and the consoles
    python bench/compare.py --quick              # minikernel + floor, under a minute
    python bench/compare.py --kernels minikernel,ipykernel --reps 3
    python bench/compare.py --xeus-python /work/xeus-venv/bin/python   # or XEUS_PYTHON=...
    python bench/compare.py --soak 50000         # adds the soak rows (minutes: see --help)

The peers: ipykernel, from this interpreter; xeus-python (plain and --raw), from the interpreter
of its own venv (bench/requirements-bench.txt), since its wheel pins its own IPython. A peer that
is not installed keeps its columns, which say so. Prints markdown tables: per row the median
(min–max) of each kernel, its ratio to minikernel, and whether minikernel meets the row's
target from issue 14; then the two consoles on one minikernel. Exits 1 if a kernel fails; a peer
that fails is named under the table, which keeps what it measured before.
"""

import argparse
import contextlib
import hashlib
import hmac
import importlib.metadata
import json
import operator
import os
import platform
import select
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
MINICONSOLE = os.path.join(os.path.dirname(HERE), "miniconsole.py")
XEUS = "xeus-python"  # the interpreter of xeus-python's venv: --xeus-python or $XEUS_PYTHON
COMMANDS = {  # a kernel's command line, without the connection file; XEUS is filled in by main
    "minikernel": None,  # its kernelspec's, filled in by main: see kernelspec_argv
    "xeus-python --raw": [XEUS, "-m", "xpython_launcher", "--raw", "-f"],
    "xeus-python": [XEUS, "-m", "xpython_launcher", "-f"],
    "ipykernel": [sys.executable, "-m", "ipykernel_launcher", "-f"],
    "floor": [sys.executable, os.path.join(HERE, "floor.py"), "-f"],
}
DELIM = b"<IDS|MSG>"
CLIENTS, EXECS = 10, 50
SUBSCRIBERS = 20  # idle iopub subscribers in the fan-out row
LINES_CODE = "for i in range(100000): print(i)"
LINES_TEXT = "".join(f"{i}\n" for i in range(100000))
BIG = 10 * 2**20
BIG_CODE = f"print('x' * {BIG - 1})"  # print's newline makes it exactly 10 MiB
OUTPUT_RUNS = 3  # each output row runs this often per kernel life: warm runs count too
SOAK_WINDOW = 1000  # the soak's RTT is the median of its first and of its last this many


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
        self.poller = zmq.Poller()  # execute reads shell and iopub as they come
        self.poller.register(self.shell, zmq.POLLIN)
        self.poller.register(self.iopub, zmq.POLLIN)

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
            self.check(deadline)
        frames = sock.recv_multipart()
        i = frames.index(DELIM)
        parts = frames[i + 2 : i + 6]
        if not hmac.compare_digest(frames[i + 1], self.sign(parts)):
            raise ValueError("kernel sent a message with a bad signature")
        header, parent, _, content = (json.loads(p) for p in parts)
        return header["msg_type"], (parent or {}).get("msg_id"), content  # xeus: may be null

    def check(self, deadline):
        """Raise if the kernel has exited or the deadline has passed."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"kernel exited with code {self.proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError("kernel did not answer in time")

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
        """Run code; return (s to reply, s to reply and idle, stdout text, iopub messages).

        It reads shell and iopub as messages come, as a notebook does: output is checked and
        decoded while the kernel makes more, if the kernel sends it in pieces."""
        t0 = time.perf_counter()
        msg_id = self.send(self.shell, "execute_request", execute_content(code))
        deadline, t_reply, t_idle, msgs = time.monotonic() + timeout, None, None, []
        while t_reply is None or t_idle is None:
            events = self.poller.poll(100)
            if not events:
                self.check(deadline)
            for sock, _ in events:
                msg_type, parent, content = self.recv(sock, deadline)
                if parent != msg_id:
                    continue
                if sock is self.iopub:
                    msgs.append((msg_type, parent, content))
                    if msg_type == "status" and content["execution_state"] == "idle":
                        t_idle = time.perf_counter() - t0
                elif content.get("status") != "ok":
                    raise RuntimeError(f"{msg_type}: {content}")
                else:
                    t_reply = time.perf_counter() - t0
        text = "".join(c["text"] for t, _, c in msgs if t == "stream" and c["name"] == "stdout")
        return t_reply, max(t_reply, t_idle), text, len(msgs)

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


def cpu(proc):
    """CPU seconds the process has used so far, all its threads, user and system."""
    try:  # Linux counts each thread's time on CPU in ns; cpu_times only in 10 ms ticks
        total = 0
        for task in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except OSError:
        t = psutil.Process(proc.pid).cpu_times()
        return t.user + t.system


def fan_out(client, conn, samples):
    """Execute → idle, µs, with SUBSCRIBERS more iopub subscribers that never read."""
    subs = []
    for _ in range(SUBSCRIBERS):
        sub = client.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(client.url + str(conn["iopub_port"]))
        subs.append(sub)
    deadline = time.monotonic() + 30
    while not all(sub.poll(0) for sub in subs):  # each one has heard the kernel: connected
        if time.monotonic() > deadline:
            raise TimeoutError("the idle subscribers did not connect")
        client.sync()
    for sub in subs:  # empty their queues, then leave them alone: idle from here on
        while sub.poll(0):
            sub.recv_multipart()
    times = [1e6 * client.execute("1+1")[1] for _ in range(samples)]
    for sub in subs:
        sub.close(linger=0)
    client.sync()
    return times


def kernelspec_argv():
    """minikernel's command line as Jupyter runs it: from the kernelspec that its install writes
    (which also caches its bytecode), up to the connection file."""
    with tempfile.TemporaryDirectory() as prefix:
        subprocess.run([sys.executable, MINIKERNEL, "install", "--prefix", prefix], check=True,
                       capture_output=True)
        with open(os.path.join(prefix, "share", "jupyter", "kernels", "minikernel",
                               "kernel.json")) as f:
            argv = json.load(f)["argv"]
    return argv[: argv.index("{connection_file}")]


def start(name, ctx, tmp, err):
    """Write a connection file, connect a client, start the kernel; return the client."""
    path, conn = write_connection_file(tmp)
    client = Client(ctx, conn)  # connected before the kernel binds: zmq queues and retries
    client.conn = conn
    client.started = time.perf_counter()  # the startup row's zero
    client.proc = subprocess.Popen([*COMMANDS[name], path], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=err)
    return client


def stop(client, r):
    """Shut the kernel down with a shutdown_request on control, timed as the shutdown row."""
    t = time.perf_counter()
    client.send(client.control, "shutdown_request", {"restart": False})
    client.proc.wait(30)
    add(r, shutdown=1e3 * (time.perf_counter() - t))


@contextlib.contextmanager
def kernel_life(name, ctx):
    """One kernel from start to kill, its stderr's tail in the error if anything fails."""
    with tempfile.TemporaryDirectory() as tmp, open(os.path.join(tmp, "stderr"), "w+") as err:
        client = start(name, ctx, tmp, err)
        try:
            yield client
        except Exception as exc:
            err.seek(0)
            raise RuntimeError(f"{name}: {exc}\n--- {name} stderr (tail) ---\n"
                               f"{err.read()[-2000:]}") from exc
        finally:
            client.close()
            if client.proc.poll() is None:
                client.proc.kill()
                client.proc.wait()


def rss(proc):
    """The process's resident set, MiB."""
    return psutil.Process(proc.pid).memory_info().rss / 2**20


def run_kernel(name, ctx, samples):
    """Start one kernel, measure every row on it, shut it down; return {row key: [values]}."""
    r = {}
    with kernel_life(name, ctx) as client:
        client.reply(client.shell, client.send(client.shell, "kernel_info_request", {}), 60)
        add(r, startup=1e3 * (time.perf_counter() - client.started))
        client.sync()
        add(r, rss_start=rss(client.proc))
        for _ in range(samples):
            t = time.perf_counter()
            msg_id = client.send(client.shell, "kernel_info_request", {})
            client.reply(client.shell, msg_id, 30)
            add(r, info=1e6 * (time.perf_counter() - t))
            client.until_idle(msg_id, 30)
        cpu0 = cpu(client.proc)
        for _ in range(samples):
            t_reply, t_idle, _, _ = client.execute("1+1")
            add(r, exec_reply=1e6 * t_reply, exec_idle=1e6 * t_idle)
        add(r, exec_cpu=1e6 * (cpu(client.proc) - cpu0) / samples)
        fanned = fan_out(client, client.conn, samples)
        one = statistics.median(r["exec_idle"][-samples:])  # this life's, with 1 subscriber
        r.setdefault("fan_idle", []).extend(fanned)
        add(r, fan_slowdown=statistics.median(fanned) / one)
        add(r, concurrency=throughput(client, client.conn))
        if name != "floor":  # the floor runs no code, so it has no output rows
            rss_before = rss(client.proc)
            for _ in range(OUTPUT_RUNS):
                _, t, text, n = client.execute(LINES_CODE, timeout=300)
                add(r, lines_time=1e3 * t, lines_msgs=n, lines_exact=text == LINES_TEXT)
                _, t, text, _ = client.execute(BIG_CODE, timeout=300)
                add(r, big_time=1e3 * t, big_exact=text == "x" * (BIG - 1) + "\n")
            add(r, rss_end=rss(client.proc))
            add(r, rss_growth=r["rss_end"][-1] - rss_before)
        stop(client, r)
    return r


def run_soak(name, ctx, n):
    """n small cells on one kernel: RTT and kernel CPU of the first and last SOAK_WINDOW, RSS on
    the way."""
    r, marks = {}, [(SOAK_WINDOW, "soak_rss_1"), (n // 2, "soak_rss_2"), (n, "soak_rss_3")]
    with kernel_life(name, ctx) as client:
        client.sync()
        rtts, cpu_before = [], {}  # cell number: the kernel's CPU seconds before it ran
        for i in range(1, n + 1):
            if i in (1, SOAK_WINDOW + 1, n - SOAK_WINDOW + 1):
                cpu_before[i] = cpu(client.proc)
            rtts.append(1e6 * client.execute(f"{i} + 1")[1])  # each cell new: nothing cached
            for at, key in marks:
                if i == at:
                    add(r, **{key: rss(client.proc)})
        add(r, soak_first=statistics.median(rtts[:SOAK_WINDOW]),
            soak_last=statistics.median(rtts[-SOAK_WINDOW:]))
        first_cpu = cpu_before[SOAK_WINDOW + 1] - cpu_before[1]
        add(r, soak_cpu_drift=(cpu(client.proc) - cpu_before[n - SOAK_WINDOW + 1]) / first_cpu)
        add(r, soak_drift=r["soak_last"][0] / r["soak_first"][0],
            soak_growth=r["soak_rss_3"][0] - r["soak_rss_1"][0])
        stop(client, {})
    return r


################ The consoles: miniconsole and jupyter console, piped, on one minikernel

CONSOLES = {
    "miniconsole": [sys.executable, MINICONSOLE, "--existing"],
    "jupyter console": [sys.executable, "-m", "jupyter_console", "--simple-prompt", "--existing"],
}


def peak_rss(pid, peak):
    """The larger of peak and the process's high-water RSS so far, MiB (Linux's VmHWM)."""
    # Not getrusage: a child's ru_maxrss counts the memory of the parent it was forked from.
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return max(peak, int(line.split()[1]) / 1024)
    return peak


def piped(cmd, code, first=None):
    """Run a console with code on its stdin; return (s to first, s to exit, stdout, peak MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    proc.stdin.write(code.encode() + b"\n")
    proc.stdin.close()
    out, t_first, peak = bytearray(), None, 0.0
    while True:
        if select.select([proc.stdout], [], [], 0.01)[0]:  # wake every 10 ms to read VmHWM
            if not (chunk := os.read(proc.stdout.fileno(), 1 << 16)):
                break
            out += chunk
            if t_first is None and first and first in out:
                t_first = time.perf_counter() - t0
        peak = peak_rss(proc.pid, peak)
    proc.wait(30)
    t_exit = time.perf_counter() - t0
    proc.stdout.close()
    if proc.returncode:
        raise RuntimeError(f"{cmd[2]} exited with {proc.returncode}")
    return t_first, t_exit, out.decode(), peak


def run_consoles(ctx, reps):
    """Each console, interleaved, on the same running minikernel; return {console: rows}."""
    results = {name: {} for name in CONSOLES}
    with kernel_life("minikernel", ctx) as client, tempfile.TemporaryDirectory() as tmp:
        client.sync()
        path = os.path.join(tmp, "kernel.json")
        with open(path, "w") as f:
            json.dump(client.conn, f)
        for rep in range(reps):
            for name, cmd in CONSOLES.items():
                print(f"consoles {rep + 1}/{reps}: {name}", file=sys.stderr, flush=True)
                t_first, t_exit, out, peak = piped([*cmd, path], "print(6*7)", b"42\n")
                if t_first is None:
                    raise RuntimeError(f"{name} did not print 42: {out[-200:]!r}")
                add(results[name], first=1e3 * t_first, exit=1e3 * t_exit, peak=peak)
                _, t_exit, out, peak = piped([*cmd, path], LINES_CODE)
                add(results[name], lines=1e3 * t_exit, exact=LINES_TEXT in out,
                    peak=peak)
        stop(client, {})
    return results


################ The tables

# key, label, statistic, the subject's targets: each (reference or None, op, bound). One with a
# reference compares the subject's ratio to it ("+≤": the difference), one without compares
# the value itself. Targets from issue 14; a reference that did not run is skipped.
XR = "xeus-python --raw"
ROWS = [
    ("startup", "startup → kernel_info_reply, ms", "median", [("floor", "≤", 1.3)]),
    ("info", "kernel_info round trip, µs", "median", [(XR, "≤", 1), ("floor", "≤", 1.3)]),
    ("exec_reply", "execute 1+1 → reply, µs", "median", []),
    ("exec_idle", "execute 1+1 → reply + idle, µs", "median", [(XR, "≤", 1)]),
    ("exec_idle", "execute 1+1 → reply + idle, p99 µs", "p99", [(XR, "≤", 1)]),
    ("exec_cpu", "kernel CPU per execute, µs", "median", [(XR, "≤", 1)]),
    ("fan_idle", f"execute → idle, {SUBSCRIBERS} idle subscribers, µs", "median", []),
    ("fan_slowdown", f"fan-out slow-down: {SUBSCRIBERS} subscribers / 1", "median",
     [("floor", "≤", 1.15)]),
    ("concurrency", f"{CLIENTS} clients × {EXECS} executes, exec/s", "median", [(XR, "≥", 1)]),
    # Twice as fast as every peer that keeps the text exact (xeus-python loses some).
    ("lines_time", "100k print lines → idle, ms", "median", [("ipykernel", "≤", 0.5)]),
    ("lines_msgs", "100k lines: iopub messages", "median", [(None, "≤", 50)]),
    ("lines_exact", "100k lines: text exact", "all", [(None, "=", True)]),
    ("big_time", "10 MiB print → idle, ms", "median", [("ipykernel", "≤", 0.5)]),
    ("big_exact", "10 MiB print: text exact", "all", [(None, "=", True)]),
    ("rss_start", "RSS after startup, MiB", "median", [("floor", "+≤", 3)]),
    ("rss_end", "RSS after output rows, MiB", "median", [("floor", "+≤", 5)]),
    ("rss_growth", "RSS growth across the output rows, MiB", "median", [(None, "<", 2)]),
    ("shutdown", "shutdown_request → exit, ms", "median", [(None, "≤", 25)]),
    ("soak_first", f"soak: execute → idle, first {SOAK_WINDOW:,}, µs", "median", []),
    ("soak_last", f"soak: execute → idle, last {SOAK_WINDOW:,}, µs", "median", []),
    ("soak_drift", f"soak: last {SOAK_WINDOW:,} / first {SOAK_WINDOW:,}", "median",
     [(None, "≤", 1.1)]),
    ("soak_cpu_drift", f"soak: kernel CPU per execute, last {SOAK_WINDOW:,} / first "
     f"{SOAK_WINDOW:,}", "median", []),
    ("soak_rss_1", f"soak: RSS after {SOAK_WINDOW:,} cells, MiB", "median", []),
    ("soak_rss_2", "soak: RSS after {half:,} cells, MiB", "median", []),
    ("soak_rss_3", "soak: RSS after {n:,} cells, MiB", "median", []),
    ("soak_growth", f"soak: RSS growth from {SOAK_WINDOW:,} cells to all, MiB", "median",
     [(None, "≤", 12)]),
]
JC = "jupyter console"
CONSOLE_ROWS = [
    ("first", "launch → first output, `print(6*7)`, ms", "median", [(JC, "≤", 0.4)]),
    ("exit", "launch → exit, `print(6*7)`, ms", "median", []),
    ("lines", "launch → exit, 100k print lines, ms", "median", [(JC, "≤", 0.6)]),
    ("exact", "100k lines: text exact", "all", [(None, "=", True)]),
    ("peak", "peak RSS, MiB", "median", []),
]
OPS = {"≤": operator.le, "≥": operator.ge, "<": operator.lt, "=": operator.eq,
       "+≤": operator.le}


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


def table(results, rows, absent=(), **labels):
    """Markdown table: each column's median (min–max) ×ratio to the first, then the targets."""
    names, subject = list(results), next(iter(results))
    lines = ["| row | " + " | ".join(names) + f" | {subject} target |",
             "|---" * (len(names) + 2) + "|"]
    for key, label, how, targets in rows:
        center = {n: stat(results[n][key], how) for n in names if results[n].get(key)}
        if not center:
            continue  # a row nobody measured: the soak without --soak
        cells = []
        for n in names:
            if n in absent:
                cells.append("not installed")
            elif n not in center:
                cells.append("—")
            elif how == "all":
                cells.append("yes" if center[n] else "**no**")
            else:
                vals, cell = results[n][key], num(center[n])
                if how == "median" and num(min(vals)) != num(max(vals)):
                    cell += f" ({num(min(vals))}–{num(max(vals))})"
                base = center.get(subject)
                if n != subject and base and base > 0 and center[n] > 0:
                    cell += f" ×{center[n] / base:.2f}"
                cells.append(cell)
        cells.append("; ".join(verdict(center, subject, t) for t in targets
                               if subject in center and (t[0] is None or t[0] in center)
                               and t[0] != subject) or "—")
        lines.append(f"| {label.format(**labels)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(center, subject, target):
    """'op bound× ref: value ✓/✗' for the subject's value on one target."""
    ref, op, bound = target
    value = center[subject]
    if op == "+≤":
        value -= center[ref]
        return f"≤ {ref} + {bound}: +{num(value)} {'✓' if value <= bound else '✗'}"
    if ref:
        value /= center[ref]
    mark = "✓" if OPS[op](value, bound) else "✗"
    if ref:
        return f"{op} {bound}× {ref}: {value:.2f}× {mark}"
    return f"{'yes' if bound is True else f'{op} {bound}'} {mark}"


def version(python, package):
    """A package's version in another interpreter, or None if it is not there."""
    try:
        out = subprocess.run([python, "-c", "import importlib.metadata as m, sys; "
                              "print(m.version(sys.argv[1]))", package],
                             capture_output=True, text=True, timeout=60)
    except OSError:  # no such interpreter
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_line(kernels, reps, samples, versions):
    """Date, CPU, cores, load, Python and package versions, so a pasted table has its context."""
    cpu_name = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu_name = next((ln.split(":", 1)[1].strip() for ln in f
                             if ln.startswith("model name")), cpu_name)
    parts = [f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"{cpu_name}, {os.cpu_count()} cores",
             f"load {os.getloadavg()[0]:.1f}", platform.system(),
             f"Python {platform.python_version()}",
             f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()})"]
    parts += [f"{package} {v}" for package, v in versions.items() if v]
    parts += [f"reps={reps}, {samples} round trips each",
              f"`{' '.join(['python bench/compare.py', *sys.argv[1:]])}`"]
    return " · ".join(parts)


################ Main


def main():
    """Parse options, run the kernels interleaved rep by rep, print the tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", help=f"comma-separated, from {','.join(COMMANDS)} "
                   "(default: all; with --quick: minikernel,floor)")
    p.add_argument("--reps", type=int, help="kernel lives per kernel (default 5, --quick 3)")
    p.add_argument("--quick", action="store_true", help="fewer reps and round trips, "
                   "and no console rows")
    p.add_argument("--xeus-python", default=os.environ.get("XEUS_PYTHON"), metavar="PYTHON",
                   help="the python of a venv with bench/requirements-bench.txt installed "
                   "(default: $XEUS_PYTHON)")
    p.add_argument("--soak", type=int, metavar="N", help="also run N small cells on one "
                   "kernel of each kind but the floor; 50000 takes about 1 min for minikernel, "
                   "2 for xeus-python, 5 for ipykernel")
    p.add_argument("--consoles", action=argparse.BooleanOptionalAction,
                   help="the console rows (default: on, off with --quick)")
    args = p.parse_args()
    if args.soak is not None and args.soak < 2 * SOAK_WINDOW:
        p.error(f"--soak needs at least {2 * SOAK_WINDOW} cells")
    try:
        versions = {"ipykernel": importlib.metadata.version("ipykernel")}
    except importlib.metadata.PackageNotFoundError:
        versions = {"ipykernel": None}
    if args.xeus_python:
        versions["xeus-python"] = version(args.xeus_python, "xeus-python")
        for name in ("xeus-python --raw", "xeus-python"):
            COMMANDS[name][0] = args.xeus_python
    xeus = bool(versions.get("xeus-python"))
    present = {"minikernel": os.path.exists(MINIKERNEL), "floor": True,
               "ipykernel": bool(versions["ipykernel"]), XR: xeus, "xeus-python": xeus}
    default = ["minikernel", "floor"] if args.quick else list(COMMANDS)
    kernels = args.kernels.split(",") if args.kernels else default
    if unknown := set(kernels) - set(COMMANDS):
        p.error(f"unknown kernels: {', '.join(sorted(unknown))}")
    absent = [k for k in kernels if not present[k]]
    for name in absent:
        print(f"{name}: not installed, its column says so"
              + (" (see bench/requirements-bench.txt)" if "xeus" in name else ""),
              file=sys.stderr)
    running = [k for k in kernels if present[k]]
    if present["minikernel"]:  # the console rows run on a minikernel too
        COMMANDS["minikernel"] = kernelspec_argv()
    reps = args.reps or (3 if args.quick else 5)
    samples = 50 if args.quick else 200

    ctx = zmq.Context()
    # Retry connects every 5 ms, not zmq's 100 ms, so startup is not rounded up to 100 ms steps.
    ctx.setsockopt(zmq.RECONNECT_IVL, 5)
    results = {name: {} for name in kernels}
    consoles, failed = None, {}  # a peer that fails is dropped from later reps, and named below

    def measure(name, label, run, *args):
        """Run one kernel life into results; minikernel's failure ends the run, a peer's not."""
        print(f"{label}: {name}", file=sys.stderr, flush=True)
        try:
            for key, values in run(name, ctx, *args).items():
                results[name].setdefault(key, []).extend(values)
        except Exception as exc:
            if name == "minikernel":
                raise
            print(f"FAILED {exc}", file=sys.stderr)
            failed[name] = f"{label}: {str(exc).splitlines()[0]}"

    try:
        for rep in range(reps):
            for name in running:  # A, B, C, A, B, C …: noise hits every kernel alike
                if name not in failed:
                    measure(name, f"rep {rep + 1}/{reps}", run_kernel, samples)
        for name in running if args.soak else ():
            if name != "floor" and name not in failed:
                measure(name, f"soak of {args.soak} cells", run_soak, args.soak)
        if args.consoles or (args.consoles is None and not args.quick):
            consoles = run_consoles(ctx, reps)
    except Exception as exc:
        print(f"FAILED {exc}", file=sys.stderr)
        return 1
    finally:
        ctx.destroy(linger=0)
    print(machine_line(kernels, reps, samples, versions))
    print()
    soak = args.soak or 0
    print(table(results, ROWS, absent, n=soak, half=soak // 2))
    for name, why in failed.items():
        print(f"\n{name} failed ({why}); its cells are from the runs before.")
    if consoles:
        print()
        print(table(consoles, CONSOLE_ROWS))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
