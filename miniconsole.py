#!/usr/bin/env python3
"""miniconsole: a terminal frontend for any Jupyter kernel, in one file, on pyzmq alone.

A Jupyter session is two processes. The kernel runs code; the frontend (this console) reads
what you type and shows what comes back. They share no memory, only five ZeroMQ sockets,
whose ports and signing key the kernel writes into a connection file:

    console (this process)                           kernel (minikernel, ipykernel, ...)
    shell    DEALER --- execute_request ----->  ROUTER  run code, complete, is_complete,
                    <-- execute_reply --------          kernel_info: one reply per request
    control  DEALER --- interrupt, shutdown ->  ROUTER  served even while shell is busy
    stdin    DEALER <-- input_request --------  ROUTER  the kernel asks us for a line
                    --- input_reply --------->          (input(), pdb): same zmq identity
                                                        as shell, so it can address us
    iopub    SUB    <-- status, stream, ... --  (X)PUB  output, broadcast to every frontend
    hb       REQ    --- b"ping", echoed ----->  ROUTER  echoed in C (ipykernel: also in C, on a
                                                        thread of its own): silence means a
                                                        stopped or dead kernel, not a busy one

The console sends each cell on shell and waits for its execute_reply. Meanwhile it prints
what iopub broadcasts (its own cell's output and, marked, other frontends' cells), answers
input_request from the keyboard, turns Ctrl-C into interrupt_request on control, and watches
hb, so that a dead kernel is noticed within seconds (a stopped one is waited for).

    python miniconsole.py                    start minikernel.py (beside this file), attach,
                                             and shut it down on exit (unless --keep-kernel)
    python miniconsole.py --existing [NAME]  attach to a running kernel: a connection file,
                                             or the newest *NAME* (no NAME: kernel*.json)
                                             in . or the Jupyter runtime dir
    printf 'x = 1\\nprint(x + 1)\\n' | python miniconsole.py --existing   piped: outputs only

The kernel decides when a cell is complete (when it cannot say, a blank line ends the cell, and
at a terminal two blank lines always do); Tab completes; history is kept. Ctrl-C interrupts
a running cell (interrupt_request), also on a kernel we did not start; at the prompt it drops
the cell being typed. Ctrl-D, or exit or quit typed alone, leave; a kernel we did not start
stays alive. exit() inside a longer cell (an ask_exit payload) stops the kernel too, as in jupyter
console; quit(keep_kernel=True) keeps it, and so does --keep-kernel, for a kernel we started.
Piped, cells come from stdin (a blank line inside an indented block does not end it when the
next line is still indented, as in a file), input() takes the next line, only the cells'
output is printed, and the exit status is 1 if any cell raised. A silent heartbeat is reported
once and waited out; exit status 3: the kernel died. POSIX only: signals keep the console
watching while it waits for you to type.
"""

import argparse
import atexit
import contextlib
import getpass
import glob
import hmac
import itertools
import json
import os
import re
import readline
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Optional

import zmq

USER = os.environ.get("USER", "username")
TICK = 0.25  # seconds between looks at iopub and hb while we wait for a line
HB_SILENCE = 1.5  # seconds without a heartbeat echo before we look closer (see watch_kernel)
COMPLETE_WAIT = 15.0  # seconds Tab waits: ipykernel's first (jedi) completion can take seconds
OTHER = "[other frontend] "  # marks each line that another frontend's cell produced
EXIT_COMMANDS = {"exit", "quit", "exit()", "quit()"}
KERNEL_DIED = 3  # exit code; 1 means no kernel was found, or (piped) a cell raised

################ Connection file: how a frontend finds a kernel

# A kernel publishes itself as a small JSON file; whoever can read it can run code:
#   {"shell_port": 41477, "iopub_port": 33687, "stdin_port": 34147, "control_port": 35183,
#    "hb_port": 49955, "ip": "127.0.0.1", "transport": "tcp", "key": "b115...",
#    "signature_scheme": "hmac-sha256", "kernel_name": ""}
# Kernels write theirs into Jupyter's runtime dir; --existing looks there and in ".".


def data_dir() -> str:
    "Jupyter's per-user data dir: $JUPYTER_DATA_DIR, else the platform's usual place."
    if os.environ.get("JUPYTER_DATA_DIR"):
        return os.environ["JUPYTER_DATA_DIR"]
    if sys.platform == "darwin":
        return os.path.expanduser("~/Library/Jupyter")
    share = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(share, "jupyter")


def runtime_dir() -> str:
    "Where running kernels leave their connection files."
    return os.environ.get("JUPYTER_RUNTIME_DIR") or os.path.join(data_dir(), "runtime")


def find_connection_file(name: str) -> str:
    "--existing NAME: a path, else the newest file matching NAME (or kernel*.json) in . or runtime."
    if os.path.isfile(name):
        return name
    if os.sep in name:
        raise SystemExit(f"miniconsole: no connection file {name}")
    pattern = name if set(name) & set("*?[") else f"*{name}*" if name else "kernel*.json"
    dirs = [os.getcwd(), runtime_dir()]
    found = [f for d in dirs for f in glob.glob(os.path.join(d, pattern)) if os.path.isfile(f)]
    if not found:
        where = " or ".join(dirs)
        raise SystemExit(f"miniconsole: no connection file matching {pattern} in {where}")
    return max(found, key=os.path.getmtime)


