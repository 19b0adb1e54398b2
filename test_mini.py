"""Tests for minikernel and miniconsole: real processes, real sockets, real Jupyter clients.

Every kernel here is a real `python minikernel.py` process. The clients are jupyter_client,
jupyter_kernel_test, nbclient, jupyter console under pexpect, and raw pyzmq sockets.
Everything runs in a temporary Jupyter runtime and data dir, never the user's own.
"""

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import jupyter_kernel_test
import nbformat
import pexpect
import psutil
import pytest
import zmq
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel
from jupyter_client.session import Session
from nbclient import NotebookClient
from traitlets.config import Config

import miniconsole

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL = os.path.join(HERE, "minikernel.py")
TIMEOUT = 15

# One temporary Jupyter home for the whole run, with the minikernel kernelspec installed in it:
# set before any client or kernel starts, so nothing touches the user's own dirs.
# Every kernel started here also gets JPY_PARENT_PID, so none outlives a killed test run.
JUPYTER_HOME = tempfile.mkdtemp(prefix="minikernel-test-")
atexit.register(shutil.rmtree, JUPYTER_HOME, ignore_errors=True)
os.environ.update(JUPYTER_DATA_DIR=os.path.join(JUPYTER_HOME, "data"),
                  JUPYTER_RUNTIME_DIR=os.path.join(JUPYTER_HOME, "runtime"),
                  JUPYTER_PATH=os.path.join(JUPYTER_HOME, "data"),
                  JPY_PARENT_PID=str(os.getpid()))
os.makedirs(os.environ["JUPYTER_RUNTIME_DIR"], mode=0o700)
subprocess.run([sys.executable, KERNEL, "install", "--user"], check=True, capture_output=True)


################ Helpers


@pytest.fixture(scope="module")
def kernel():
    "A minikernel started by jupyter_client, shared by a module's tests: (manager, client)."
    km, kc = start_new_kernel(kernel_name="minikernel", startup_timeout=TIMEOUT)
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel(now=True)


@pytest.fixture()
def fresh_kernel():
    "A minikernel of the test's own, for tests that interrupt, restart or kill it."
    km, kc = start_new_kernel(kernel_name="minikernel", startup_timeout=TIMEOUT)
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def run(kc, code: str, stdin=(), timeout=TIMEOUT, **kw):
    "Execute code; return the reply content and its iopub messages as [(msg_type, content)]."
    outputs, answers = [], iter(stdin)
    reply = kc.execute_interactive(
        code, timeout=timeout, output_hook=outputs.append, allow_stdin=True,
        stdin_hook=lambda msg: kc.input(next(answers)), **kw)
    return reply["content"], [(m["msg_type"], m["content"]) for m in outputs]


def text(outputs, name="stdout") -> str:
    "All the stream text of one stream among the outputs."
    return "".join(c["text"] for t, c in outputs if t == "stream" and c["name"] == name)