def start_kernel() -> tuple:
    "Start the minikernel.py beside this file on a fresh connection file: (process, path)."
    os.makedirs(runtime_dir(), mode=0o700, exist_ok=True)
    path = os.path.join(runtime_dir(), f"kernel-{uuid.uuid4()}.json")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "minikernel.py")
    # A process session of its own, so that Ctrl-C at this terminal reaches only us: we pass
    # it on as interrupt_request, the same way as to a kernel we did not start. Its stderr is
    # kept aside, to say why if it dies at once, and so that it stays off our terminal.
    with tempfile.TemporaryFile() as log:
        kernel = subprocess.Popen([sys.executable, script, "-f", path], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the kernel picks ports, then writes the file
                if kernel.poll() is not None:
                    log.seek(0)
                    why = (log.read().decode(errors="replace").strip().splitlines() or ["?"])[-1]
                    raise SystemExit(f"miniconsole: {script} exited ({kernel.returncode}): {why}")
                with contextlib.suppress(OSError, ValueError):  # not there yet, or half written
                    with open(path) as f:
                        json.load(f)
                    return kernel, path
                time.sleep(0.05)
            raise SystemExit(f"miniconsole: {script} wrote no connection file in 30 s")
        except BaseException:  # that, or Ctrl-C meanwhile: the kernel must not outlive us
            kernel.kill()
            kernel.wait()
            with contextlib.suppress(OSError):
                os.remove(path)
            raise


################ Wire format: one message, many frames

# A message is four JSON dicts. On the wire it travels as one ZeroMQ multipart message:
#   [ids..., b"<IDS|MSG>", signature, header, parent_header, metadata, content, buffers...]
# The ids are ROUTER routing frames (or an iopub topic). Their number varies, one per ROUTER
# a message has passed through, so the delimiter marks where the message proper begins. The
# signature is the hex HMAC of the four dict frames, keyed with the connection file's key:
# whoever holds the key may run code, so everything received is checked before it is
# believed. Buffers (raw binary frames, for comms) are not signed: only the dicts are.

DELIM = b"<IDS|MSG>"
PROTOCOL_VERSION = "5.5"
DICTS = ("header", "parent_header", "metadata", "content")


# JSON as its standard has it, both ways. Python's json reads and writes NaN and Infinity, which
# are not JSON: a browser's JSON.parse refuses a whole message that holds one. So a message
# received with one is dropped, and one to send raises ValueError where it was made (in the
# kernel: in the user code that displayed or sent it). Made once: json.dumps and json.loads with
# options build an encoder or decoder per call, a microsecond each time.
def refuse_constant(name: str):
    "NaN, Infinity or -Infinity in a received frame: not JSON."
    raise ValueError(f"{name} is not JSON")


ENCODE = json.JSONEncoder(default=str, ensure_ascii=False, allow_nan=False).encode
DECODE = json.JSONDecoder(parse_constant=refuse_constant).decode  # of str: see from_frames
# Signatures remembered, to reject a replayed message: 2**15 to 2**16 of them, kept in two
# halves, of which the older is forgotten whole.
REPLAY_MEMORY = 2**16
HEADER_DEPTH = 32  # how deep lists and objects may nest in a header (any JSON, but not a bomb)


def new_session(key: str, scheme: str = "hmac-sha256") -> dict:
    "One end's state: key, session id, message count, last parent sent, signatures seen."
    if not scheme.startswith("hmac-"):
        raise ValueError(f"unsupported signature_scheme {scheme!r}")
    auth = hmac.new(key.encode(), digestmod=scheme[5:]) if key else None
    return {"id": uuid.uuid4().hex, "auth": auth, "count": itertools.count(), "parent": (None, b""),
            "seen": set(), "seen_before": set()}


def new_msg(session: dict, msg_type: str, content: dict, parent: Optional[dict] = None) -> dict:
    "A message as the four dicts; parent_header is the whole header of the request it answers."
    # Unique as the spec asks, like jupyter_client's: a random session id and a count (a uuid4
    # per message would cost a syscall and 3 µs).
    header = {"msg_id": f"{session['id']}_{next(session['count'])}", "session": session["id"],
              "username": USER,
              "date": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
              "msg_type": msg_type, "version": PROTOCOL_VERSION}
    return {"header": header, "parent_header": parent or {}, "metadata": {}, "content": content}


def sign(session: dict, parts: list) -> bytes:
    "The hex HMAC over the four dict frames, in order; empty when there is no key."
    if session["auth"] is None:
        return b""
    h = session["auth"].copy()  # copying the keyed state is cheaper than re-keying
    for part in parts:
        h.update(part)
    return h.hexdigest().encode()


def json_frame(d: dict) -> bytes:
    "One dict as a frame of JSON."
    # UTF-8 rather than \uXXXX escapes: smaller, and quicker to encode. A lone surrogate has no
    # UTF-8, so backslashreplace writes it as the \udXXX escape that JSON would have used.
    try:
        return ENCODE(d).encode(errors="backslashreplace") if d else b"{}"  # {}: metadata, mostly
    except ValueError as e:  # NaN, Infinity or a cycle
        raise ValueError(str(e)) from None  # its traceback ends where the message was made


def to_frames(session: dict, msg: dict, ids: Sequence[bytes] = ()) -> list:
    "Serialize, sign: [ids..., <IDS|MSG>, signature, header, parent, metadata, content, buffers...]"
    # Shaped for speed: the 3 to 5 messages that answer a request all have its header as their
    # parent, so the JSON of the last parent is kept (a header never changes once made).
    parent, (last, last_json) = msg["parent_header"], session["parent"]
    if parent is not last:
        last_json = json_frame(parent)
        session["parent"] = (parent, last_json)  # one tuple: other threads see both or neither
    parts = [json_frame(msg["header"]), last_json, json_frame(msg["metadata"]),
             msg.get("content_json") or json_frame(msg["content"])]  # by minikernel's stream_json
    return [*ids, DELIM, sign(session, parts), *parts, *msg.get("buffers", ())]


def from_frames(session: dict, frames: list) -> dict:
    "Check and parse frames into a message; ValueError says why they are not one."
    if DELIM not in frames:
        raise ValueError("no <IDS|MSG> delimiter")
    i = frames.index(DELIM)
    if len(frames) < i + 6:
        raise ValueError(f"{len(frames) - i - 1} frames after the delimiter, need 5")
    signature, parts = frames[i + 1], frames[i + 2 : i + 6]
    if session["auth"] is not None:
        if not signature:
            raise ValueError("unsigned message")
        seen = hash(signature)  # a 36-byte int, not a 97-byte string (false match: 1 in 2**48)
        if seen in session["seen"] or seen in session["seen_before"]:
            raise ValueError("replayed message (signature seen before)")
        if not hmac.compare_digest(signature, sign(session, parts)):
            raise ValueError("bad signature")
        session["seen"].add(seen)
        if len(session["seen"]) >= REPLAY_MEMORY // 2:
            session["seen_before"], session["seen"] = session["seen"], set()
    try:
        # JSON is UTF-8. A byte that is not is read as U+FFFD, as jupyter_client reads it:
        # ipykernel sends a lone surrogate that user code printed as the byte it stands for.
        msg = dict(zip(DICTS, (DECODE(part.decode(errors="replace")) for part in parts)))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not all(isinstance(msg[k], dict) for k in DICTS):
        raise ValueError("header, parent_header, metadata and content must be JSON objects")
    if not isinstance(msg["header"].get("msg_type"), str):
        raise ValueError("header has no msg_type")
    if nested_deeper(msg["header"], HEADER_DEPTH):  # echoed back: it must serialize again
        raise ValueError(f"header nested more than {HEADER_DEPTH} deep")
    msg["ids"], msg["buffers"] = frames[:i], frames[i + 6 :]
    return msg


def nested_deeper(value, levels: int) -> bool:
    "Do lists and objects nest more than `levels` deep in this JSON value?"
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, list) and (levels == 0 or any(nested_deeper(v, levels - 1)
                                                           for v in value))


################ The client: five sockets to one kernel

SOCKETS = {"shell": zmq.DEALER, "control": zmq.DEALER, "stdin": zmq.DEALER,  # our end of each
           "iopub": zmq.SUB, "hb": zmq.REQ}                                  # channel


class Client:
    """One frontend's sockets to one kernel, and the session that signs for them.

        client = Client("kernel-1234.json")
        info = handshake(client)                       # the kernel_info_reply content
        reply = client.request("shell", "execute_request", {"code": "1 + 1", ...})
        for msg in client.iopub(timeout=1.0): ...      # messages as dicts, as on the wire
        client.heartbeat(timeout=1.0)                  # False once the kernel stopped echoing

    Not thread-safe, as no zmq socket is: use a Client from one thread at a time."""

    def __init__(self, connection_file: str):
        with open(connection_file) as f:
            self.info = info = json.load(f)
        self.connection_file = connection_file
        self.session = new_session(info["key"], info.get("signature_scheme", "hmac-sha256"))
        self.log = None  # log(arrow, channel, msg) is called for every message: --show-messages
        self.sockets = {}
        for channel, kind in SOCKETS.items():
            sock = self.sockets[channel] = zmq.Context.instance().socket(kind)
            sock.linger = 0  # closing never waits to deliver to a kernel that may be gone
            if channel in ("shell", "stdin"):  # the kernel sends input_request to the
                sock.identity = self.session["id"].encode()  # identity its request came from
            port = info[f"{channel}_port"]
            tcp = info.get("transport", "tcp") == "tcp"
            sock.ipv6 = ":" in info["ip"]  # zmq takes an IPv6 address (::1) only when told
            sock.connect(f"tcp://{info['ip']}:{port}" if tcp else f"ipc://{info['ip']}-{port}")
        self.sockets["iopub"].subscribe(b"")  # every topic: the kernel's whole broadcast
        self.sockets["hb"].send(b"ping")
        self.last_echo = time.monotonic()

    def send(self, channel: str, msg_type: str, content: dict, parent: Optional[dict] = None):
        "Sign and send a message on shell, control or stdin; return it (header.msg_id names it)."
        msg = new_msg(self.session, msg_type, content, parent)
        # A DEALER sends [<IDS|MSG>, signature, header, parent, metadata, content]; the
        # kernel's ROUTER puts our identity in front, and addresses its reply with it.
        self.sockets[channel].send_multipart(to_frames(self.session, msg))
        if self.log:
            self.log("->", channel, msg)
        return msg

    def recv(self, channel: str, timeout: float) -> Optional[dict]:
        "The next good message on channel within timeout seconds, else None; bad ones are dropped."
        sock, deadline = self.sockets[channel], time.monotonic() + timeout
        while sock.poll(max(0.0, deadline - time.monotonic()) * 1000):
            frames = sock.recv_multipart()  # [<IDS|MSG>, ...], or on iopub [topic, <IDS|MSG>, ...]
            try:
                msg = from_frames(self.session, frames)
            except ValueError as e:
                print(f"miniconsole: dropped a bad message on {channel}: {e}", file=sys.stderr)
                continue
            if self.log:
                self.log("<-", channel, msg)
            return msg
        return None

    def request(self, channel: str, msg_type: str, content: dict, timeout: float = 10.0):
        "Send a request and return the reply whose parent it is, or None after timeout seconds."
        msg_id = self.send(channel, msg_type, content)["header"]["msg_id"]
        deadline = time.monotonic() + timeout
        while (reply := self.recv(channel, deadline - time.monotonic())) is not None:
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply  # others answer requests whose replies we stopped waiting for
        return None

    def iopub(self, timeout: float = 0.0):
        "Yield iopub messages as they come, until none came for timeout seconds."
        while (msg := self.recv("iopub", timeout)) is not None:
            yield msg

    def heartbeat(self, timeout: float = 0.0) -> bool:
        "True until hb stays silent HB_SILENCE s: collect an echo (waiting up to timeout), ping on."
        hb = self.sockets["hb"]
        if hb.poll(timeout * 1000):
            hb.recv()
            self.last_echo = time.monotonic()
            hb.send(b"ping")  # a REQ socket alternates: the next ping only after this echo
        return time.monotonic() - self.last_echo < HB_SILENCE

    def listening(self) -> bool:
        "Does anything listen on the kernel's hb port still? A stopped kernel does; a dead one not."
        info, port = self.info, self.info["hb_port"]
        try:  # the operating system accepts a connection for a process that is stopped
            if info.get("transport", "tcp") == "tcp":
                socket.create_connection((info["ip"], port), timeout=1.0).close()
            else:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(1.0)
                    sock.connect(f"{info['ip']}-{port}")
        except (ConnectionRefusedError, FileNotFoundError):  # nothing there: the kernel is gone
            return False
        except OSError:  # a timeout, no route: we cannot tell, so it may be alive
            pass
        return True

    def close(self) -> None:
        "Close our sockets. The kernel lives on."
        for sock in self.sockets.values():
            sock.close(linger=0)