def connection(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def start_raw(tmp_path, key="secret-key", extra_args=(), env=None):
    "A minikernel started by hand with a connection file we wrote: (process, connection)."
    path = str(tmp_path / f"kernel-{uuid.uuid4()}.json")
    ports = {f"{c}_port": free_port() for c in ("shell", "iopub", "stdin", "control", "hb")}
    conn = {**ports, "ip": "127.0.0.1", "key": key, "transport": "tcp",
            "signature_scheme": "hmac-sha256", "kernel_name": "minikernel"}
    with open(path, "w") as f:
        json.dump(conn, f)
    proc = subprocess.Popen([sys.executable, KERNEL, "-f", path, *extra_args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, {**conn, "path": path}


def free_port() -> int:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REP)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sock.close()
    return port


class Raw:
    "A bare pyzmq client, signed by jupyter_client's Session: the reference wire format."

    def __init__(self, conn: dict, key=None):
        self.ctx = zmq.Context()
        self.session = Session(key=(conn["key"] if key is None else key).encode())
        self.shell = self.connect(conn, "shell", zmq.DEALER)
        self.control = self.connect(conn, "control", zmq.DEALER)
        self.iopub = self.connect(conn, "iopub", zmq.SUB)
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")

    def connect(self, conn, channel, kind):
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.connect(f"tcp://{conn['ip']}:{conn[channel + '_port']}")
        return sock

    def frames(self, msg_type: str, content: dict) -> list:
        return self.session.serialize(self.session.msg(msg_type, content))

    def request(self, msg_type: str, content: dict, sock=None, timeout=TIMEOUT) -> dict:
        "Send a signed request and wait for its reply."
        sock = sock or self.shell
        sock.send_multipart(self.frames(msg_type, content))
        return self.recv(sock, timeout)

    def recv(self, sock, timeout=TIMEOUT) -> dict:
        if not sock.poll(timeout * 1000):
            raise TimeoutError("no reply")
        _, frames = self.session.feed_identities(sock.recv_multipart())
        return self.session.deserialize(frames)

    def close(self, linger=0):
        self.ctx.destroy(linger=linger)


def wait_ready(raw: Raw, proc=None, timeout=TIMEOUT) -> dict:
    "Nudge with kernel_info_request until the kernel answers."
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the kernel died at startup: {proc.communicate()}")
        raw.shell.send_multipart(raw.frames("kernel_info_request", {}))
        if raw.shell.poll(200):
            return raw.recv(raw.shell)
    raise TimeoutError("kernel never answered kernel_info_request")


def stop(proc: subprocess.Popen) -> str:
    "Stop a kernel we started (SIGTERM, then SIGKILL) and return its stderr."
    proc.terminate()
    try:
        return proc.communicate(timeout=5)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise


################ Conformance: jupyter_kernel_test's own checks


class TestKernelConformance(jupyter_kernel_test.KernelTests):
    kernel_name = "minikernel"
    language_name = "python"
    file_extension = ".py"
    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('oops', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}},
                          {"text": "import o", "matches": {"object", "oct", "open", "or", "ord"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2", "for i in range(3):"]
    invalid_code_samples = ["import = 7q", "x = )"]
    code_page_something = "zip?"
    code_generate_error = "raise ValueError('boom')"
    code_execute_result = [{"code": "1+2+3", "result": "6"},
                           {"code": "[n*n for n in range(1, 4)]", "result": "[1, 4, 9]"}]
    code_display_data = [
        {"code": "class P:\n    def _repr_png_(self): return b'\\x89PNG'\ndisplay(P())",
         "mime": "image/png"},
        {"code": "class H:\n    def _repr_html_(self): return '<b>hi</b>'\ndisplay(H())",
         "mime": "text/html"}]
    code_history_pattern = "1?2*"
    supported_history_operations = ("tail", "range", "search")
    code_inspect_sample = "zip"
    code_clear_output = "clear_output()"


class TestIopubWelcome(jupyter_kernel_test.IopubWelcomeTests):
    kernel_name = "minikernel"
    support_iopub_welcome = True


################ Execution: REPL semantics


def test_last_expression_is_the_result_and_underscore_keeps_it(kernel):
    _, kc = kernel
    reply, outputs = run(kc, "x = 6 * 7\nx")
    assert reply["status"] == "ok"
    results = [c for t, c in outputs if t == "execute_result"]
    assert [r["data"]["text/plain"] for r in results] == ["42"]
    assert results[0]["execution_count"] == reply["execution_count"]
    _, outputs = run(kc, "_ + 1")
    assert [c["data"]["text/plain"] for t, c in outputs if t == "execute_result"] == ["43"]
    _, outputs = run(kc, "None")
    assert not [t for t, c in outputs if t == "execute_result"]


def test_namespace_is_main_and_persists(kernel):
    _, kc = kernel
    run(kc, "class Point:\n    pass\np = Point()")
    reply, outputs = run(kc, "import pickle\nprint(__name__, type(pickle.loads(pickle.dumps(p))))")
    assert reply["status"] == "ok"
    assert text(outputs) == "__main__ <class '__main__.Point'>\n"


def test_every_rich_repr_is_in_the_bundle(kernel):
    _, kc = kernel
    code = (
        "class Rich:\n"
        "    def __repr__(self): return 'Rich()'\n"
        "    def _repr_html_(self): return '<b>r</b>'\n"
        "    def _repr_markdown_(self): return '**r**'\n"
        "    def _repr_svg_(self): return '<svg/>'\n"
        "    def _repr_png_(self): return b'png'\n"
        "    def _repr_jpeg_(self): return b'jpeg'\n"
        "    def _repr_latex_(self): return '$r$'\n"
        "    def _repr_json_(self): return {'r': 1}\n"
        "    def _repr_mimebundle_(self, include=None, exclude=None):\n"
        "        return {'text/x-custom': 'c'}\n"
        "class Broken:\n"
        "    def _repr_html_(self): raise RuntimeError('no')\n"
        "Rich()")
    reply, outputs = run(kc, code)
    data = [c for t, c in outputs if t == "execute_result"][0]["data"]
    assert data == {"text/plain": "Rich()", "text/html": "<b>r</b>", "text/markdown": "**r**",
                    "image/svg+xml": "<svg/>", "image/png": "cG5n", "image/jpeg": "anBlZw==",
                    "text/latex": "$r$", "application/json": {"r": 1}, "text/x-custom": "c"}
    reply, outputs = run(kc, "Broken()")  # a broken rich repr falls back to text/plain
    assert reply["status"] == "ok"
    assert list([c for t, c in outputs if t == "execute_result"][0]["data"]) == ["text/plain"]


def test_display_update_and_clear_output(kernel):
    _, kc = kernel
    reply, outputs = run(kc, "display('a', 'b')\ndisplay(1, display_id='d')\n"
                             "display(2, display_id='d', update=True)\nclear_output(wait=True)")
    assert reply["status"] == "ok"
    kinds = [(t, c.get("data", {}).get("text/plain"), c.get("transient")) for t, c in outputs
             if t in ("display_data", "update_display_data")]
    assert kinds == [("display_data", "'a'", {}), ("display_data", "'b'", {}),
                     ("display_data", "1", {"display_id": "d"}),
                     ("update_display_data", "2", {"display_id": "d"})]
    assert ("clear_output", {"wait": True}) in outputs


def test_execution_count_and_execute_input(kernel):
    _, kc = kernel
    first, outputs = run(kc, "1")
    n = first["execution_count"]
    assert ("execute_input", {"code": "1", "execution_count": n}) in outputs
    silent, outputs = run(kc, "2", silent=True)
    assert silent["execution_count"] == n  # silent: not counted, no execute_input, no result
    assert [t for t, c in outputs if t in ("execute_input", "execute_result")] == []
    unstored, _ = run(kc, "3", store_history=False)
    assert unstored["execution_count"] == n
    failed, _ = run(kc, "1/0")
    assert failed["execution_count"] == n + 1  # an error still counts
    nxt, _ = run(kc, "4")
    assert nxt["execution_count"] == n + 2


def test_order_busy_input_outputs_reply_idle(kernel):
    _, kc = kernel
    msg_id = kc.execute("print('one')\nimport sys; sys.stderr.write('two\\n')\n'three'")
    reply = kc.get_shell_msg(timeout=TIMEOUT)
    assert reply["parent_header"]["msg_id"] == msg_id
    seen = []
    while not seen or seen[-1] != ("status", "idle"):
        msg = kc.get_iopub_msg(timeout=TIMEOUT)
        if msg["parent_header"].get("msg_id") == msg_id:
            c = msg["content"]
            seen.append((msg["msg_type"], c.get("execution_state") or c.get("text")
                         or c.get("data", {}).get("text/plain") or c.get("code", "")[:5]))
    assert seen == [("status", "busy"), ("execute_input", "print"), ("stream", "one\n"),
                    ("stream", "two\n"), ("execute_result", "'three'"), ("status", "idle")]


def test_user_expressions(kernel):
    _, kc = kernel
    run(kc, "y = 5")
    reply, _ = run(kc, "pass", user_expressions={"double": "y * 2", "bad": "1/0"})
    exprs = reply["user_expressions"]
    assert exprs["double"] == {"status": "ok", "data": {"text/plain": "10"}, "metadata": {}}
    assert exprs["bad"]["status"] == "error" and exprs["bad"]["ename"] == "ZeroDivisionError"


def test_print_loop_arrives_exact_in_few_messages(kernel):
    _, kc = kernel
    reply, outputs = run(kc, "for i in range(100000): print(i)", timeout=60)
    assert reply["status"] == "ok"
    streams = [c["text"] for t, c in outputs if t == "stream"]
    assert "".join(streams) == "".join(f"{i}\n" for i in range(100000))
    assert len(streams) <= 50


def test_output_from_threads_reaches_iopub(kernel):
    _, kc = kernel
    reply, outputs = run(kc, "import threading\n"
                             "t = threading.Thread(target=lambda: print('from a thread'))\n"
                             "t.start(); t.join()")
    assert text(outputs) == "from a thread\n"
    # A thread that prints after its cell has finished: the text still arrives.
    run(kc, "import threading, time\n"
            "threading.Thread(target=lambda: (time.sleep(0.5), print('late'))).start()")
    deadline = time.monotonic() + 5
    late = []
    while time.monotonic() < deadline and not late:
        msg = kc.get_iopub_msg(timeout=5)
        late = [1 for _ in [0] if msg["msg_type"] == "stream" and "late" in msg["content"]["text"]]
    assert late
    assert run(kc, "1")[0]["status"] == "ok"


################ Errors


def test_error_traceback_shows_cell_lines_not_kernel_frames(kernel):
    _, kc = kernel
    reply, outputs = run(kc, "def f():\n    return 1/0\nf()")
    errors = [c for t, c in outputs if t == "error"]
    assert len(errors) == 1 and not text(outputs, "stderr")
    assert reply["status"] == "error" and reply["ename"] == "ZeroDivisionError"
    assert reply["traceback"] == errors[0]["traceback"]
    tb = "\n".join(reply["traceback"])
    n = reply["execution_count"]
    assert f"Cell In[{n}], line 3" in tb and f"Cell In[{n}], line 2" in tb
    assert "return 1/0" in tb
    assert "minikernel.py" not in tb


def test_syntax_error_shows_its_caret(kernel):
    _, kc = kernel
    reply, _ = run(kc, "x = (1 +\n   2))")
    assert reply["ename"] == "SyntaxError"
    tb = "\n".join(reply["traceback"])
    assert "^" in tb and "2))" in tb
    assert "Traceback" not in tb  # no frames at all: only the cell's line and its caret


def test_system_exit_does_not_kill_the_kernel(kernel):
    _, kc = kernel
    reply, _ = run(kc, "import sys; sys.exit(3)")
    assert reply["status"] == "error" and reply["ename"] == "SystemExit"
    reply, _ = run(kc, "raise SystemExit")
    assert reply["ename"] == "SystemExit"
    assert run(kc, "1 + 1")[0]["status"] == "ok"


def test_exit_asks_the_frontend_to_leave(kernel):
    _, kc = kernel
    for code, keep in [("exit", False), ("quit()", False), ("exit(keep_kernel=True)", True)]:
        reply, _ = run(kc, code)
        assert reply["payload"] == [{"source": "ask_exit", "keepkernel": keep}]
    assert run(kc, "'still serving'")[0]["status"] == "ok"


def test_stop_on_error_aborts_queued_cells(kernel):
    _, kc = kernel
    # The first cell sleeps so that the others are surely queued when it fails.
    ids = [kc.execute("import time; time.sleep(0.3); 1/0"), kc.execute("aborted_ran = True"),
           kc.execute("2", stop_on_error=False)]
    replies = {}
    while len(replies) < 3:
        msg = kc.get_shell_msg(timeout=TIMEOUT)
        replies[msg["parent_header"]["msg_id"]] = msg["content"]["status"]
    assert [replies[i] for i in ids] == ["error", "aborted", "aborted"]
    states = []
    while states.count("idle") < 3:  # each aborted request still gets busy and idle
        msg = kc.get_iopub_msg(timeout=TIMEOUT)
        if msg["parent_header"].get("msg_id") in ids and msg["msg_type"] == "status":
            states.append(msg["content"]["execution_state"])
    assert states == ["busy", "idle"] * 3
    reply, outputs = run(kc, "'aborted_ran' in dir()")
    assert [c["data"]["text/plain"] for t, c in outputs if t == "execute_result"] == ["False"]
    # Without stop_on_error, the next cell runs.
    ids = [kc.execute("import time; time.sleep(0.3); 1/0", stop_on_error=False), kc.execute("3")]
    statuses = [kc.get_shell_msg(timeout=TIMEOUT)["content"]["status"] for _ in ids]
    assert statuses == ["error", "ok"]


################ stdin: input() through the frontend


def test_input_and_getpass_are_answered_by_the_frontend(kernel):
    _, kc = kernel
    requests = []

    def answer(msg):
        requests.append(msg["content"])
        kc.input({"Name? ": "Ada", "Password: ": "s3cret"}[msg["content"]["prompt"]])

    outputs = []
    reply = kc.execute_interactive(
        "print('before')\nname = input('Name? ')\nimport getpass\npw = getpass.getpass()\n"
        "print(name, len(pw))", timeout=TIMEOUT, stdin_hook=answer, output_hook=outputs.append)
    assert reply["content"]["status"] == "ok"
    assert requests == [{"prompt": "Name? ", "password": False},
                        {"prompt": "Password: ", "password": True}]
    assert "".join(m["content"].get("text", "") for m in outputs) == "before\nAda 6\n"


def test_input_eof_raises_eoferror(kernel):
    _, kc = kernel
    reply, _ = run(kc, "input()", stdin=["\x04"])
    assert reply["ename"] == "EOFError"


def test_input_without_allow_stdin_fails_at_once(kernel):
    _, kc = kernel
    start = time.monotonic()
    reply = kc.execute_interactive("input('x')", allow_stdin=False, timeout=TIMEOUT)["content"]
    assert time.monotonic() - start < 5
    assert reply["ename"] == "StdinNotImplementedError"
    assert "allow_stdin" in reply["evalue"]


def test_interrupt_while_waiting_for_input(fresh_kernel):
    km, kc = fresh_kernel
    msg_id = kc.execute("input('wait: ')", allow_stdin=True)
    request = kc.get_stdin_msg(timeout=TIMEOUT)
    assert request["content"]["prompt"] == "wait: "
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=TIMEOUT)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    kc.input("too late")  # a reply after the interrupt must not confuse the next input()
    reply, _ = run(kc, "input()", stdin=["fresh"])
    assert reply["status"] == "ok"


################ Frontends sharing one kernel


def test_two_clients_see_each_others_outputs_with_the_right_parent(kernel):
    km, kc = kernel
    other = BlockingKernelClient(connection_file=km.connection_file)  # its own session id
    other.load_connection_file()
    other.start_channels()
    try:
        other.wait_for_ready(timeout=TIMEOUT)
        mine = kc.execute("shared = 'from one'\nprint(shared)")
        kc.get_shell_msg(timeout=TIMEOUT)
        seen = {}
        while "stream" not in seen:
            msg = other.get_iopub_msg(timeout=TIMEOUT)
            if msg["parent_header"].get("msg_id") == mine:
                seen[msg["msg_type"]] = msg
        assert seen["stream"]["content"]["text"] == "from one\n"
        assert seen["stream"]["parent_header"]["session"] == kc.session.session
        theirs = other.execute("print(shared + ' read by two')")
        other.get_shell_msg(timeout=TIMEOUT)
        while True:
            msg = kc.get_iopub_msg(timeout=TIMEOUT)
            if msg["msg_type"] == "stream" and msg["parent_header"].get("msg_id") == theirs:
                break
        assert msg["content"]["text"] == "from one read by two\n"
        assert msg["parent_header"]["session"] == other.session.session
    finally:
        other.stop_channels()


def test_each_new_subscriber_gets_its_own_welcome(kernel):
    km, _ = kernel
    conn = km.get_connection_info()
    raws = [Raw({**conn, "key": conn["key"].decode()}) for _ in range(3)]
    try:
        for raw in raws:
            msg = raw.recv(raw.iopub, timeout=5)
            assert msg["msg_type"] == "iopub_welcome"
            assert msg["content"] == {"subscription": ""}
    finally:
        for raw in raws:
            raw.close()


################ Control: interrupt, heartbeat, shutdown


@pytest.mark.parametrize("how", ["message", "signal"])
def test_interrupt_a_sleeping_cell(fresh_kernel, how):
    km, kc = fresh_kernel
    msg_id = kc.execute("import time; time.sleep(30)")
    while kc.get_iopub_msg(timeout=TIMEOUT)["msg_type"] != "execute_input":
        pass
    time.sleep(0.2)
    start = time.monotonic()
    if how == "message":
        km.interrupt_kernel()  # the kernelspec says interrupt_mode: message
    else:
        os.kill(km.provisioner.process.pid, signal.SIGINT)
    reply = kc.get_shell_msg(timeout=TIMEOUT)
    assert time.monotonic() - start < 2
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert "minikernel.py" not in "\n".join(reply["content"]["traceback"])
    assert run(kc, "'still here'")[0]["status"] == "ok"


def test_sigint_and_interrupt_request_while_idle_are_harmless(fresh_kernel):
    km, kc = fresh_kernel
    for _ in range(20):
        os.kill(km.provisioner.process.pid, signal.SIGINT)
    for _ in range(3):
        kc.control_channel.send(kc.session.msg("interrupt_request"))
        assert kc.control_channel.get_msg(timeout=TIMEOUT)["content"] == {"status": "ok"}
    time.sleep(0.3)
    assert km.is_alive()
    assert run(kc, "1")[0]["status"] == "ok"


def gil_bound_cell(seconds: float) -> str:
    "Code that holds the GIL in one C call for about this long."
    n = 10**7
    start = time.perf_counter()
    sum(range(n))
    return f"sum(range({int(n * seconds / (time.perf_counter() - start))}))"


def test_heartbeat_answers_while_user_code_holds_the_gil(fresh_kernel):
    km, kc = fresh_kernel
    hb_addr = f"tcp://127.0.0.1:{km.get_connection_info()['hb_port']}"
    ctx = zmq.Context()
    kc.execute(gil_bound_cell(3))
    while kc.get_iopub_msg(timeout=TIMEOUT)["msg_type"] != "execute_input":
        pass
    start, pongs = time.monotonic(), 0
    while time.monotonic() - start < 2:
        req = ctx.socket(zmq.REQ)
        req.linger = 0
        req.connect(hb_addr)
        req.send(b"ping")
        assert req.poll(1000), "no heartbeat within 1 s while the cell runs"
        assert req.recv() == b"ping"
        pongs += 1
        req.close()
        time.sleep(0.2)
    ctx.destroy()
    assert pongs >= 5
    assert kc.get_shell_msg(timeout=TIMEOUT)["content"]["status"] == "ok"


def test_control_answers_while_shell_is_busy(fresh_kernel):
    _, kc = fresh_kernel
    kc.execute("import time; time.sleep(3)")
    time.sleep(0.3)
    start = time.monotonic()
    kc.control_channel.send(kc.session.msg("kernel_info_request"))
    reply = kc.control_channel.get_msg(timeout=TIMEOUT)
    assert reply["msg_type"] == "kernel_info_reply"
    assert time.monotonic() - start < 1


def test_shutdown_and_restart(fresh_kernel):
    km, kc = fresh_kernel
    run(kc, "before_restart = 1")
    pid = km.provisioner.process.pid
    km.restart_kernel(now=False)
    kc.wait_for_ready(timeout=TIMEOUT)
    assert km.provisioner.process.pid != pid
    reply, outputs = run(kc, "'before_restart' in dir()")
    assert [c["data"]["text/plain"] for t, c in outputs if t == "execute_result"] == ["False"]
    # shutdown_reply echoes the restart flag, then the process exits promptly.
    kc.control_channel.send(kc.session.msg("shutdown_request", {"restart": True}))
    reply = kc.control_channel.get_msg(timeout=TIMEOUT)
    assert reply["content"] == {"status": "ok", "restart": True}
    process = km.provisioner.process
    start = time.monotonic()
    process.wait(timeout=5)
    assert time.monotonic() - start < 1


def test_shutdown_during_a_running_cell_exits_within_2s(fresh_kernel):
    km, kc = fresh_kernel
    kc.execute("import time\nwhile True:\n    try:\n        time.sleep(10)\n"
               "    except BaseException:\n        pass")
    time.sleep(0.3)
    kc.control_channel.send(kc.session.msg("shutdown_request", {"restart": False}))
    assert kc.control_channel.get_msg(timeout=TIMEOUT)["content"]["status"] == "ok"
    start = time.monotonic()
    km.provisioner.process.wait(timeout=5)
    assert time.monotonic() - start < 2



################ The seed's magics


def test_connect_info_shows_this_kernels_ports_and_key(kernel):
    km, kc = kernel
    reply, outputs = run(kc, "%connect_info")
    assert reply["status"] == "ok"
    out = text(outputs)
    shown = json.loads(out[: out.index("\n}\n") + 2])
    info = km.get_connection_info()
    for name in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port", "ip"):
        assert shown[name] == info[name]
    assert shown["key"] == info["key"].decode()
    assert f"python miniconsole.py --existing {km.connection_file}" in out
    assert f"jupyter console --existing {km.connection_file}" in out


def test_debug_post_mortem_through_stdin(kernel):
    _, kc = kernel
    reply, _ = run(kc, "def f():\n    x = 42\n    return x / 0\nf()")
    assert reply["ename"] == "ZeroDivisionError"
    prompts = []

    def answer(msg):
        prompts.append(msg["content"]["prompt"])
        kc.input(["p x", "q"][len(prompts) - 1])

    outputs = []
    reply = kc.execute_interactive("%debug", timeout=TIMEOUT, stdin_hook=answer,
                                   output_hook=outputs.append)["content"]
    assert reply["status"] == "ok"
    assert prompts == ["(Pdb) ", "(Pdb) "]
    out = "".join(m["content"].get("text", "") for m in outputs)
    assert "return x / 0" in out and "42\n" in out


def test_breakpoint_talks_through_stdin(kernel):
    _, kc = kernel
    reply, outputs = run(kc, "def g():\n    y = 'seen'\n    breakpoint()\n    return y\ng()",
                         stdin=["p y", "c"])
    assert reply["status"] == "ok"
    assert "'seen'" in text(outputs)
    assert [c["data"]["text/plain"] for t, c in outputs if t == "execute_result"] == ["'seen'"]


def test_debug_without_an_exception_says_so(fresh_kernel):
    _, kc = fresh_kernel
    reply, _ = run(kc, "%debug")
    assert reply["ename"] == "UsageError" and "no exception" in reply["evalue"]


def test_help_comes_back_as_a_page_payload(kernel):
    _, kc = kernel
    run(kc, "def area(w: float, h: float = 1.0) -> float:\n    'Width times height.'\n"
            "    return w * h")
    reply, outputs = run(kc, "area?")
    assert [t for t, c in outputs if t == "stream"] == []
    [page] = reply["payload"]
    assert page["source"] == "page" and page["start"] == 0
    help_text = page["data"]["text/plain"]
    assert "area(w: float, h: float = 1.0) -> float" in help_text
    assert "Width times height." in help_text and "return w * h" not in help_text
    reply, _ = run(kc, "area??")
    assert "return w * h" in reply["payload"][0]["data"]["text/plain"]
    reply, _ = run(kc, "no_such_thing?")
    assert "not found" in reply["payload"][0]["data"]["text/plain"]


def test_console_magic_prints_the_command_when_there_is_no_window(kernel):
    km, kc = kernel
    reply, outputs = run(kc, "import os; os.environ.pop('TMUX', None); "
                             "os.environ.pop('DISPLAY', None)\n%console")
    assert reply["status"] == "ok"
    assert f"miniconsole.py --existing {km.connection_file}" in text(outputs)


def test_console_magic_opens_a_tmux_window(kernel, tmp_path):
    if not shutil.which("tmux"):
        pytest.skip("tmux is not installed")
    km, kc = kernel
    sock = str(tmp_path / "tmux.sock")
    subprocess.run(["tmux", "-S", sock, "new-session", "-d", "-s", "t", "sleep 60"], check=True)
    try:
        reply, outputs = run(kc, f"import os; os.environ['TMUX'] = '{sock},1,0'\n%console")
        assert reply["status"] == "ok"
        assert "tmux window" in text(outputs)
        windows = subprocess.run(
            ["tmux", "-S", sock, "list-windows", "-F", "#{pane_start_command}"],
            capture_output=True, text=True).stdout
        assert f"--existing {km.connection_file}" in windows
    finally:
        subprocess.run(["tmux", "-S", sock, "kill-server"], capture_output=True)
        run(kc, "import os; os.environ.pop('TMUX', None)")


def test_unknown_magic_lists_the_magics(kernel):
    _, kc = kernel
    reply, outputs = run(kc, "%nosuchmagic 1 2")
    assert reply["ename"] == "UsageError"
    assert reply["traceback"] == [f"UsageError: {reply['evalue']}"]
    for name in ("%connect_info", "%console", "%debug"):
        assert name in reply["evalue"]


################ Shell requests besides execute


def test_complete_names_attributes_and_keywords(kernel):
    _, kc = kernel
    run(kc, "import os\nmy_variable = 1")
    content = kc.complete("x = my_v", 8, reply=True, timeout=TIMEOUT)["content"]
    assert content["matches"] == ["my_variable"]
    assert (content["cursor_start"], content["cursor_end"]) == (4, 8)
    content = kc.complete("os.path.jo", reply=True, timeout=TIMEOUT)["content"]
    assert content["matches"] == ["join"] and content["cursor_start"] == 8
    assert "while" in kc.complete("whi", reply=True, timeout=TIMEOUT)["content"]["matches"]
    run(kc, "é = 1")
    content = kc.complete("x = é.re", reply=True, timeout=TIMEOUT)["content"]
    assert content["matches"] == ["real"] and content["cursor_start"] == 6  # code points


def test_inspect_signature_docstring_and_source(kernel):
    _, kc = kernel
    run(kc, "def scale(v, k=2):\n    'Multiply v by k.'\n    return v * k")
    content = kc.inspect("scale(", 6, reply=True, timeout=TIMEOUT)["content"]
    assert content["found"]
    assert "scale(v, k=2)" in content["data"]["text/plain"]
    assert "Multiply v by k." in content["data"]["text/plain"]
    content = kc.inspect("scale", 2, detail_level=1, reply=True, timeout=TIMEOUT)["content"]
    assert "return v * k" in content["data"]["text/plain"]
    assert not kc.inspect("nope", 4, reply=True, timeout=TIMEOUT)["content"]["found"]


@pytest.mark.parametrize("code, expected", [
    ("x = 1", {"status": "complete"}),
    ("for i in range(3):", {"status": "incomplete", "indent": "    "}),
    ("for i in range(3):\n    print(i)", {"status": "incomplete", "indent": "    "}),
    ("for i in range(3):\n    print(i)\n", {"status": "complete"}),
    ("d = {'a': 1,", {"status": "incomplete", "indent": ""}),
    ("x = )", {"status": "invalid"}),
    ("%connect_info", {"status": "complete"}),
    ("len?", {"status": "complete"}),
])
def test_is_complete(kernel, code, expected):
    _, kc = kernel
    kc.is_complete(code)
    assert kc.get_shell_msg(timeout=TIMEOUT)["content"] == expected


def test_history_tail_range_and_search(fresh_kernel):
    _, kc = fresh_kernel
    for code in ("a = 1", "a + 1", "b = 2", "a + 1"):
        run(kc, code)
    run(kc, "'not stored'", store_history=False)

    def history(**kw):
        kc.history(raw=True, **kw)
        return kc.get_shell_msg(timeout=TIMEOUT)["content"]["history"]

    assert history(hist_access_type="tail", n=2, output=False) == [[1, 3, "b = 2"], [1, 4, "a + 1"]]
    assert history(hist_access_type="tail", n=1, output=True) == [[1, 4, ["a + 1", "2"]]]
    assert history(hist_access_type="range", session=0, start=2, stop=4, output=False) == [
        [1, 2, "a + 1"], [1, 3, "b = 2"]]
    assert [h[1] for h in history(hist_access_type="search", pattern="a*", output=False)] == [
        1, 2, 4]
    assert history(hist_access_type="search", pattern="a +*", unique=True, output=False) == [
        [1, 4, "a + 1"]]


def test_comms_are_refused_politely(kernel):
    _, kc = kernel
    kc.comm_info()
    assert kc.get_shell_msg(timeout=TIMEOUT)["content"] == {"status": "ok", "comms": {}}
    msg = kc.session.msg("comm_open", {"comm_id": "c1", "target_name": "nope", "data": {}})
    kc.shell_channel.send(msg)
    while True:
        reply = kc.get_iopub_msg(timeout=TIMEOUT)
        if reply["msg_type"] == "comm_close":
            break
    assert reply["content"]["comm_id"] == "c1"
    assert reply["parent_header"]["msg_id"] == msg["header"]["msg_id"]


################ Bad input: dropped, never executed, the kernel keeps serving


@pytest.fixture()
def raw_kernel(tmp_path):
    "A kernel with a known key, its stderr readable: (process, connection, marker file path)."
    proc, conn = start_raw(tmp_path)
    raw = Raw(conn)
    try:
        wait_ready(raw, proc)
        yield proc, conn, raw, str(tmp_path / "executed")
    finally:
        raw.close()
        if proc.poll() is None:
            stop(proc)


def marker_code(path: str) -> str:
    return f"open({path!r}, 'a').write('x')"


def test_unsigned_forged_and_replayed_messages_never_run(raw_kernel):
    proc, conn, raw, marker = raw_kernel
    attacks = {
        "unsigned": Raw(conn, key=""),
        "wrong key": Raw(conn, key="another-connection-files-key"),
    }
    for client in attacks.values():
        client.shell.send_multipart(client.frames("execute_request", {"code": marker_code(marker)}))
        client.close(linger=5000)  # returns once the attack is on the wire
    # A genuine request, captured and sent again: the replay must be refused.
    genuine = raw.frames("execute_request", {"code": marker_code(marker), "silent": False})
    raw.shell.send_multipart(genuine)
    assert raw.recv(raw.shell)["content"]["status"] == "ok"
    raw.shell.send_multipart(genuine)
    reply = raw.request("execute_request", {"code": "1"})
    assert reply["content"]["status"] == "ok"
    with open(marker) as f:
        assert f.read() == "x"  # once: only the genuine request ran
    log = stop(proc)
    assert log.count("unsigned message") == 1
    assert log.count("bad signature") == 1
    assert log.count("replayed message") == 1
    assert conn["key"] not in log


@pytest.mark.parametrize("frames", [
    [b"garbage"],
    [b"<IDS|MSG>"],
    [b"<IDS|MSG>", b"sig", b"{}", b"{}"],
    [b"id", b"no delimiter", b"{}", b"{}", b"{}", b"{}"],
])
def test_malformed_frames_are_dropped(raw_kernel, frames):
    proc, _, raw, _ = raw_kernel
    for sock in (raw.shell, raw.control):
        sock.send_multipart(frames)
    assert raw.request("kernel_info_request", {})["content"]["status"] == "ok"
    assert raw.request("kernel_info_request", {}, sock=raw.control)["content"]["status"] == "ok"
    assert proc.poll() is None


def signed(raw: Raw, parts: list) -> list:
    "Frames with a valid signature over whatever four parts we like."
    return [b"<IDS|MSG>", raw.session.sign(parts), *parts]


@pytest.mark.parametrize("parts", [
    [b"not json", b"{}", b"{}", b"{}"],
    [b"\xff\xfe", b"{}", b"{}", b"{}"],
    [b"[]", b"{}", b"{}", b"{}"],
    [b'{"msg_id": "1"}', b"{}", b"{}", b"{}"],
    [b'{"msg_id": "1", "msg_type": 7}', b"{}", b"{}", b"{}"],
])
def test_signed_but_malformed_messages_are_dropped(raw_kernel, parts):
    proc, _, raw, _ = raw_kernel
    raw.shell.send_multipart(signed(raw, parts))
    assert raw.request("kernel_info_request", {})["content"]["status"] == "ok"


@pytest.mark.parametrize("msg_type, content", [
    ("execute_request", {"code": 12}),
    ("execute_request", {}),
    ("complete_request", {"code": "abc", "cursor_pos": 99}),
    ("inspect_request", {"code": None}),
    ("history_request", {"hist_access_type": "sideways"}),
    ("is_complete_request", {"code": ["x"]}),
])
def test_signed_nonsense_gets_an_error_reply(raw_kernel, msg_type, content):
    proc, _, raw, _ = raw_kernel
    reply = raw.request(msg_type, content)
    assert reply["msg_type"] == msg_type.replace("_request", "_reply")
    assert reply["content"]["status"] == "error"
    assert raw.request("execute_request", {"code": "1"})["content"]["status"] == "ok"


def test_unknown_msg_type_is_logged_not_fatal(raw_kernel):
    proc, _, raw, _ = raw_kernel
    raw.shell.send_multipart(raw.frames("frobnicate_request", {}))
    assert raw.request("kernel_info_request", {})["content"]["status"] == "ok"
    assert "unknown msg_type 'frobnicate_request'" in stop(proc)



################ Starting the kernel


def test_no_arguments_writes_a_private_connection_file_and_removes_it(tmp_path):
    runtime = tmp_path / "new" / "runtime"  # missing: the kernel creates it, private
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)}
    proc = subprocess.Popen([sys.executable, KERNEL], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        banner = "".join(proc.stdout.readline() for _ in range(6))
        [path] = runtime.glob("kernel-*.json")
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert oct(runtime.stat().st_mode & 0o777) == "0o700"
        assert str(path) in banner
        assert "python miniconsole.py --existing" in banner
        assert f"jupyter console --existing {path}" in banner
        conn = connection(str(path))
        assert conn["ip"] == "127.0.0.1" and len(conn["key"]) >= 32
        raw = Raw(conn)
        wait_ready(raw, proc)
        assert raw.request("shutdown_request", {"restart": False}, sock=raw.control)["content"][
            "status"] == "ok"
        raw.close()
        assert proc.wait(timeout=5) == 0
        assert not path.exists()
        assert conn["key"] not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            stop(proc)


def test_f_with_a_missing_file_writes_it_there(tmp_path):
    path = tmp_path / "mine.json"
    proc = subprocess.Popen([sys.executable, KERNEL, "-f", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert str(path) in "".join(proc.stdout.readline() for _ in range(6))
        raw = Raw(connection(str(path)))
        assert wait_ready(raw, proc)["content"]["implementation"] == "minikernel"
        raw.close()
    finally:
        stop(proc)
    assert proc.returncode == 0  # SIGTERM is a clean exit
    assert not path.exists()


def test_f_with_an_existing_file_binds_exactly_that(tmp_path):
    proc, conn = start_raw(tmp_path)
    try:
        raw = Raw(conn)
        wait_ready(raw, proc)
        reply = raw.request("execute_request", {"code": "%connect_info"})
        assert reply["content"]["status"] == "ok"
        raw.close()
    finally:
        stop(proc)
    assert os.path.exists(conn["path"])  # not ours to remove: whoever wrote it cleans up


def test_empty_key_means_unsigned_with_a_warning(tmp_path):
    proc, conn = start_raw(tmp_path, key="")
    try:
        raw = Raw(conn)
        assert raw.session.sign([b"x"]) == b""
        wait_ready(raw, proc)
        assert raw.request("execute_request", {"code": "1"})["content"]["status"] == "ok"
        raw.close()
    finally:
        err = stop(proc)
    assert "empty key" in err


def test_non_loopback_ip_warns(tmp_path):
    path = tmp_path / "k.json"
    proc = subprocess.Popen([sys.executable, KERNEL, "-f", str(path), "--ip", "0.0.0.0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        warning = proc.stderr.readline()
        assert "0.0.0.0" in warning and "not loopback" in warning
    finally:
        stop(proc)


def test_ipc_transport(tmp_path):
    km = KernelManager(kernel_name="minikernel", transport="ipc", ip=str(tmp_path / "k"))
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=TIMEOUT)
        assert km.get_connection_info()["transport"] == "ipc"
        assert run(kc, "6 * 7")[1][-2][1]["data"]["text/plain"] == "42"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.mark.parametrize("stderr", ["DEVNULL", "PIPE"])
def test_kernel_exits_when_its_launcher_dies(tmp_path, stderr):
    "Even when its stderr dies with the launcher (a pipe, or a console's terminal)."
    path = tmp_path / "k.json"
    launcher = subprocess.Popen(
        [sys.executable, "-c",
         "import os, subprocess, sys, time\n"
         "env = {**os.environ, 'JPY_PARENT_PID': str(os.getpid())}\n"
         f"p = subprocess.Popen([sys.executable, {KERNEL!r}, '-f', {str(path)!r}], env=env,\n"
         f"                      stdout=subprocess.DEVNULL, stderr=subprocess.{stderr})\n"
         "print(p.pid, flush=True)\n"
         "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    pid = int(launcher.stdout.readline())
    deadline = time.monotonic() + TIMEOUT
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the kernel outlived its launcher by 5 s")


def test_help_explains_every_mode():
    out = subprocess.run([sys.executable, KERNEL, "--help"], capture_output=True, text=True,
                         check=True).stdout
    for mode in ("python minikernel.py ", "-f FILE", "--ip ADDR", "install", "--user",
                 "--sys-prefix", "--prefix DIR", "--name NAME", "miniconsole.py --existing"):
        assert mode in out


def test_install_writes_a_kernelspec_jupyter_can_launch(tmp_path):
    subprocess.run([sys.executable, KERNEL, "install", "--prefix", str(tmp_path), "--name",
                    "mk-test"], check=True, capture_output=True)
    spec_file = tmp_path / "share" / "jupyter" / "kernels" / "mk-test" / "kernel.json"
    spec = json.loads(spec_file.read_text())
    assert spec["argv"] == [sys.executable, KERNEL, "-f", "{connection_file}"]
    assert spec["language"] == "python" and spec["interrupt_mode"] == "message"
    env_path = os.environ["JUPYTER_PATH"]
    os.environ["JUPYTER_PATH"] = str(tmp_path / "share" / "jupyter")
    try:
        km, kc = start_new_kernel(kernel_name="mk-test", startup_timeout=TIMEOUT)
        assert run(kc, "1")[0]["status"] == "ok"
        kc.stop_channels()
        km.shutdown_kernel()
    finally:
        os.environ["JUPYTER_PATH"] = env_path


def test_pep723_metadata_declares_pyzmq():
    with open(KERNEL) as f:
        head = f.read(400)
    block = re.search(r"# /// script\n(.*?)# ///", head, re.S).group(1)
    assert 'dependencies = ["pyzmq"]' in block



################ jupyter console, the reference terminal frontend, driving minikernel


def jupyter_console(*args):
    "jupyter console under a pty, with the simple prompt pexpect can read."
    console = pexpect.spawn(sys.executable, ["-m", "jupyter_console", "--simple-prompt", *args],
                            encoding="utf-8", timeout=TIMEOUT, env={**os.environ, "TERM": "dumb"})
    console.expect(r"In \[1\]: ")
    return console


def test_jupyter_console_launches_minikernel_by_kernelspec():
    console = jupyter_console("--kernel", "minikernel")
    try:
        assert "minikernel" in console.before  # the kernel's banner
        console.sendline("name = input('name? ')")
        console.expect(r"name\? ")
        console.sendline("Ada")
        console.expect(r"In \[2\]: ")
        console.sendline("print(name * 2)")
        console.expect("AdaAda")
        console.expect(r"In \[3\]: ")
        console.sendline("6 * 7")
        console.expect(r"Out\[3\]: 42")
        console.sendline("len?")
        console.expect("Return the number of items")
        console.sendline("1/0")
        console.expect("ZeroDivisionError")
        console.sendline("exit")
        console.expect(pexpect.EOF)
    finally:
        console.close(force=True)


def test_jupyter_console_attaches_with_existing(tmp_path):
    proc, conn = start_raw(tmp_path)
    try:
        raw = Raw(conn)
        wait_ready(raw, proc)
        raw.request("execute_request", {"code": "shared = 'set by another frontend'"})
        console = jupyter_console("--existing", conn["path"])
        console.sendline("print(shared)")
        console.expect("set by another frontend")
        console.sendline("%connect_info")
        console.expect(str(conn["shell_port"]))
        console.sendline("exit(keep_kernel=True)")  # as with ipykernel: leave, kernel stays
        console.expect("keeping kernel alive")
        console.expect(pexpect.EOF)
        assert raw.request("execute_request", {"code": "1"})["content"]["status"] == "ok"
        console = jupyter_console("--existing", conn["path"])
        console.sendline("exit")  # as with ipykernel: a plain exit shuts the kernel down
        console.expect("Shutting down kernel")
        console.expect(pexpect.EOF)
        assert proc.wait(timeout=5) == 0
        raw.close()
    finally:
        if proc.poll() is None:
            stop(proc)



################ jupyter_server, the backend JupyterLab talks to kernels through


def test_jupyter_server_runs_minikernel_over_its_websocket(tmp_path):
    import asyncio
    import urllib.request

    from tornado.websocket import websocket_connect

    port, token = free_port(), uuid.uuid4().hex
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", f"--port={port}", "--no-browser",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
         "--allow-root"],  # CI runs as root
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"token {token}"}

    def api(method, path, body=None):
        request = urllib.request.Request(base + path, method=method, headers=auth,
                                         data=json.dumps(body).encode() if body else None)
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return json.loads(response.read() or b"null")

    async def execute(kernel_id, code):
        ws = await websocket_connect(urllib.request.Request(  # what JupyterLab opens
            f"ws://127.0.0.1:{port}/api/kernels/{kernel_id}/channels", headers=auth).full_url
            + f"?token={token}")
        msg_id = uuid.uuid4().hex
        ws.write_message(json.dumps({
            "channel": "shell", "buffers": [], "metadata": {}, "parent_header": {},
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": "lab",
                       "username": "test", "date": "", "version": "5.3"},
            "content": {"code": code, "silent": False, "store_history": True,
                        "user_expressions": {}, "allow_stdin": False}}))
        seen = {}
        while not (seen.get("reply") and seen.get("idle")):
            msg = json.loads(await asyncio.wait_for(ws.read_message(), TIMEOUT))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "execute_reply":
                seen["reply"] = msg["content"]
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                seen["idle"] = True
            elif msg["msg_type"] in ("stream", "execute_result"):
                seen[msg["msg_type"]] = msg["content"]
        ws.close()
        return seen

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                api("GET", "/api/status")
                break
            except OSError:
                assert time.monotonic() < deadline, "jupyter_server did not start"
                time.sleep(0.2)
        assert "minikernel" in api("GET", "/api/kernelspecs")["kernelspecs"]
        kernel_id = api("POST", "/api/kernels", {"name": "minikernel"})["id"]
        seen = asyncio.run(execute(kernel_id, "print('from the server'); 6 * 7"))
        assert seen["reply"]["status"] == "ok"
        assert seen["stream"]["text"] == "from the server\n"
        assert seen["execute_result"]["data"]["text/plain"] == "42"
        api("POST", f"/api/kernels/{kernel_id}/interrupt")
        api("POST", f"/api/kernels/{kernel_id}/restart")
        assert asyncio.run(execute(kernel_id, "6 * 7"))["execute_result"]["data"][
            "text/plain"] == "42"
        api("DELETE", f"/api/kernels/{kernel_id}")
        assert api("GET", "/api/kernels") == []
    finally:
        server.terminate()
        server.wait(timeout=TIMEOUT)


CONSOLE = os.path.join(HERE, "miniconsole.py")
KERNELS = ["ipykernel", "minikernel"]
PROMPT = r"In \[(\d+)\]: "
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


################ miniconsole: an isolated Jupyter environment, and kernels in it

# Each console test runs against ipykernel and against minikernel: the console must not
# depend on anything minikernel-specific.


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    "Environment for every process: runtime, data and IPython dirs in a temp dir, not in ~."
    root = tmp_path_factory.mktemp("jupyter")
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(root / "runtime"),
               JUPYTER_DATA_DIR=str(root / "data"), IPYTHONDIR=str(root / "ipython"),
               PYDEVD_DISABLE_FILE_VALIDATION="1", TERM="xterm")
    os.makedirs(env["JUPYTER_RUNTIME_DIR"])
    return env


class KernelProcess:
    "A kernel process started by the tests, with the connection file it wrote."

    def __init__(self, name: str, env: dict, path: str):
        if name == "minikernel" and not os.path.exists(KERNEL):
            pytest.skip("minikernel.py does not exist yet")
        argv = ([sys.executable, "-m", "ipykernel_launcher"] if name == "ipykernel"
                else [sys.executable, KERNEL])
        self.name, self.path, self.log = name, path, path + ".log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([*argv, "-f", path], env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True)
        try:
            self.client = console_client(path, self.proc)
        except Exception as e:
            self.stop()
            with open(self.log) as f:
                raise RuntimeError(f"{name} did not start: {e}; its log: {f.read()[-500:]}") from e

    def alive(self) -> bool:
        "The process runs and hb echoes."
        return self.proc.poll() is None and self.client.heartbeat(timeout=2.0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if hasattr(self, "client"):
            self.client.close()


def console_client(path: str, proc, timeout: float = 20.0) -> miniconsole.Client:
    "Wait for the connection file, then for the kernel to answer (miniconsole's own client)."
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                json.load(f)
            break
        except (OSError, ValueError):
            if proc.poll() is not None:
                raise RuntimeError(f"kernel exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"no connection file {path}") from None
            time.sleep(0.05)
    client = miniconsole.Client(path)
    miniconsole.handshake(client, timeout=deadline - time.monotonic())
    return client


@pytest.fixture(scope="module", params=KERNELS)
def any_kernel(request, env, tmp_path_factory):
    "A kernel shared by the tests that do not kill it."
    path = str(tmp_path_factory.mktemp(request.param) / "kernel-shared.json")
    k = KernelProcess(request.param, env, path)
    yield k
    k.stop()


@pytest.fixture(params=KERNELS)
def any_own_kernel(request, env, tmp_path):
    "A kernel for one test alone: that test may kill it."
    k = KernelProcess(request.param, env, str(tmp_path / "kernel-own.json"))
    yield k
    k.stop()


@pytest.fixture(params=KERNELS)
def own_console(request, tmp_path):
    "miniconsole.py with the kernel it starts beside it: minikernel.py, or ipykernel standing in."
    if request.param == "minikernel":
        if not os.path.exists(KERNEL):
            pytest.skip("minikernel.py does not exist yet")
        return CONSOLE
    shutil.copy(CONSOLE, tmp_path / "miniconsole.py")
    (tmp_path / "minikernel.py").write_text(
        "from ipykernel.kernelapp import launch_new_instance\nlaunch_new_instance()\n")
    return str(tmp_path / "miniconsole.py")


def spawn_console(env, *args, timeout=15) -> pexpect.spawn:
    "miniconsole on a pseudo-terminal, at its first prompt."
    child = pexpect.spawn(sys.executable, [CONSOLE, *args], env=env, timeout=timeout,
                          encoding="utf-8", dimensions=(50, 250))
    child.expect(PROMPT)
    return child


def type_line(child, line: str) -> str:
    "Type a line, wait for the next prompt, return what came between (no escape codes)."
    child.sendline(line)
    child.expect(PROMPT)
    return ANSI.sub("", child.before)


def leave(child, how: str = "exit") -> int:
    "Leave the console with exit, quit or Ctrl-D; its exit status."
    if how == "ctrl-d":
        child.sendeof()
    else:
        child.sendline(how)
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def piped(env, text: str, *args, timeout=30) -> subprocess.CompletedProcess:
    "miniconsole with stdin from a pipe."
    return subprocess.run([sys.executable, CONSOLE, *args], input=text, env=env, timeout=timeout,
                          capture_output=True, text=True)


################ miniconsole: interactive sessions


def test_start_and_leave_own_kernel(own_console, env):
    "Without --existing the console starts minikernel.py beside it, and shuts it down on exit."
    child = pexpect.spawn(sys.executable, [own_console], env=env, timeout=20, encoding="utf-8",
                          dimensions=(50, 250))
    child.expect(r"\[connected to (\S+);")
    path = child.match.group(1)
    assert path.startswith(env["JUPYTER_RUNTIME_DIR"]) and os.path.exists(path)
    assert "Python" in child.before  # the kernel's banner
    child.expect(PROMPT)
    kernel_proc = psutil.Process(child.pid).children()[0]
    assert "42" in type_line(child, "print(6 * 7)")
    assert leave(child) == 0
    kernel_proc.wait(timeout=10)  # gone, and its connection file with it
    assert not os.path.exists(path)


def test_keep_kernel(own_console, env):
    "--keep-kernel leaves the kernel it started running, and says how to reattach."
    child = pexpect.spawn(sys.executable, [own_console, "--keep-kernel"], env=env, timeout=20,
                          encoding="utf-8", dimensions=(50, 250))
    child.expect(PROMPT)
    type_line(child, "kept = 'still here'")
    child.sendline("exit")
    child.expect(r"reattach with: .* --existing (\S+)\]")
    path = child.match.group(1)
    child.expect(pexpect.EOF)
    result = piped(env, "print(kept)\n", "--existing", path)
    assert result.stdout == "still here\n"
    kept = [p for p in psutil.process_iter(["cmdline"]) if path in (p.info["cmdline"] or [])]
    client = miniconsole.Client(path)
    reply = client.request("control", "shutdown_request", {"restart": False}, timeout=10)
    client.close()
    assert reply["content"]["status"] == "ok" and len(kept) == 1
    kept[0].wait(timeout=10)
    if os.path.exists(path):  # minikernel removes its file; ipykernel leaves it
        os.remove(path)


def test_run_cell_and_prompt_numbers(any_kernel, env):
    child = spawn_console(env, "--existing", any_kernel.path)
    n = int(child.match.group(1))
    type_line(child, "x = 21")
    assert child.match.group(1) == str(n + 1)
    assert re.search(rf"Out\[{n + 1}\]: 42", type_line(child, "x * 2"))
    out = type_line(child, "print('hello'); 1 / 0")
    assert "hello" in out and "ZeroDivisionError" in out
    assert leave(child) == 0


def test_ctrl_c_at_prompt_clears_the_line(any_kernel, env):
    child = spawn_console(env, "--existing", any_kernel.path)
    child.send("this is not python")
    child.expect_exact("python")  # readline has it (a Ctrl-C racing it can be lost in readline)
    child.sendintr()
    child.expect(PROMPT)
    out = type_line(child, "print('clean', 1 + 1)")
    assert "clean 2" in out and "SyntaxError" not in out
    assert leave(child) == 0


def test_input(any_kernel, env):
    child = spawn_console(env, "--existing", any_kernel.path)
    child.sendline("name = input('who are you? ')")
    child.expect_exact("\r\nwho are you? ")  # the kernel's prompt, not our typing
    child.sendline("Ada")
    child.expect(PROMPT)
    assert "hello Ada" in type_line(child, "print('hello', name)")
    assert leave(child) == 0


def test_password_input(any_kernel, env):
    child = spawn_console(env, "--existing", any_kernel.path)
    child.sendline("import getpass; secret = getpass.getpass('pw: ')")
    child.expect_exact("\r\npw: ")  # the kernel's prompt, not our typing
    child.sendline("s3cret")
    child.expect(PROMPT)
    assert "s3cret" not in child.before  # not echoed
    out = type_line(child, "print(secret[::-1])")
    assert "terc3s" in out
    assert leave(child) == 0


def test_ctrl_c_at_input_interrupts_kernel(any_kernel, env):
    child = spawn_console(env, "--existing", any_kernel.path)
    child.sendline("input('waiting> ')")
    child.expect_exact("\r\nwaiting> ")  # the kernel's prompt, not our typing
    child.sendintr()
    child.expect("KeyboardInterrupt")
    child.expect(PROMPT)
    assert "ok 3" in type_line(child, "print('ok', 1 + 2)")
    assert leave(child) == 0


def test_multiline_for_loop(any_kernel, env):
    child = spawn_console(env, "--existing", any_kernel.path)
    child.sendline("for i in range(3):")
    child.expect_exact("...: ")
    child.sendline("print(i * 10)")  # the kernel's indent is already there
    child.expect_exact("...: ")
    out = type_line(child, "")
    assert re.search(r"0\r\n10\r\n20\r\n", out)
    assert leave(child) == 0


def test_debug(any_kernel, env):
    "%debug: a post-mortem debugger session, carried by input_request on stdin."
    child = spawn_console(env, "--existing", any_kernel.path)
    child.sendline("def f():")
    child.sendline("x = 42")
    child.sendline("return x / 0")
    type_line(child, "")
    assert "ZeroDivisionError" in type_line(child, "f()")
    child.sendline("%debug")
    child.expect(r"(ipdb> |\(Pdb\) )")
    child.sendline("p x")
    child.expect(r"42\r\n")
    child.expect(r"(ipdb> |\(Pdb\) )")
    child.sendline("q")
    child.expect(PROMPT)
    assert "after 1" in type_line(child, "print('after', 1)")
    assert leave(child) == 0


def test_rich_output_and_pager(any_kernel, env):
    "text/plain is shown; every other mimetype becomes a one-line placeholder; obj? pages."
    child = spawn_console(env, "--existing", any_kernel.path)
    type_line(child,
              "class H: _repr_html_ = lambda self: '<b>hi</b>'; __repr__ = lambda self: 'H()'")
    assert re.search(r"\r\nH\(\)\r\n<text/html, 9 bytes>\r\n", type_line(child, "display(H())"))
    assert re.search(r"Out\[\d+\]: H\(\)\r\n<text/html, 9 bytes>\r\n", type_line(child, "H()"))
    assert "Return the number of items in a container." in type_line(child, "len?")
    assert leave(child) == 0


def test_tab_completion(any_kernel, env):
    child = spawn_console(env, "--existing", any_kernel.path)
    type_line(child, "a_rather_unique_name = 5")
    child.send("a_rather_uni\t")
    child.expect_exact("a_rather_unique_name")
    assert "10" in type_line(child, " * 2")
    assert leave(child) == 0


def test_interrupt_kernel_started_elsewhere(any_kernel, env):
    "Ctrl-C while a cell runs: interrupt_request on control, so any kernel can be interrupted."
    child = spawn_console(env, "--existing", any_kernel.path)
    child.sendline("import time; time.sleep(30)")
    time.sleep(1)
    started = time.monotonic()
    child.sendintr()
    child.expect("KeyboardInterrupt", timeout=10)
    child.expect(PROMPT)
    assert time.monotonic() - started < 5
    assert "still 4" in type_line(child, "print('still', 2 + 2)")
    assert leave(child) == 0


def test_other_frontend_output_shown_at_prompt(any_kernel, env):
    "Another client's cell and its output appear above the prompt, marked, as they happen."
    child = spawn_console(env, "--existing", any_kernel.path)
    child.send("y = 12")  # half typed: it must survive the interruption
    other = BlockingKernelClient(connection_file=any_kernel.path)
    other.load_connection_file()
    other.start_channels()
    try:
        other.wait_for_ready(timeout=10)
        other.execute("print('from elsewhere')")
        child.expect(r"\[other frontend\] In \[(\d+)\]: print\('from elsewhere'\)", timeout=5)
        theirs = int(child.match.group(1))
        child.expect_exact("[other frontend] from elsewhere", timeout=5)
        child.expect_exact(f"In [{theirs + 1}]: y = 12")  # renumbered, half-typed line kept
    finally:
        other.stop_channels()
    child.sendline("3")
    child.expect(PROMPT)
    assert child.match.group(1) == str(theirs + 2)  # their cell, then ours
    assert "Out" in type_line(child, "y") and "123" in child.before
    assert leave(child) == 0


def test_no_others(any_kernel, env):
    child = spawn_console(env, "--existing", any_kernel.path, "--no-others")
    other = miniconsole.Client(any_kernel.path)
    try:
        miniconsole.handshake(other)
        other.request("shell", "execute_request", {"code": "print('not for you')",
                      "silent": False, "store_history": True, "user_expressions": {},
                      "allow_stdin": False, "stop_on_error": True})
    finally:
        other.close()
    time.sleep(0.6)  # two ticks and more: it would be on the screen by now
    out = type_line(child, "print('mine')")
    assert "mine" in out and "not for you" not in out
    assert leave(child) == 0


@pytest.mark.parametrize("how", ["exit", "quit", "ctrl-d"])
def test_leaving_keeps_shared_kernel(any_kernel, env, how):
    child = spawn_console(env, "--existing", any_kernel.path)
    type_line(child, f"left_by = '{how}'")
    assert leave(child, how) == 0
    assert any_kernel.alive()
    assert piped(env, "print(left_by)\n", "--existing", any_kernel.path).stdout == f"{how}\n"


def test_kernel_killed(any_own_kernel, env):
    "SIGKILL: the console says so in one line within 3 s, and exits non-zero."
    child = spawn_console(env, "--existing", any_own_kernel.path)
    killed = time.monotonic()
    os.kill(any_own_kernel.proc.pid, signal.SIGKILL)
    child.expect(r"miniconsole: the kernel died[^\r\n]*\r\n", timeout=10)
    assert time.monotonic() - killed < 3.0
    assert child.before.strip() == ""  # that one line, and nothing else
    child.expect(pexpect.EOF)
    assert child.before == ""
    child.close()
    assert child.exitstatus == miniconsole.KERNEL_DIED


def test_kernel_dies_during_cell(any_own_kernel, env):
    "A cell that kills its kernel: no reply will come, and the console does not wait for one."
    child = spawn_console(env, "--existing", any_own_kernel.path)
    child.sendline("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    child.expect(r"miniconsole: the kernel died[^\r\n]*\r\n", timeout=5)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == miniconsole.KERNEL_DIED


################ miniconsole: piped mode


def test_piped_outputs_only(any_kernel, env):
    result = piped(env, "x = 1\nprint(x + 1)\nfor i in range(2):\n    print(i)\n\n40 + 2\n",
                   "--existing", any_kernel.path)
    assert (result.returncode, result.stdout) == (0, "2\n0\n1\n42\n")


def test_piped_error_exit_code(any_kernel, env):
    result = piped(env, "print('before')\n1 / 0\nprint('after')\n", "--existing", any_kernel.path)
    assert result.returncode == 1
    assert result.stdout == "before\nafter\n"
    assert "ZeroDivisionError" in result.stderr and "\x1b" not in result.stderr


def test_piped_input_reads_next_line(any_kernel, env):
    result = piped(env, "a = input()\nfirst\nb = input('no prompt shown: ')\nsecond\nprint(a, b)\n",
                   "--existing", any_kernel.path)
    assert (result.returncode, result.stdout) == (0, "first second\n")


def test_show_messages(any_kernel, env):
    result = piped(env, "print('shown')\n", "--existing", any_kernel.path, "--show-messages")
    assert result.stdout == "shown\n"
    for line in ["shell -> kernel_info_request", "shell <- kernel_info_reply",
                 "shell -> execute_request", 'iopub <- stream               {"name": "stdout"',
                 "shell <- execute_reply"]:
        assert line in result.stderr


def test_existing_without_match(env, tmp_path):
    "Nothing to attach to: one line that says what was looked for and where, and exit 1."
    result = piped(env, "", "--existing", "no-such-kernel")
    assert (result.returncode, result.stdout, result.stderr.count("\n")) == (1, "", 1)
    assert "*no-such-kernel*" in result.stderr and env["JUPYTER_RUNTIME_DIR"] in result.stderr
    missing = str(tmp_path / "kernel-gone.json")
    result = piped(env, "", "--existing", missing)
    assert (result.returncode, result.stderr) == (1, f"miniconsole: no connection file {missing}\n")
    (tmp_path / "kernel-bad.json").write_text("{not json")
    result = piped(env, "", "--existing", str(tmp_path / "kernel-bad.json"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("miniconsole: cannot use connection file")


def test_existing_finds_newest_by_name(any_kernel, env):
    "--existing NAME matches *NAME* in the runtime dir; no argument takes the newest kernel*.json."
    runtime = env["JUPYTER_RUNTIME_DIR"]
    old = os.path.join(runtime, "kernel-old.json")
    with open(old, "w") as f:
        json.dump({"not": "used"}, f)
    os.utime(old, (1, 1))
    new = os.path.join(runtime, f"kernel-{any_kernel.name}-find.json")
    shutil.copy(any_kernel.path, new)
    try:
        for arg in [f"{any_kernel.name}-fi", "kernel-*-find.json", ""]:
            result = piped(env, "print('found')\n", "--existing", *[arg] if arg else [])
            assert (result.returncode, result.stdout) == (0, "found\n"), arg
    finally:
        os.remove(old)
        os.remove(new)


################ miniconsole: the client alone, signing, and garbage on a socket


def test_client_drops_garbage(tmp_path, capfd):
    "A fake kernel's shell ROUTER sends garbage, then a good reply: one line, and go on."
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    ports = {f"{c}_port": zmq.Socket.bind_to_random_port(s, "tcp://127.0.0.1") for c, s in
             [("shell", router), ("iopub", ctx.socket(zmq.PUB)), ("stdin", ctx.socket(zmq.ROUTER)),
              ("control", ctx.socket(zmq.ROUTER)), ("hb", ctx.socket(zmq.REP))]}
    path = tmp_path / "kernel-fake.json"
    path.write_text(json.dumps({**ports, "ip": "127.0.0.1", "transport": "tcp", "key": "secret",
                                "signature_scheme": "hmac-sha256"}))
    client = miniconsole.Client(str(path))
    try:
        client.send("shell", "kernel_info_request", {})
        ident, *frames = router.recv_multipart()
        request = miniconsole.from_frames(miniconsole.new_session("secret"), frames)
        ours = miniconsole.new_session("secret")
        reply = miniconsole.new_msg(ours, "kernel_info_reply", {"status": "ok"}, request["header"])
        good = miniconsole.to_frames(ours, reply, [ident])
        router.send_multipart([ident, b"not a message"])
        router.send_multipart([*good[:2], b"0" * 64, *good[3:]])  # bad signature
        router.send_multipart(good)
        router.send_multipart(good)  # replayed
        got = client.recv("shell", 5)
        assert got["header"]["msg_id"] == reply["header"]["msg_id"]
        assert client.recv("shell", 0.5) is None
        err = capfd.readouterr().err.splitlines()
        assert err == ["miniconsole: dropped a bad message on shell: no <IDS|MSG> delimiter",
                       "miniconsole: dropped a bad message on shell: bad signature",
                       "miniconsole: dropped a bad message on shell: replayed message "
                       "(signature seen before)"]
    finally:
        client.close()
        ctx.destroy(linger=0)


def test_wire_format_identical_in_both_files():
    if not os.path.exists(KERNEL):
        pytest.skip("minikernel.py does not exist yet")

    def wire(path):
        with open(path) as f:
            text = f.read()
        start = text.index("################ Wire format")
        return text[start : text.index("################", start + 1)].strip()

    assert wire(CONSOLE) == wire(KERNEL)


################ notebook_demo.ipynb, run by nbclient on the minikernel kernelspec

# The notebook runs as a Jupyter server runs one: the connection file is in the runtime dir.
# Then its outputs are checked against the kernel that made them. To save it with fresh
# outputs after editing it: python test_mini.py

NOTEBOOK = os.path.join(HERE, "notebook_demo.ipynb")
README = os.path.join(HERE, "README.md")
KERNELSPEC = {"name": "minikernel", "display_name": "Python 3 (minikernel)", "language": "python"}


def run_notebook(nb, runtime_dir: str) -> dict:
    """Run nb in place on minikernel, as a Jupyter server would: the connection file is
    runtime_dir/kernel-<id>.json, and each cell keeps the kernel's own execution_count (nbclient
    would renumber them 1, 2, 3...). Returns the connection file's contents, and its path."""
    path = os.path.join(runtime_dir, f"kernel-{uuid.uuid4()}.json")
    client = NotebookClient(
        nb, kernel_name="minikernel", timeout=60, startup_timeout=30, record_timing=False,
        resources={"metadata": {"path": HERE}},
        config=Config({"KernelManager": {"connection_file": path}}))
    conn = {}

    def on_start(notebook):  # the kernel is up, its connection file written
        with open(client.km.connection_file) as f:
            conn.update(json.load(f), path=client.km.connection_file)

    def on_executed(cell, cell_index, execute_reply):
        cell.execution_count = execute_reply["content"]["execution_count"]

    client.on_notebook_start, client.on_cell_executed = on_start, on_executed
    client.execute()
    nb.metadata.kernelspec = dict(KERNELSPEC)
    return conn


def save_with_outputs():
    "Run notebook_demo.ipynb and save it with its outputs: python test_mini.py."
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for name in ("TMUX", "DISPLAY"):  # %console prints its command, opens no window
        os.environ.pop(name, None)
    run_notebook(nb, os.environ["JUPYTER_RUNTIME_DIR"])
    nbformat.validate(nb)
    nbformat.write(nb, NOTEBOOK)
    print(f"saved {NOTEBOOK} with outputs")


@pytest.fixture(scope="module")
def demo():
    "The notebook, run once: (executed notebook, connection info of the kernel that ran it)."
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TMUX", raising=False)  # else %console opens a tmux window
        mp.delenv("DISPLAY", raising=False)
        conn = run_notebook(nb, os.environ["JUPYTER_RUNTIME_DIR"])
    return nb, conn


def cell(nb, source_start: str):
    "The one code cell whose source starts with source_start."
    found = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(source_start)]
    assert len(found) == 1, f"{len(found)} code cells start with {source_start!r}"
    return found[0]


def stdout(c) -> str:
    "A notebook cell's stdout."
    return "".join(o.text for o in c.outputs if o.output_type == "stream" and o.name == "stdout")


def errors(c) -> list:
    "A notebook cell's error outputs."
    return [o for o in c.outputs if o.output_type == "error"]


def tagged(c) -> bool:
    "The cell is meant to raise."
    return "raises-exception" in c.metadata.get("tags", [])


################ The notebook


def test_saved_notebook_is_valid_names_minikernel_and_has_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec == KERNELSPEC
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 8
    assert all(isinstance(c.execution_count, int) for c in code), "saved without running"
    assert sum(bool(c.outputs) for c in code) >= 8


def test_saved_outputs_match_a_fresh_run(demo):
    "The saved outputs are those the cells make now: same kinds, in the same cells."
    def kinds(nb):
        return [[(o.output_type, o.get("name") or o.get("ename")) for o in c.outputs]
                for c in nb.cells if c.cell_type == "code"]
    fresh, _ = demo
    saved = nbformat.read(NOTEBOOK, as_version=4)
    assert [c.source for c in saved.cells] == [c.source for c in fresh.cells]
    assert kinds(saved) == kinds(fresh), "run `python test_mini.py` to save fresh outputs"


def test_no_cell_errors_unless_tagged_and_tagged_cells_do(demo):
    nb, _ = demo
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert sum(tagged(c) for c in code) == 2
    for c in code:
        assert bool(errors(c)) == tagged(c), c.source


def test_kernel_was_started_with_its_connection_file(demo):
    nb, conn = demo
    out = stdout(cell(nb, "import os\nimport sys"))
    assert f"minikernel.py -f {conn['path']}" in out


def test_notebook_connect_info_shows_its_kernels_ports_and_key(demo):
    nb, conn = demo
    out = stdout(cell(nb, "%connect_info"))
    shown = json.loads(out[: out.index("\n}\n") + 2])  # the JSON comes first
    for field in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port", "ip",
                  "key", "transport", "signature_scheme", "kernel_name"):
        assert shown[field] == conn[field], field
    assert f"Connection file: {conn['path']}" in out
    name = os.path.basename(conn["path"])[len("kernel-"):][:8]
    assert f"python miniconsole.py --existing {name} " in out  # in the runtime dir: short forms


def test_existing_finds_this_kernel_by_path_part_and_no_name(demo):
    nb, conn = demo
    out = stdout(cell(nb, "import miniconsole"))
    assert out.count("finds this kernel") == 3, out
    assert f"--existing {conn['path']}\n" in out


def test_console_magic_prints_the_command_for_this_kernel(demo):
    nb, conn = demo
    out = stdout(cell(nb, "%console"))
    assert "No tmux or terminal window" in out
    assert f"miniconsole.py --existing {conn['path']}" in out


def test_two_frontends_share_the_namespace_and_the_count(demo):
    nb, _ = demo
    start, read = cell(nb, "import subprocess"), cell(nb, "print(other.communicate")
    assert stdout(start) == "the other frontend sent its request\n"
    out = stdout(read)
    assert "it received stream: \"there, shared is 'set in the notebook'\\n\"" in out
    assert "here, from_there is 'SET IN THE NOTEBOOK'" in out
    assert read.execution_count == start.execution_count + 2  # the other frontend's took one


def test_input_without_stdin_fails_at_once_with_a_clear_error(demo):
    nb, _ = demo
    (error,) = errors(cell(nb, "name = input("))
    assert error.ename == "StdinNotImplementedError"
    assert "allow_stdin=False" in error.evalue


def test_traceback_shows_the_cells_lines(demo):
    nb, _ = demo
    define, call = cell(nb, "def half(n):"), cell(nb, "half(4)")
    (error,) = errors(call)
    assert error.ename == "ZeroDivisionError"
    text = "\n".join(error.traceback)
    assert f"Cell In[{define.execution_count}], line 3, in half" in text
    assert "minikernel.py" not in text


def test_help_travels_as_a_page_payload(demo):
    nb, _ = demo
    out = stdout(cell(nb, "half?"))
    assert out.startswith("page payload:\nType:      function\nSignature: half(n)\n")
    assert "Half of n." in out


def test_jupyter_execute_runs_it_clean():
    "The README's command: plain nbclient, its connection file in a temporary file."
    r = subprocess.run(["jupyter", "execute", NOTEBOOK], cwd=HERE, capture_output=True, text=True,
                       timeout=90)
    assert r.returncode == 0, r.stderr[-3000:]


################ The README


def readme() -> str:
    with open(README) as f:
        return f.read()


def test_readme_maps_every_section_in_reading_order():
    text = readme()
    walkthrough = text[text.index("## A map of the walkthrough"):]
    for script in ("minikernel.py", "miniconsole.py"):
        with open(os.path.join(HERE, script)) as f:
            banners = re.findall(r"^################ (.+)$", f.read(), re.M)
        part = walkthrough[walkthrough.index(f"### {script}"):]
        part = part[: part.find("\n## ", 1) % len(part)]  # up to the next section, if any
        part = part[: part.find("\n### ", 1) % len(part)]
        where = [part.find(f"**{b}") for b in banners]
        missing = [b for b, i in zip(banners, where) if i < 0]
        assert not missing, f"README map lacks these {script} sections: {missing}"
        assert where == sorted(where), f"README map has {script}'s sections out of order"


def protocol_table() -> dict:
    "README's protocol table: {msg_type: its minikernel column (yes, no or refused)}."
    text = readme()
    table = text[text.index("## Protocol coverage"):]
    table = table[table.index("\n|"):]
    table = table[: table.index("\n\n")]
    rows = {}
    for line in table.strip().splitlines()[2:]:  # skip the header and the |---| line
        first, _, mark, *_ = [cell.strip() for cell in line.strip("|").split("|")]
        for name in re.findall(r"`(\w+)`", first):
            rows[name] = mark
    return rows


def test_readme_protocol_table_matches_the_kernels_handlers():
    sys.path.insert(0, HERE)
    import minikernel  # importing it starts nothing

    rows = protocol_table()
    assert set(rows.values()) <= {"yes", "no", "refused"}, set(rows.values())
    handled = set(minikernel.SHELL_HANDLERS) | set(minikernel.CONTROL_HANDLERS)
    for msg_type in handled:
        assert rows.get(msg_type, "no") != "no", f"{msg_type} is handled; the README says no"
    for msg_type, mark in rows.items():
        if msg_type.endswith("_request") and mark == "no":
            assert msg_type not in handled, f"{msg_type} is handled; the README says no"
    spec = {  # every message type of the messaging spec 5.5 (and ipykernel's usage_request)
        "execute_request", "execute_reply", "inspect_request", "inspect_reply",
        "complete_request", "complete_reply", "history_request", "history_reply",
        "is_complete_request", "is_complete_reply", "comm_info_request", "comm_info_reply",
        "kernel_info_request", "kernel_info_reply", "connect_request", "connect_reply",
        "shutdown_request", "shutdown_reply", "interrupt_request", "interrupt_reply",
        "debug_request", "debug_reply", "create_subshell_request", "create_subshell_reply",
        "delete_subshell_request", "delete_subshell_reply", "list_subshell_request",
        "list_subshell_reply", "usage_request", "usage_reply", "input_request", "input_reply",
        "status", "execute_input", "stream", "display_data", "update_display_data",
        "execute_result", "error", "clear_output", "iopub_welcome", "debug_event", "comm_open",
        "comm_msg", "comm_close"}
    assert not spec - set(rows), f"missing from the README's table: {sorted(spec - set(rows))}"


def test_readme_keeps_a_performance_section_for_the_benchmark():
    assert "\n## Performance\n" in readme()


################ The project's ground


def readme_commands() -> list:
    "The shell commands in the README's code blocks, in order."
    with open(README) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_benchmark_smoke_run():
    "bench/compare.py runs end to end on minikernel and the floor; no timing is asserted."
    r = subprocess.run([sys.executable, os.path.join(HERE, "bench", "compare.py"), "--quick",
                        "--reps", "1", "--kernels", "minikernel,floor"],
                       capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stderr
    assert "| row | minikernel | floor |" in r.stdout
    assert "**no**" not in r.stdout  # every output arrived, exact


def test_ci_runs_the_readme_test_command():
    run_kernel, run_tests = readme_commands()[:2]
    assert run_kernel.endswith("python minikernel.py")
    with open(os.path.join(HERE, ".ci", "run")) as f:
        ci = f.read()
    assert "pytest" in run_tests
    assert run_tests in ci.splitlines()


if __name__ == "__main__":
    save_with_outputs()