################ Handshake: is anyone there?

# A SUB socket misses whatever the kernel publishes before our subscription has reached it
# (zmq's "slow joiner"), and nothing says when that happened. So we nudge: kernel_info_request
# again and again, until its reply came back AND something arrived on iopub (the busy/idle
# around a nudge, or a 5.5 kernel's iopub_welcome). From then on no output can slip past us.


def handshake(client: Client, timeout: float = 10.0) -> dict:
    "Nudge until shell and iopub both answered; return the kernel_info_reply content."
    # A kernel busy with another frontend's cell answers our nudges only when that cell ends,
    # but its heartbeat echoes meanwhile. So after timeout, we wait on while it echoes, having
    # said why, and send no more nudges: those on their way will be answered.
    reply, heard, deadline, waiting = None, False, time.monotonic() + timeout, False
    while not (reply and heard):
        if time.monotonic() > deadline and not waiting:
            if not client.heartbeat(1.0):
                raise TimeoutError(f"no kernel answers at {client.connection_file} ({timeout} s)")
            print("miniconsole: the kernel is alive but busy (another frontend's cell?); waiting"
                  " for it (Ctrl-C gives up)", file=sys.stderr)
            waiting = True
        if not waiting:
            client.send("shell", "kernel_info_request", {})
        elif not client.heartbeat():  # it went silent while we waited: stopped, or gone
            raise TimeoutError(f"the kernel at {client.connection_file} stopped answering")
        reply = client.recv("shell", 0.5) or reply  # any reply will do: all answer a nudge
        heard = client.recv("iopub", 0.1) is not None or heard
    return reply["content"]


################ The console's state

class KernelDied(Exception):
    "The kernel is gone: its process exited, or nothing listens where it was."


class Renumber(Exception):
    "Another frontend ran a cell while we sat at In [N]: ask again, with the new N."


class Console:
    "What the console knows between messages: its kernel, its mode, and what it is waiting for."

    def __init__(self, client: Client, tty: bool, others: bool,
                 kernel: Optional[subprocess.Popen] = None):
        self.client = client
        self.kernel = kernel  # the kernel's process, if we started it
        self.stalled = False  # the heartbeat went silent, and we said so
        self.tty = tty  # a terminal: prompts and readline; else piped, and only outputs
        self.others = others  # show what other frontends' cells do
        self.count = 1  # the execution_count of the next cell: In [count]
        self.failed = False  # some cell raised: piped mode exits 1
        self.running = None  # msg_id of our execute_request, until its reply and idle are in
        self.reply = None  # its execute_reply
        self.idle = False  # its status: idle arrived
        self.interrupts = 0  # Ctrl-C presses while it runs
        self.reading = False  # waiting in input() or getpass() for a line
        self.prompt = None  # the prompt being shown, to redraw after output that arrives meanwhile
        self.erased = False  # output has replaced it on the screen
        self.matches = []  # what Tab offers
        self.pushed = None  # piped: a line read ahead, to be read again (see block_goes_on)
        self.leaving = False  # a cell asked us to leave (exit(): an ask_exit payload)
        self.keep = False  # and to keep the kernel running (quit(keep_kernel=True))


################ Reading a cell: prompts, is_complete, Tab, history

# The kernel knows its language, so the kernel decides when a cell is complete:
#   is_complete_request {"code": "for i in range(3):"}
#   is_complete_reply   {"status": "incomplete", "indent": "    "}   (or complete, invalid, unknown)
# A kernel that cannot tell, or is too busy to answer in a second, gets "a blank line ends it".


def read_cell(con: Console) -> Optional[str]:
    "Lines until the kernel says they make a cell; None when the user leaves."
    lines, indent, prompt = [], "", ""
    while True:
        prompt = "...: ".rjust(len(prompt)) if lines else f"In [{con.count}]: "
        try:
            line = read_line(con, prompt if con.tty else "", indent if con.tty else "")
        except Renumber as typed:  # the half-typed line comes back, under the new prompt
            indent = typed.args[0]
            continue
        except EOFError:  # Ctrl-D; or the pipe is done, and the last cell runs as it is
            write(con, "stdout", "\n" if con.tty else "")
            return "\n".join(lines) if lines and not con.tty else None
        if not lines and line.strip() in EXIT_COMMANDS:
            return None
        if not lines and not line.strip():
            indent = ""  # a half-typed line that came back, erased: it is gone
            continue
        lines.append(line if line.strip() else "")  # an untouched indent counts as blank
        status, indent = is_complete(con, "\n".join(lines))
        if status is None and len(lines) == 1 and con.tty:  # a kernel busy with another's cell
            write(con, "stderr", "miniconsole: the kernel did not say if the cell is complete "
                                 "(busy?): a blank line runs it\n")
        blank = not line.strip()  # unknown, no answer, or an error: a blank line ends the cell,
        ended = (status in ("complete", "invalid") or (blank and status != "incomplete")
                 or (blank and lines[-2:] == ["", ""]))  # and two, whatever the kernel says
        # (piped, blank lines never end a block whose next line is still indented: as in a file)
        if ended and (con.tty or line.strip() or not block_goes_on(con, lines)):
            return "\n".join(lines)  # invalid runs too: the kernel explains the error best


def block_goes_on(con: Console, lines: list) -> bool:
    "Piped, after a blank line: does the next line that is not blank go on with the block?"
    # A script may have blank lines inside a function. At a terminal a blank line ends the
    # block; from a file it does not, if the next line is still indented. So we read on.
    blanks, line = [], ""
    while not line.strip():
        try:
            line = read_line(con, "")
        except EOFError:  # the script ends here
            return False
        blanks.append("")
    blanks.pop()  # that one was the line itself
    if line[:1] in (" ", "\t"):
        lines += [*blanks, line]
        return True
    con.pushed = line  # the start of the next cell
    return False


def is_complete(con: Console, code: str) -> tuple:
    "(status, indent) from is_complete_reply; status None when the kernel does not answer in time."
    reply = con.client.request("shell", "is_complete_request", {"code": code}, timeout=1.0)
    content = reply["content"] if reply else {}
    return content.get("status"), content.get("indent", "")


def complete(con: Console, text: str, state: int) -> Optional[str]:
    "readline's completer: ask complete_request once per Tab, then hand out the matches."
    if state == 0:
        con.matches = []
        line, begin, end = readline.get_line_buffer(), readline.get_begidx(), readline.get_endidx()
        reply = None if con.running else con.client.request(  # not while the kernel waits on stdin
            "shell", "complete_request", {"code": line, "cursor_pos": end}, timeout=COMPLETE_WAIT)
        content = reply["content"] if reply else {}
        for match in content.get("matches", []) if content.get("status") == "ok" else []:
            full = line[: content["cursor_start"]] + match  # the line as the kernel completes it
            if full[:begin] == line[:begin]:  # readline replaces only from begin on
                con.matches.append(full[begin:])
    return con.matches[state] if state < len(con.matches) else None


def setup_readline(con: Console) -> None:
    "Line editing, Tab through complete_request, and a history file in Jupyter's data dir."
    readline.set_completer(lambda text, state: complete(con, text, state))
    libedit = "libedit" in (readline.__doc__ or "")  # macOS's stand-in speaks another dialect
    readline.parse_and_bind("bind ^I rl_complete" if libedit else "tab: complete")
    path = os.path.join(data_dir(), "miniconsole_history")
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(1000)
    # Ctrl-C makes the terminal throw away input not read yet. If that comes between Python's
    # wait for a key and readline's read of it, readline waits for a key that is gone, and no
    # signal handler runs until one comes: the console looks dead (8 of 20 consoles here, in 5
    # tries each of Enter then Ctrl-C at once). NOFLSH keeps that input: 0 of 20.
    attrs = termios.tcgetattr(sys.stdin)
    lflag = attrs[3] | termios.NOFLSH
    termios.tcsetattr(sys.stdin, termios.TCSANOW, [*attrs[:3], lflag, *attrs[4:]])
    atexit.register(lambda: termios.tcsetattr(sys.stdin, termios.TCSANOW, attrs))  # as it was

    def save() -> None:
        with contextlib.suppress(OSError):
            os.makedirs(data_dir(), exist_ok=True)
            readline.write_history_file(path)
    atexit.register(save)


################ Running a cell: one execute_request, four sockets to serve

# execute_request goes out on shell. Until both its execute_reply (shell) and its status: idle
# (iopub) are in, output arrives on iopub, the kernel may ask for a line on stdin, and control
# brings the interrupt_reply after a Ctrl-C. Idle comes after the last output on iopub, so once
# both are in, everything the cell printed is on the screen.


def run_cell(con: Console, code: str) -> Optional[dict]:
    "Send execute_request and serve iopub, stdin, shell and control until it is done."
    request = con.client.send("shell", "execute_request", {
        "code": code, "silent": False, "store_history": True, "user_expressions": {},
        "allow_stdin": True, "stop_on_error": True})
    con.running, con.reply, con.idle, con.interrupts = request["header"]["msg_id"], None, False, 0
    receive = {  # channel: what to do with a message that arrives on it
        "iopub": on_iopub,  # output, and our status: idle
        "stdin": answer_input,  # input_request
        "shell": on_reply,  # execute_reply
        "control": lambda con, msg: None,  # interrupt_reply: --show-messages is all it needs
    }
    poller = zmq.Poller()
    for channel in receive:
        poller.register(con.client.sockets[channel], zmq.POLLIN)
    try:
        while not (con.reply and con.idle):
            ready = dict(poller.poll(TICK * 1000))
            for channel, handle in receive.items():
                msg = con.client.recv(channel, 0) if con.client.sockets[channel] in ready else None
                if msg:
                    handle(con, msg)
            watch_kernel(con)
            if con.interrupts > 1:  # a second Ctrl-C: stop waiting, heeded or not, at once
                write(con, "stderr", "miniconsole: stopped waiting; the kernel may still run it\n")
                return None
    finally:
        con.running = None
    return con.reply


def on_reply(con: Console, msg: dict) -> None:
    "shell: keep the execute_reply to our request; older replies were given up on."
    if msg["parent_header"].get("msg_id") == con.running:
        con.reply = msg


def show_reply(con: Console, reply: dict) -> None:
    "What the execute_reply adds: success or not, the next execution_count, and its payloads."
    content = reply["content"]
    con.failed |= content.get("status") != "ok"
    if isinstance(content.get("execution_count"), int):
        con.count = content["execution_count"] + 1
    try:  # e.g. [{"source": "page", "data": {"text/plain": "..."}}] for obj?
        payload = content.get("payload", [])
        pages = [bundle(p["data"]) for p in payload if p["source"] == "page"]
        exits = [p for p in payload if p["source"] == "ask_exit"]  # exit() or quit() in a cell
    except (KeyError, TypeError, AttributeError) as e:
        return write(con, "stderr", f"miniconsole: could not show the reply's payload: {e!r}\n")
    for page in pages:
        write(con, "stdout", page + "\n")
    for ask in exits:  # as jupyter console: the kernel stops too, unless quit(keep_kernel=True)
        con.leaving, con.keep = True, bool(ask.get("keepkernel"))  # {"keepkernel": true}


################ Output: what each iopub msg_type looks like on a terminal

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colours and cursor moves: not for a pipe


def bundle(data: dict) -> str:
    "A mimebundle as text: its text/plain, and a one-line placeholder for each other mimetype."
    lines = [data["text/plain"]] if "text/plain" in data else []
    for mime, value in data.items():
        if mime != "text/plain":  # {"image/png": "iVBORw0KGgo..."}: a terminal can't show it
            size = len(value if isinstance(value, str) else json.dumps(value))
            lines.append(f"<{mime}, {size} characters>")
    return "\n".join(lines)


OUTPUT = {  # msg_type: (content, tty) -> (stdout or stderr, text)
    "stream": lambda c, tty: (c["name"], c["text"]),  # {"name": "stdout", "text": "2\n"}
    "execute_input": lambda c, tty: ("stdout", f"In [{c['execution_count']}]: {c['code']}\n"),
    "execute_result": lambda c, tty: (  # {"execution_count": 3, "data": {"text/plain": "2"}}
        "stdout", (f"Out[{c['execution_count']}]: " if tty else "") + bundle(c["data"]) + "\n"),
    "display_data": lambda c, tty: ("stdout", bundle(c["data"]) + "\n"),
    "update_display_data": lambda c, tty: ("stdout", bundle(c["data"]) + "\n"),
    "error": lambda c, tty: (  # {"ename": ..., "evalue": ..., "traceback": [lines]}
        "stderr", "\n".join(c["traceback"] or [f"{c['ename']}: {c['evalue']}"]) + "\n"),
    # Clears the cursor's line only: after output that ended in a newline, an empty one.
    "clear_output": lambda c, tty: ("stdout", "\r\x1b[K" if tty else ""),
}


SILENT = {"status", "iopub_welcome", "comm_open", "comm_msg", "comm_close", "debug_event",
          "shutdown_reply"}  # known iopub types with nothing to show on a terminal


def on_iopub(con: Console, msg: dict) -> None:
    "One iopub message: note our idle, follow the execution_count, show the output."
    kind, content, parent = msg["header"]["msg_type"], msg["content"], msg["parent_header"]
    theirs = parent.get("session") not in (None, con.client.session["id"])
    if kind == "status" and parent.get("msg_id") == con.running and not theirs:
        con.idle = con.idle or content.get("execution_state") == "idle"
    if kind == "execute_input" and isinstance(content.get("execution_count"), int):
        con.count = content["execution_count"] + 1  # any frontend's cell moves the count on
    if kind not in OUTPUT and kind not in SILENT:
        return write(con, "stderr", f"miniconsole: dropped an iopub {kind!r}: unknown type\n")
    if kind not in OUTPUT or (theirs and (not con.others or kind == "clear_output")):
        return
    if kind == "execute_input" and not theirs:  # we know what we typed
        return
    try:
        stream, text = OUTPUT[kind](content, con.tty)
        if not isinstance(text, str):
            raise TypeError(f"its text is a {type(text).__name__}")
    except (KeyError, TypeError, AttributeError) as e:
        return write(con, "stderr", f"miniconsole: could not show a {kind} message: {e!r}\n")
    if theirs:  # whole lines, each marked
        text = "".join(OTHER + line + "\n" for line in text.splitlines())
    write(con, stream, text)


def write(con: Console, stream: str, text: str) -> None:
    "Print text now, to stdout or stderr: in whole lines above a waiting prompt; plain if piped."
    if con.prompt is not None and con.tty:
        if not con.erased:  # the prompt line makes way; tick redraws it after
            sys.stdout.write("\r\x1b[K")
            con.erased = True
        text += "" if text.endswith("\n") else "\n"
    out = sys.stderr if stream == "stderr" else sys.stdout
    out.write(text if con.tty else ANSI.sub("", text))
    out.flush()


def show_message(con: Console, arrow: str, channel: str, msg: dict) -> None:
    "--show-messages: one line per message as it passes: channel, direction, msg_type, content."
    content = json.dumps(msg["content"], default=str)
    content = content if len(content) <= 80 else content[:77] + "..."
    write(con, "stderr", f"{channel:>7} {arrow} {msg['header']['msg_type']:<20} {content}\n")


################ stdin: the kernel asks us for a line

# input() or pdb in the kernel sends  input_request {"prompt": "(Pdb) ", "password": false}
# to the identity of the shell request that is running, that is to us; we send back
#   input_reply {"value": "p x"}   with the request's header as parent_header.


def answer_input(con: Console, msg: dict) -> None:
    "Read the answer to an input_request here; Ctrl-C interrupts the kernel instead."
    content = msg["content"]
    try:
        value = read_line(con, content.get("prompt", "") if con.tty else "",
                          password=bool(content.get("password")))
    except EOFError:  # Ctrl-D, or the pipe ran dry
        value = "\x04"  # the kernel's input() raises EOFError
    except KeyboardInterrupt:  # on_sigint already sent interrupt_request
        return
    con.client.send("stdin", "input_reply", {"value": value}, parent=msg["header"])


################ Waiting for a line: Ctrl-C, kernel death, other frontends

# Everything runs on one thread, so each socket has exactly one user. While that thread sits
# in input() or getpass(), a SIGALRM every TICK seconds runs `tick`: it shows what iopub
# brought (other frontends' cells, late output of ours) above the prompt, and checks hb. A
# handler that raises ends input() cleanly, so a dead kernel is reported at the first tick
# after HB_SILENCE: within 2 s.
#
# Ctrl-C is SIGINT. While our cell runs it belongs to the kernel: interrupt_request on control,
# which reaches a kernel we did not start too (a signal would need its process). The spec asks
# it of kernels whose interrupt_mode is "message"; ipykernel (6 and later, in either mode) and
# minikernel take it. Otherwise Ctrl-C is ours: KeyboardInterrupt.


def read_line(con: Console, prompt: str, indent: str = "", password: bool = False) -> str:
    "One line from the terminal (readline, or getpass) or the pipe, while tick keeps watch."
    def prefill() -> None:  # offer the kernel's indent on a continuation line
        readline.insert_text(indent)
        readline.redisplay()
    if con.pushed is not None:  # piped: a line read ahead
        line, con.pushed = con.pushed, None
        return line
    if indent:
        readline.set_pre_input_hook(prefill)
    con.reading, con.prompt = True, None if password else prompt
    signal.setitimer(signal.ITIMER_REAL, TICK, TICK)
    try:
        return getpass.getpass(prompt) if password and con.tty else input(prompt)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        con.reading, con.prompt, con.erased = False, None, False  # the next read draws anew
        readline.set_pre_input_hook()


def tick(con: Console) -> None:
    "SIGALRM while we wait for a line: show what arrived on iopub, redraw the prompt, check hb."
    if con.prompt is not None:  # not while getpass() reads: it has no line to redraw
        for msg in con.client.iopub():
            on_iopub(con, msg)
    if (con.erased and not con.running  # at our prompt, not at input() while our cell runs
            and con.prompt.startswith("In [") and con.prompt != f"In [{con.count}]: "):
        con.erased = False  # readline cannot change its prompt: end this input(), ask anew
        raise Renumber(readline.get_line_buffer())
    if con.erased:  # output went where the prompt was: draw it again, with the half-typed line
        sys.stdout.write(con.prompt + readline.get_line_buffer())
        sys.stdout.flush()
        con.erased = False
    try:
        watch_kernel(con)
    except KernelDied:
        sys.stdout.write("\n" if con.tty else "")  # off the prompt line, for the last word
        raise


def watch_kernel(con: Console) -> None:
    "Is the kernel alive? KernelDied if it is gone; a silent heartbeat is reported once."
    # A silent heartbeat alone proves nothing: swap, a debugger or SIGSTOP can hold a kernel
    # for minutes, and its state is worth waiting for. A kernel we started is dead when its
    # process has exited. One we attached to is dead when nothing listens on its hb port: the
    # operating system still accepts connections for a stopped process, not for a dead one.
    if con.kernel is not None and con.kernel.poll() is not None:
        raise KernelDied(f"its process exited with code {con.kernel.returncode}")
    if con.client.heartbeat():
        con.stalled = False
    elif con.kernel is None and not con.client.listening():
        raise KernelDied(f"no heartbeat for {HB_SILENCE} s, and nothing listens on its port")
    elif not con.stalled:
        con.stalled = True
        write(con, "stderr", f"miniconsole: no heartbeat for {HB_SILENCE} s; waiting for the "
                             "kernel (stopped, or swapping?)\n")


def on_alarm(con: Console) -> None:
    "The SIGALRM handler: tick, with Ctrl-C held back until it is done, so no message is lost."
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGALRM})
        tick(con)
    finally:  # a Ctrl-C that came meanwhile is delivered now, between two messages
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGALRM})


def on_sigint(con: Console) -> None:
    "The SIGINT handler: interrupt the kernel while our cell runs; else, or at input(), raise."
    if con.running:
        con.interrupts += 1
        con.client.send("control", "interrupt_request", {})
    if con.reading or not con.running:
        raise KeyboardInterrupt


################ The console loop, on a terminal or from a pipe

# Piped (stdin is not a terminal) the loop is the same: lines come from the pipe, input
# requests take the next line, and nothing but the cells' output is printed: no banner, no
# prompts, no escape codes, no other frontends. The exit code says whether any cell raised.


def console_loop(con: Console) -> int:
    "Read a cell, run it, show its reply; until the user leaves. Returns the exit code."
    while True:
        try:
            code = read_cell(con)
            if code is None:
                return 1 if con.failed and not con.tty else 0
            reply = run_cell(con, code)
            if reply:
                show_reply(con, reply)
            if con.leaving:
                return 1 if con.failed and not con.tty else 0
        except KeyboardInterrupt:  # at the prompt: drop the cell being typed, prompt anew
            write(con, "stdout", "\n" if con.tty else "")


################ main: find or start a kernel, attach, and leave it as we found it


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    "The command line; --help prints this file's docstring: the model, and how to use it."
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--existing", nargs="?", const="", metavar="FILE|NAME",
                        help="attach to a running kernel instead of starting one")
    parser.add_argument("--keep-kernel", action="store_true",
                        help="leave the kernel we started running, and say how to reattach")
    parser.add_argument("--no-others", action="store_true",
                        help="do not show the cells other frontends run on the same kernel")
    parser.add_argument("--show-messages", action="store_true",
                        help="print every message sent and received, live (to stderr)")
    return parser.parse_args(argv)


def main(argv: Optional[list] = None) -> int:
    "Attach to a kernel (started here or --existing), run the console, clean up."
    args = parse_args(argv)
    # What a kernel prints may not be text the terminal can take: a lone surrogate (its JSON
    # escape, from minikernel) has no UTF-8. Shown as its escape, \udcff, it ends nothing.
    sys.stdout.reconfigure(errors="backslashreplace")
    kernel = None  # the kernel process, if we started it
    if args.existing is None:
        try:
            kernel, path = start_kernel()
        except KeyboardInterrupt:  # Ctrl-C as it started: it is stopped, and its file gone
            return 130
    else:
        path = find_connection_file(args.existing)
    client = con = None
    try:
        try:
            client = Client(path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, zmq.ZMQError) as e:
            raise SystemExit(f"miniconsole: cannot use connection file {path}: {e!r}") from None
        tty = sys.stdin.isatty()
        con = Console(client, tty, others=tty and not args.no_others, kernel=kernel)
        if args.show_messages:
            client.log = lambda arrow, channel, msg: show_message(con, arrow, channel, msg)
        signal.signal(signal.SIGINT, lambda signum, frame: on_sigint(con))
        signal.signal(signal.SIGALRM, lambda signum, frame: on_alarm(con))
        info = handshake(client)
        # An empty silent execute_request runs nothing and tells where the kernel's count is.
        count = client.request("shell", "execute_request", {
            "code": "", "silent": True, "store_history": False, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": False}, timeout=5.0)
        if count and isinstance(count["content"].get("execution_count"), int):
            con.count = count["content"]["execution_count"] + 1
        if tty:
            setup_readline(con)
            print(info.get("banner", "").rstrip())
            print(f"[connected to {path}; Ctrl-C interrupts, Ctrl-D leaves]")
        return console_loop(con)
    except TimeoutError as e:
        print(f"miniconsole: {e}", file=sys.stderr)
        return 1
    except KernelDied as e:
        print(f"miniconsole: the kernel died ({e})", file=sys.stderr)
        return KERNEL_DIED
    except KeyboardInterrupt:
        return 130
    finally:
        asked = bool(con and con.leaving)  # by exit() or quit() in a cell: see show_reply
        leave(client, kernel, path, args.keep_kernel or (asked and con.keep),
              stop=asked and not con.keep)


def leave(client: Optional[Client], kernel: Optional[subprocess.Popen], path: str,
          keep: bool, stop: bool = False) -> None:
    "On the way out: stop our kernel unless it is kept, one we attached to if exit() asked."
    signal.setitimer(signal.ITIMER_REAL, 0)
    if stop and client and not kernel:  # exit() in a cell stops even a kernel we attached to
        client.request("control", "shutdown_request", {"restart": False}, timeout=2.0)
    elif kernel and keep and kernel.poll() is None:
        print(f"[kernel left running; reattach with: python {sys.argv[0]} --existing {path}]")
    elif kernel:
        try:
            if client and kernel.poll() is None:
                client.request("control", "shutdown_request", {"restart": False}, timeout=2.0)
            kernel.wait(5)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # stuck, or Ctrl-C: no more waiting
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C more must not orphan it now
            kernel.kill()
            kernel.wait()
        with contextlib.suppress(OSError):  # the kernel may have removed it itself
            os.remove(path)
    if client:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
