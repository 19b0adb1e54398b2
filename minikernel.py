#!/usr/bin/env python3
# /// script
# requires-python = ">=3.9"
# dependencies = ["pyzmq"]
# ///
"""minikernel: a complete Jupyter kernel in one file, to read top to bottom.

User code runs in a *kernel* process. *Frontends* (a terminal console, a notebook, JupyterLab)
are other processes that talk to it over five ZeroMQ sockets with signed JSON messages. A
connection file says where the sockets are and holds the signing key, so any number of
frontends can share one kernel, and its namespace.

    frontend (miniconsole.py, jupyter console, ...)                 kernel (this file)
    shell    DEALER --- execute_request, complete_request, ... -->  ROUTER  main thread: runs code
                    <-- execute_reply, complete_reply, ... -------
    iopub    SUB    <-- status, stream, execute_result, error ----  XPUB    shared by all threads
    stdin    DEALER <-- input_request (input() in user code) -----  ROUTER  main thread
                    --- input_reply ----------------------------->
    control  DEALER --- shutdown, interrupt, kernel_info -------->  ROUTER  its own thread
    hb       REQ    --- b"ping", echoed back as it is ----------->  ROUTER  echoed in C

Every request on shell and control is answered on the socket it came on (one the kernel does
not support, with an error), and bracketed on iopub by status busy and idle; a message whose
signature fails is dropped unanswered, so a sender must time out. Everything a cell prints or
displays is broadcast on iopub, so every frontend sees it, each knowing from parent_header
which request it belongs to.

One cell, `print("hi"); 1 + 1`, as it travels: what `python minikernel.py --show-messages`
prints while a frontend F runs it (<- received, -> sent). Every message the kernel sends about
it carries F's execute_request header as its parent_header; only the reply goes to F alone.

      shell <- execute_request      {"code": "print(\"hi\"); 1 + 1", "silent": false, ...}
      iopub -> status               {"execution_state": "busy"}
      iopub -> execute_input        {"code": "print(\"hi\"); 1 + 1", "execution_count": 1}
      iopub -> stream               {"name": "stdout", "text": "hi\n"}
      iopub -> execute_result       {"execution_count": 1, "data": {"text/plain": "2"}, ...}
      shell -> execute_reply        {"status": "ok", "execution_count": 1, "payload": [], ...}
      iopub -> status               {"execution_state": "idle"}

And `name = input("Name? ")`: the kernel asks on stdin, addressed with the routing identity
that F's execute_request came from on shell (F's shell and stdin DEALERs share it), so only F
is asked, and F answers with the input_request as parent_header.

      shell <- execute_request      {"code": "name = input(\"Name? \")", "allow_stdin": true, ...}
      iopub -> status               {"execution_state": "busy"}
      iopub -> execute_input        {"code": "name = input(\"Name? \")", "execution_count": 2}
      stdin -> input_request        {"prompt": "Name? ", "password": false}
      stdin <- input_reply          {"value": "Ada"}
      shell -> execute_reply        {"status": "ok", "execution_count": 2, "payload": [], ...}
      iopub -> status               {"execution_state": "idle"}

The file reads in two parts. Part one is the protocol, what a kernel for any language needs,
in the order of a message's life: the connection file, the wire format, the heartbeat, iopub,
stdin, the shell handlers, signals, control and comms. Part two is the Python: running a cell,
rich output, completion and help, magics, optional integrations (plots, IPython.display,
widgets), output below Python. Then main.
"""

import atexit
import builtins
import contextlib
import getpass
import hmac
import io
import itertools
import json
import operator
import os
import re
import select
import signal
import sys
import threading
import time
import types
import uuid
from collections import deque
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Optional

import zmq

__version__ = "0.1.0"
USER = os.environ.get("USER", "username")
HERE = os.path.dirname(os.path.abspath(__file__))

CELLS_KEPT = 1000  # a long session keeps the history and source lines of its last 1,000 cells

# What the threads share. main() fills in the sockets and session; the shell handlers keep
# the rest up to date as requests come and go.
kernel = {
    "sockets": {},  # name -> zmq socket; each is used by one thread only (iopub: see its lock)
    "session": None,  # signing state, from the connection file's key (see Wire format)
    "connection": {},  # the connection file's dict
    "connection_file": "",  # and its path
    # The shell request being handled, as from_frames parsed it. Its "ids" are the routing
    # frames the shell ROUTER put in front of it: the asker's identity, which addresses the
    # reply (and, on stdin, whose DEALER shares that identity, the input_request).
    "parent": {"header": {}, "content": {}, "ids": []},
    # The header of the request whose user code runs, or ran last (an execute_request, or a
    # comm message whose callback runs): the parent of the output that threads print.
    "cell": {},
    "silent": False,  # a silent execute_request runs: its output is dropped (see hushed)
    "execution_count": 1,  # the N of the next In[N]
    # The last cell's value, which `_` follows while `_` is not the user's own (at first, a
    # placeholder that no cell returns).
    "result": object(),
    "history": deque(maxlen=CELLS_KEPT),  # [(N, code, text/plain of Out[N] or None)]
    "payload": [],  # execute_reply payloads of the running cell (the pager, ask_exit)
    "running": False,  # user code is running: SIGINT becomes KeyboardInterrupt
    "interrupted": False,  # a SIGINT is waiting to be raised in user code
    "starting": False,  # a shell request is here and its code has not started yet
    "sending": False,  # the main thread is sending a message: no raising now (see uninterrupted)
    "in_sigint": False,  # on_sigint is running: a signal that comes meanwhile adds nothing
    "queued": [],  # requests queued behind a cell that failed with stop_on_error
    "exiting": False,  # shutdown is under way
    "leaving": False,  # shutdown's SIGINT came: SystemExit, now or at the end of the send under way
    "wakeup": -1,  # read end of the pipe that signals write to (signal.set_wakeup_fd)
    # Shaped for speed: for each socket the main thread waits on, a Poller of it and the wakeup
    # pipe, made once. zmq.select builds its poll list at each call, ORing flag enums into it:
    # 11.5 µs a wait, where the Poller takes 2.
    "pollers": {},
    "trace": False,  # --show-messages: log every message received and sent
    "terminal": sys.__stderr__,  # where log() writes: the stderr the kernel was started with
    "loop": None,  # the event loop that cells with a top-level await run on (see event_loop)
    "exit_code": 0,  # the process's, once serve() is done
    # In a forked child of the kernel: its own files on fds 1 and 2, by stream name (see
    # Output below Python).
    "forked": {},
}
user = types.ModuleType("__main__")  # the user's namespace: a fresh __main__, as at a Python prompt
me = sys.modules[__name__]  # this module; serve() also makes it sys.modules["minikernel"]


def log(line: str):
    "A line, or a traceback, on the kernel's own stderr (not the user's): what went wrong."
    with contextlib.suppress(OSError, ValueError):  # its terminal may be gone: keep going
        print(f"[minikernel] {line}", file=kernel["terminal"], flush=True)


def trace(arrow: str, channel: str, msg: dict):
    "--show-messages: a message received (<-) or sent (->), one line, as miniconsole shows it."
    if not kernel["trace"]:
        return
    try:  # ASCII JSON: a lone surrogate or any other text is safe on any terminal
        content = json.dumps(msg["content"], default=str)
    except (ValueError, RecursionError):  # a cycle, or nested deeper than we can print
        content = "<content not printable>"
    content = content if len(content) <= 80 else content[:77] + "..."
    buffers = f" +{len(msg['buffers'])} buffers" if msg.get("buffers") else ""
    log(f"{channel:>7} {arrow} {msg['header']['msg_type']:<20} {content}{buffers}")


# ==============================================================================================
# Part one: the protocol. Everything up to Part two is what a Jupyter kernel for any language
# needs, in the order a message lives: connection file, wire format, heartbeat, iopub, stdin,
# the shell handlers, signals (how an interrupt reaches running code), control, and comms.
# ==============================================================================================


################ Connection file: where a frontend finds the kernel

# A connection file is the whole address of a kernel: five ports, an ip, a transport, and the
# key that signs messages. Anyone who can read it can run code here, so it is written 0600.
#   {"shell_port": 53794, "iopub_port": 53795, "stdin_port": 53796, "control_port": 53797,
#    "hb_port": 53798, "ip": "127.0.0.1", "key": "a0436f6c-...", "transport": "tcp",
#    "signature_scheme": "hmac-sha256", "kernel_name": "minikernel"}

CHANNELS = {"shell": zmq.ROUTER, "iopub": zmq.XPUB, "stdin": zmq.ROUTER,
            "control": zmq.ROUTER, "hb": zmq.ROUTER}


def data_dir() -> str:
    "Jupyter's per-user data dir: kernelspecs live under it, and so does the runtime dir."
    if os.environ.get("JUPYTER_DATA_DIR"):
        return os.environ["JUPYTER_DATA_DIR"]
    if sys.platform == "darwin":
        return os.path.expanduser("~/Library/Jupyter")
    if os.name == "nt":
        return os.path.join(os.environ.get("APPDATA", os.path.expanduser("~")), "jupyter")
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(xdg, "jupyter")


def runtime_dir() -> str:
    "Where connection files go, so that `--existing` can find the newest one."
    return os.environ.get("JUPYTER_RUNTIME_DIR") or os.path.join(data_dir(), "runtime")


def new_connection(ip: str) -> dict:
    "A fresh connection: a random key; port 0 means 'pick a free one when binding'."
    return {**{f"{name}_port": 0 for name in CHANNELS}, "ip": ip, "key": str(uuid.uuid4()),
            "transport": "tcp", "signature_scheme": "hmac-sha256", "kernel_name": "minikernel"}


def bind_sockets(ctx: zmq.Context, conn: dict) -> dict:
    "Bind the five sockets where the connection says, filling in the tcp ports that were 0."
    sockets = {}
    for name, kind in CHANNELS.items():
        sock = sockets[name] = ctx.socket(kind)
        if kind == zmq.ROUTER:  # a frontend that reconnects with the same identity takes over
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if name == "stdin":  # read only while input() waits: hold one message, not a thousand
            sock.setsockopt(zmq.RCVHWM, 1)  # (set before bind, or connections keep the default)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # fail fast if nobody listens for input
        sock.ipv6 = ":" in conn["ip"]  # zmq takes an IPv6 address (::1) only when told
        port = conn[f"{name}_port"]
        if conn["transport"] == "ipc":
            sock.bind(f"ipc://{conn['ip']}-{port}")
        elif port:
            sock.bind(f"tcp://{conn['ip']}:{port}")
        else:
            conn[f"{name}_port"] = sock.bind_to_random_port(f"tcp://{conn['ip']}")
    sockets["iopub"].setsockopt(zmq.XPUB_VERBOSE, 1)  # hear every subscription, not just new topics
    sockets["iopub"].setsockopt(zmq.XPUB_NODROP, 1)  # wait for a slow frontend: see send_waiting
    return sockets


def write_connection_file(path: str, conn: dict):
    "Write the connection file, readable by its owner only (the key inside runs code here)."
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(conn, f, indent=2)
    os.chmod(path, 0o600)  # in case the file was there before, with looser permissions


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


################ Heartbeat: proof of life

# Frontends ping hb often (jupyter_client each second, miniconsole on every echo) and worry
# after a second or so of silence (jupyter_client: time_to_dead, 1 s; miniconsole: HB_SILENCE,
# 1.5 s).
# User code may hold the GIL for minutes (a long call into C that keeps it), so the echo must not
# need Python: zmq.proxy runs in C with the GIL released. A ROUTER proxied to itself sends
# each [identity, b"", ping] straight back to the frontend it came from.

def heartbeat(hb: zmq.Socket):
    "Echo every ping, in C, until the context ends."
    try:
        zmq.proxy(hb, hb)
    except zmq.ContextTerminated:
        hb.close()


################ iopub: every output, broadcast to every frontend

# Status comes from the main thread (for shell requests) and the control thread (for its own),
# output from any thread that prints, results from the main thread, welcomes from the ticker;
# but a zmq socket must not be used by two threads at once. The simplest correct owner is a
# lock: whoever holds iopub_lock may touch the iopub socket and the output buffer (but for
# Stream.write's queue of writes, which any thread may add to at any time). A ticker
# thread takes the lock every FLUSH_INTERVAL to welcome new subscribers and publish buffered
# output, so a long-running cell's prints arrive while it runs.
#
# A signal handler (in the main thread) or a finalizer (__del__, in whatever thread drops the
# last reference) can run while its thread holds the lock, halfway through a message. A plain
# Lock would deadlock it there; iopub_lock is re-entrant, so it gets in, and the one rule that
# keeps the frames whole is that a send never starts inside another. While a send is under
# way, a nested write only adds to its queue, and a nested message joins the queue that the
# send under way empties.

FLUSH_INTERVAL = 0.05  # seconds between the ticker's flushes of buffered output
FLUSH_SIZE = 1 << 16  # characters: a loop of prints becomes a few large stream messages
# A longer text goes out in pieces of PIECE_SIZE, so no message is huge. Shaped for speed too:
# the frontend decodes one piece while we encode the next, so a 10 MiB print arrives in two
# thirds of the time it takes as one message. Smaller pieces lose that to per-message costs.
PIECE_SIZE = 1 << 20  # characters
TRIM_AFTER = 1 << 22  # characters published, after which freed memory goes back to the OS
# Each run of one stream's text is a message. A loop writing to stdout and stderr in turn would
# make a message a write: thousands a flush, each shown as an output of its own, and more than a
# frontend reads in time (see send_waiting). So after MAX_RUNS turns in one flush, each stream's
# text joins its own last run: its order is kept, the turns between the two are not.
MAX_RUNS = 32
iopub_lock = threading.RLock()  # re-entrant, for a signal handler or __del__: see above
output = {"writes": deque(), "written": 0,  # [(name, text), ...] not yet in runs; their length
          "runs": [], "size": 0, "sent": 0,  # runs: [[name, [text, ...]], ...] in write order
          "queue": deque(), "sending": False,  # messages to send, and a send is under way
          "status": None}  # the latest status of a shell request: (content, parent)


def send_iopub(msg_type: str, content: dict, parent: Optional[dict] = None, topic: str = "",
               **extra):
    "Broadcast: [topic, <IDS|MSG>, signature, header, parent, metadata, content, buffers...]."
    session = kernel["session"]
    # extra: metadata, buffers, content_json (see to_frames)
    msg = {**new_msg(session, msg_type, content, parent), **extra}
    trace("->", "iopub", msg)
    topic = topic or f"kernel.{msg_type}"  # frontends subscribe to b"": every topic
    output["queue"].append(to_frames(session, msg, [topic.encode()]))
    if not output["sending"]:  # else the send under way in this thread sends it after its own
        with sending():
            pass  # the queue goes out as the send ends


class sending:
    "A send (lock held): nested sends only queue; at the end the queue goes out, in order."
    # The flag goes up and down inside uninterrupted's bracket, where no interrupt is raised.
    # Lowered outside it, an interrupt raised just as __exit__ began could skip that line, and
    # every later message would wait in the queue for good (seen on Python 3.10: see Signals).

    def __enter__(self):
        self.bracket = uninterrupted()
        self.bracket.__enter__()
        output["sending"] = True

    def __exit__(self, error, *rest):
        try:
            if error is None:
                send_queued()
        except BaseException as e:
            error = e  # on its way out: the bracket's end raises no interrupt over it
            raise
        finally:
            output["sending"] = False
            self.bracket.__exit__(error, *rest)


def send_queued():
    "Send what the queue holds, oldest first (inside sending())."
    iopub, queue = kernel["sockets"]["iopub"], output["queue"]
    while queue:
        frames = queue.popleft()
        if not iopub.closed:  # shutting down: late output from a thread has nowhere to go
            send_waiting(iopub, frames)


# zmq drops a message for a subscriber that has 1000 queued, an idle too, and a frontend that
# waits for that idle waits for ever. A loop of flushes or displays makes messages faster than a
# Python frontend reads them. So iopub does not drop (XPUB_NODROP): a send waits for room, as a
# write to a full pipe waits for its reader (with the lock held: every message keeps its place).
# Room comes back in batches, once a reader has taken about 500 messages: half a second apart
# for jupyter_client here, and up to three on a loaded machine. A message that finds no room
# for SEND_PATIENCE (a frontend stopped, gone without a goodbye, or that far behind) is sent
# the lossy way, zmq's default: the full queue drops it, and zmq then leaves that queue out,
# dropping for it, until its reader has taken those 500. By then every frontend that reads
# steadily has caught up, so only one that far behind loses anything.
SEND_PATIENCE = 5.0  # seconds
FIRST_FRAME = int(zmq.SNDMORE | zmq.NOBLOCK)  # an int: see send_frames


def send_waiting(iopub: zmq.Socket, frames: list):
    "Send an iopub message, waiting while a frontend catches up, but not for one that is stuck."
    deadline = time.monotonic() + SEND_PATIENCE
    while not kernel["exiting"] and time.monotonic() < deadline:  # leaving: no time to wait
        try:
            iopub.send(frames[0], FIRST_FRAME)  # zmq refuses a message at its first frame or never
            send_frames(iopub, frames[1:])
            return
        except zmq.Again:  # a frontend's queue is full
            time.sleep(0.002)
    iopub.setsockopt(zmq.XPUB_NODROP, 0)
    send_frames(iopub, frames)
    iopub.setsockopt(zmq.XPUB_NODROP, 1)


def flush_output():
    "Publish buffered stdout/stderr as stream messages, in the order written (lock held)."
    if output["sending"]:  # nested in a send (see iopub_lock): the text waits in the buffer
        return
    read_fds()  # the prints, then what C code or a subprocess wrote before now, go out now too
    if not output["runs"]:  # shaped for speed: most flushes (one before each message) find
        return  # nothing, and outside a send the queue is empty too (see send_iopub)
    with sending():
        runs, output["runs"], output["size"] = output["runs"], [], 0
        for name, texts in runs:
            text = "".join(texts)
            output["sent"] += len(text)
            for i in range(0, len(text), PIECE_SIZE):
                piece = text[i : i + PIECE_SIZE]
                send_iopub("stream", {"name": name, "text": piece}, kernel["cell"],
                           content_json=stream_json(name, piece))
                send_queued()  # each piece as it is made: a huge print never holds all its frames


# Shaped for speed: output is the bulk of what a kernel sends, and the standard library's JSON
# encoder looks at text a character at a time, about 3 ms a MiB here. Most output is ASCII lines
# with nothing to escape but the newline. For those (16 characters a line or more on average,
# the newline counted), bytes methods that each run over the whole text in C make the same
# JSON. Measured against the standard way, on the same text, as the machine varies: a short
# print in 40% of its time; lines of 16 characters in 90% to 55%, of 40 and more in 75% to 45%;
# a long text with no newline in 25% to 40%.
# Text it turns down costs up to 30% more than the standard way alone, so the cheap tests
# (shorter lines, a quote, a backslash) come before the costlier one (any other control
# character). That one is a translate, which looks at each byte, for a short text. For a long
# one, 31 searches at memchr speed take 40% to 70% of its time (64 KiB and more, measured
# here; the two break even near 16 KiB).
CONTROL = bytes(c for c in range(32) if c != 10)  # the control characters, but newline
CONTROL_BYTES = [bytes([c]) for c in CONTROL]


def stream_json(name: str, text: str) -> Optional[bytes]:
    "A stream message's content as JSON, if its text is plain ASCII lines; else None."
    if (name not in ("stdout", "stderr") or not text.isascii()  # isascii: a flag, no scan
            or 16 * text.count("\n") > len(text) or '"' in text or "\\" in text):
        return None
    raw = text.encode()
    if (any(c in raw for c in CONTROL_BYTES) if len(raw) > 1 << 14
            else len(raw.translate(None, CONTROL)) < len(raw)):
        return None
    # join, not %: the same for a short text, ten times quicker for a piece of 1 MiB
    return b"".join((b'{"name": "', name.encode(), b'", "text": "', raw.replace(b"\n", b"\\n"),
                     b'"}'))


def give_back_memory():
    "After megabytes of output, hand the memory they took back to the OS."
    # A big print's text, its pieces' JSON and their frames are all freed once sent, but glibc
    # keeps freed heap for reuse, up to twice the largest block it has seen: a 10 MiB print
    # would leave the kernel 14 MiB bigger for good. malloc_trim returns it.
    with iopub_lock:
        output["sent"] = 0
    with contextlib.suppress(ImportError, OSError, AttributeError):  # not glibc: nothing to do
        import ctypes  # here, not at the top: only a kernel that printed megabytes needs it
        ctypes.CDLL(None).malloc_trim(0)


def publish(msg_type: str, content: dict, parent: Optional[dict] = None, **extra):
    "Broadcast a message, after any output printed before it, so frontends see them in order."
    with iopub_lock:
        flush_output()
        send_iopub(msg_type, content, parent, **extra)


def status(state: str, parent: Optional[dict] = None, channel: str = "shell"):
    "Tell every frontend what the kernel is doing: starting, busy or idle (with whose request)."
    with iopub_lock:
        publish("status", {"execution_state": state}, parent)
        if parent and channel == "shell":  # told again to each new subscriber (iopub_ticker):
            output["status"] = ({"execution_state": state}, parent)  # shell's, not control's


def iopub_ticker(iopub: zmq.Socket):
    "Every FLUSH_INTERVAL: greet new subscribers with iopub_welcome, publish buffered output."
    while True:
        time.sleep(FLUSH_INTERVAL)
        with iopub_lock:
            if iopub.closed:
                return
            welcomed = False
            while iopub.poll(0):
                event = iopub.recv()  # b"\x01" + topic: a frontend subscribed; b"\x00": it left
                if event[:1] == b"\x01":  # XPUB_VERBOSE: every subscription, even a repeat
                    topic = event[1:].decode(errors="replace")
                    # Published on that topic, so zmq's prefix matching hands it to everyone
                    # subscribed to a prefix of it. The welcome for b"", a prefix of every
                    # topic, goes out on kernel.iopub_welcome and reaches every frontend.
                    send_iopub("iopub_welcome", {"subscription": topic}, topic=topic)
                    welcomed = True
            # Then the latest status, once more: jupyter console sends its first cell without
            # waiting for the welcome, and if its subscription came after that cell's idle, it
            # would wait for that idle for ever.
            if welcomed and output["status"]:
                send_iopub("status", *output["status"])
            flush_output()


def hushed() -> bool:
    "Is this a silent execute_request's code, whose output is dropped? Other threads' is not."
    return kernel["silent"] and threading.current_thread() is threading.main_thread()


class Stream(io.TextIOBase):
    "sys.stdout or sys.stderr: text is buffered, then published on iopub as stream messages."

    encoding = "utf-8"

    def __init__(self, name: str, fd: int):
        self.name, self.fd = name, fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd  # what is written to it there arrives too: see Output below Python

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if hushed():
            return len(text)
        if kernel["forked"]:  # a child's write to the Stream it inherited (a logging handler's)
            return kernel["forked"][self.name].write(text)  # goes to its fd, which we read
        # Shaped for speed: a print loop writes hundreds of thousands of times, and taking the
        # lock to sort each write into its run was a third of the kernel's work for it. One
        # append to a deque is atomic, so a write takes the lock only once in 1,000 writes, or
        # when FLUSH_SIZE characters wait.
        output["writes"].append((self.name, text))
        output["written"] += len(text)  # two threads at once may lose a count: it is a hint
        if len(output["writes"]) >= 1000 or output["written"] >= FLUSH_SIZE:
            with iopub_lock:
                gather_writes()
                if output["size"] >= FLUSH_SIZE:
                    flush_output()
        return len(text)

    def flush(self):
        if kernel["forked"]:
            kernel["forked"][self.name].flush()
        with iopub_lock:
            flush_output()


def gather_writes():
    "Sort the writes that Stream.write queued into runs, in the order written (lock held)."
    writes = output["writes"]
    if output["sending"] or not writes:  # nested in a send or a gather: the writes wait
        return
    with sending():  # so a nested write only queues, and an interrupt waits for the end
        output["written"] = 0
        # Popped in one C call, in which no signal handler runs: a user's handler that raises
        # (an alarm's timeout) would lose up to a thousand writes popped halfway. It can still
        # cut the few steps of sorting short, as it can a flush.
        batch = list(map(deque.popleft, itertools.repeat(writes, len(writes))))  # [(name, text)]
        for name, group in itertools.groupby(batch, key=operator.itemgetter(0)):
            buffer_output(name, "".join(map(operator.itemgetter(1), group)))


def buffer_output(name: str, text: str):
    "Add text to the output buffer, to be published on the next flush (lock held)."
    runs = output["runs"]
    if runs and runs[-1][0] == name:
        texts = runs[-1][1]
    elif len(runs) < MAX_RUNS:  # stdout and stderr interleave in the order they were written
        texts = []
        runs.append([name, texts])
    else:  # runs alternate between the two streams: the one before the last is this one's
        texts = runs[-2][1]
    texts.append(text)
    # A print loop: keep one string, not thousands of small ones that scatter over the
    # allocator's arenas.
    if len(texts) >= 1000:
        texts[:] = ["".join(texts)]
    output["size"] += len(text)


################ stdin: input() answered by a frontend

# The kernel has no keyboard. When user code calls input(), the kernel sends input_request on
# stdin to the frontend that sent the running execute_request (its stdin DEALER shares its
# shell identity, so the same routing ids reach it), and waits for that frontend's input_reply.

class StdinNotImplementedError(NotImplementedError):
    "input() was called, but the frontend that ran this cell cannot answer input requests."


def input_request(prompt: str = "", password: bool = False) -> str:
    "Ask the frontend running this cell for one line: input_request out, input_reply back."
    parent, stdin, session = kernel["parent"], kernel["sockets"]["stdin"], kernel["session"]
    if not parent["content"].get("allow_stdin", True):
        raise StdinNotImplementedError(
            "input() needs a frontend that answers input requests; this one said allow_stdin=False")
    sys.stdout.flush()  # the prompt must come after what the cell printed before it
    for frames in drain(stdin):  # replies to earlier, interrupted requests are stale now
        try:
            from_frames(session, frames)
        except ValueError as e:  # a forged or malformed one is logged, as on any channel
            log(f"stdin: dropped a message: {e}")
    msg = new_msg(session, "input_request", {"prompt": prompt, "password": password},
                  parent["header"])
    trace("->", "stdin", msg)
    try:
        with uninterrupted():
            send_frames(stdin, to_frames(session, msg, parent["ids"]))
    except zmq.ZMQError:  # ROUTER_MANDATORY: that frontend has no stdin socket connected
        raise StdinNotImplementedError("input(): no frontend is listening on stdin") from None
    while True:
        try:
            reply = from_frames(session, recv_interruptibly(stdin))  # Ctrl-C raises here
        except ValueError as e:
            log(f"stdin: dropped a message: {e}")
            continue
        except KeyboardInterrupt:  # raised in pyzmq's poll: the user's traceback ends at input()
            raise KeyboardInterrupt from None
        trace("<-", "stdin", reply)
        if reply["header"]["msg_type"] != "input_reply":
            continue
        if reply["parent_header"].get("msg_id", msg["header"]["msg_id"]) == msg["header"]["msg_id"]:
            break  # ours, or one without a parent (jupyter_client sends none): take it
        log("stdin: dropped a stale input_reply, to an earlier input_request")
    value = reply["content"].get("value", "")
    if value == "\x04":  # Ctrl-D at the frontend's prompt
        raise EOFError("EOF from the frontend")
    return value


def user_input(prompt: object = "") -> str:
    "builtins.input, for user code: the line comes from a frontend."
    try:
        return input_request(str(prompt))
    except KeyboardInterrupt:
        if at_pdb_prompt():  # Python's debugger would only prompt again (see Part two)
            raise LeaveDebugger from None
        raise


def user_getpass(prompt: str = "Password: ", stream=None) -> str:
    "getpass.getpass, for user code: the frontend hides what is typed."
    return input_request(prompt, password=True)


################ Shell handlers: one request in, one reply out

# Each handler takes a request and returns its reply's content, built right there; dispatch()
# sends it as <name>_reply. A handler that returns None sends no reply (comm messages). The
# table below holds the protocol's own requests; the comms section and Part two (the language:
# completion, help, is_complete) add theirs to it. A *_request nobody handles still gets a
# reply, an error; a message that fails the signature check gets none: senders must time out.

LANGUAGE_INFO = {"name": "python", "version": sys.version.split()[0], "mimetype": "text/x-python",
                 "file_extension": ".py", "pygments_lexer": "python3",
                 "codemirror_mode": {"name": "ipython", "version": 3},
                 "nbconvert_exporter": "python"}
BANNER = (f"minikernel {__version__} on Python {LANGUAGE_INFO['version']}: a kernel in one file.\n"
          "Magics: %connect_info, %console, %debug, %matplotlib inline; obj? and obj?? for help;"
          " !cmd for the shell.")
DISPLAY_NAME = "Python 3"  # the launcher and kernel menu show "Python 3 (minikernel)"


def execute_request(msg: dict) -> dict:
    "Run a cell: execute_input, then its outputs on iopub, then this reply."
    c = msg["content"]
    code, silent = c.get("code"), bool(c.get("silent", False))
    expressions = c.get("user_expressions") or {}
    if not isinstance(code, str) or not isinstance(expressions, dict):  # nothing runs
        kernel["starting"] = False
        return execute_reply("error", ename="TypeError", traceback=[], evalue=(
            "execute_request needs code as a string and user_expressions as an object"))
    blank = code == "" or code.isspace()  # nothing to run: not counted, as in IPython
    store = c.get("store_history", True) and not silent and not blank
    n = kernel["execution_count"]
    if not silent:
        kernel["cell"] = msg["header"]
        publish("execute_input", {"code": code, "execution_count": n}, msg["header"])
    kernel["payload"], kernel["silent"] = [], silent
    try:
        error, result = run_cell(code, f"<Cell In[{n}]>", silent)  # <...>: a source, no file
        # Then the frontend's own expressions, hushed as its cell was (their reprs may fail).
        values = {} if error else {k: user_expression(v) for k, v in expressions.items()}
    finally:
        with iopub_lock:
            read_fds()  # while still silent: what it wrote to fds 1 and 2 is dropped too
        kernel["silent"] = False
    if store:
        kernel["history"].append((n, code, result))  # a deque: the oldest cell falls out
        kernel["execution_count"] += 1
        import linecache  # run_cell imported it; this only names it here
        linecache.cache.pop(f"<Cell In[{n - CELLS_KEPT}]>", None)  # its lines go too
    if error:
        # Requests sent before the error was known are taken now, before the reply goes.
        if c.get("stop_on_error", True) and not silent:
            kernel["queued"] = drain(kernel["sockets"]["shell"])
        return execute_reply("error", kernel["payload"], **error)
    return execute_reply("ok", kernel["payload"], values)


def execute_reply(status: str, payload: Sequence = (), expressions: Optional[dict] = None,
                  **error) -> dict:
    "An execute_reply with every field, whatever the status (the count: this cell's, or the last)."
    return {"status": status, "execution_count": kernel["execution_count"] - 1,
            "payload": list(payload), "user_expressions": expressions or {}, **error}


def user_expression(expr: str) -> dict:
    "Evaluate one of an execute_request's user_expressions, for the frontend's own use."
    try:
        data, metadata = mimebundle(eval(expr, user.__dict__))
        return {"status": "ok", "data": data, "metadata": metadata}
    except BaseException as e:  # not kept for %debug: it is the frontend's code, not the user's
        if kernel["exiting"]:
            raise
        return {"status": "error", **error_content(e)}


def drain(sock: zmq.Socket) -> list:
    "Every message waiting on a socket right now."
    frames = []
    while sock.poll(0):
        frames.append(sock.recv_multipart())
    return frames


def aborted_execute(msg: dict) -> dict:
    "An execute_request queued behind a failed cell is not run (stop_on_error)."
    return execute_reply("aborted")


def kernel_info_request(msg: dict) -> dict:
    "Who answers: protocol version, implementation, and the language it runs."
    return {"status": "ok", "protocol_version": PROTOCOL_VERSION, "implementation": "minikernel",
            "implementation_version": __version__, "language_info": LANGUAGE_INFO,
            "banner": BANNER, "debugger": False, "supported_features": [],
            "help_links": [{"text": "Python", "url": "https://docs.python.org/3/"}]}


def history_request(msg: dict) -> dict:
    "This session's inputs: the last n (tail), a range of lines, or those matching a glob."
    import fnmatch
    c, rows = msg["content"], list(kernel["history"])
    kind = c.get("hist_access_type")
    if kind == "tail":
        rows = rows[-c["n"]:] if c.get("n") else rows
    elif kind == "range":
        if c.get("session", 0) not in (0, 1):  # 0 or 1: this session, the only one (entries: 1)
            rows = []
        start, stop = c.get("start") or 1, c.get("stop")
        rows = [r for r in rows if start <= r[0] and (stop is None or r[0] < stop)]
    elif kind == "search":
        rows = [r for r in rows if fnmatch.fnmatchcase(r[1], c.get("pattern") or "*")]
        if c.get("unique"):  # the latest run of each distinct input
            latest = {r[1]: r for r in rows}
            rows = sorted(latest.values())
        rows = rows[-c["n"]:] if c.get("n") else rows
    else:
        raise ValueError(f"hist_access_type must be tail, range or search, not {kind!r}")
    entries = [[1, n, [code, out] if c.get("output") else code] for n, code, out in rows]
    return {"status": "ok", "history": entries}


def connect_request(msg: dict) -> dict:
    "Where the kernel listens (deprecated in the spec, still answered): its five ports."
    return {"status": "ok", **{f"{name}_port": kernel["connection"][f"{name}_port"]
                               for name in CHANNELS}}


SHELL_HANDLERS = {
    "execute_request": execute_request,
    "kernel_info_request": kernel_info_request,
    "history_request": history_request,
    "connect_request": connect_request,
}


def dispatch(channel: str, sock: zmq.Socket, frames: list, handlers: dict):
    "Check a request, bracket it with busy and idle on iopub, run its handler, send its reply."
    session = kernel["session"]
    try:
        msg = from_frames(session, frames)
    except ValueError as e:  # unsigned, forged, replayed or malformed: never acted upon
        log(f"{channel}: dropped a message: {e}")
        return
    trace("<-", channel, msg)
    msg_type, header = msg["header"]["msg_type"], msg["header"]
    reply_type = msg_type[: -len("request")] + "reply" if msg_type.endswith("_request") else ""

    def answer(content: dict) -> list:  # [ids..., <IDS|MSG>, ...], routed back to the asker
        with iopub_lock:  # the output first: a frontend may take the reply to mean "all done"
            flush_output()
        reply = new_msg(session, reply_type, content, header)
        trace("->", channel, reply)
        return to_frames(session, reply, msg["ids"])

    if channel == "shell":
        kernel["parent"] = msg
        if handlers.get(msg_type) is not execute_request:  # an interrupt is for a cell, and
            kernel["interrupted"] = kernel["starting"] = False  # no cell runs here
    status("busy", header, channel)
    reply = None
    try:
        if msg_type not in handlers and reply_type:  # a client waits: tell it, don't log it
            reply = answer({"status": "error", "ename": "NotImplementedError", "traceback": [],
                            "evalue": f"{msg_type} is not supported by minikernel on {channel}"})
        elif msg_type not in handlers:
            log(f"{channel}: unknown msg_type {msg_type!r}, ignored")
        elif (content := handlers[msg_type](msg)) is not None and reply_type:
            reply = answer(content)  # serialized here: a reply that cannot be is an error too
    except BaseException as e:  # signed, but nonsense, or user code's sys.exit(): say so, serve on
        if kernel["exiting"]:  # this SystemExit is ours: the kernel is shutting down
            raise
        log(f"{channel}: {msg_type} failed: {type(e).__name__}: {e}")
        error = {"status": "error", "ename": type(e).__name__, "evalue": str(e), "traceback": []}
        reply = answer(error) if reply_type else None
    if reply:
        with uninterrupted():  # in the main thread, a whole reply or none
            send_frames(sock, reply)
    if output["sent"] > TRIM_AFTER:  # after the reply, before idle: idle means all done
        give_back_memory()
    status("idle", header, channel)


def serve_shell(shell: zmq.Socket):
    "The main thread: take shell requests one at a time, in order, and run them."
    aborting = {**SHELL_HANDLERS, "execute_request": aborted_execute}  # (stop_on_error)
    while True:
        if signal.getsignal(signal.SIGINT) is not on_sigint:  # a cell (or a library) took it:
            signal.signal(signal.SIGINT, on_sigint)  # ours again, before the kernel waits
        frames = recv_interruptibly(shell)  # sets "starting"
        dispatch("shell", shell, frames, SHELL_HANDLERS)
        kernel["starting"] = False  # (a cell clears it as it starts; a dropped message, here)
        queued, kernel["queued"] = kernel["queued"], []
        for frames in queued:  # behind a failed cell: each execute_request is answered
            # 'aborted' and runs nothing; other requests and comm messages are handled as usual
            dispatch("shell", shell, frames, aborting)


################ Signals: how an interrupt reaches the running code

# The protocol's part is short: interrupt_request arrives on control, the kernel answers with
# interrupt_reply, and the running cell ends with KeyboardInterrupt. Getting there is signal
# work. The control thread sends SIGINT to the main thread (pthread_kill), because Python runs
# signal handlers in the main thread only, and a signal wakes it from time.sleep, input() or a
# socket wait. A signal is never missed (the wakeup pipe), never splits a message (it waits
# while one is being sent), and one that Python sat on is sent again.
# Where a handler runs differs by version: Python 3.11 and later run it at calls and at loops'
# jumps back, 3.9 and 3.10 between almost any two bytecodes. So where a finally clears a flag
# that lets on_sigint raise (kernel["running"]), the flag is set inside the try: set just
# before it, an interrupt in between would leave it set, and the next SIGINT, idle, would
# end the kernel.

# How many SIGINTs the main thread has taken (see interrupt_request). A count, not an Event:
# Event.set takes a lock, and a second SIGINT whose handler ran inside the first one's set
# would wait for that lock for good, or nest deeper with every signal of a storm.
sigints = {"taken": 0}


def on_sigint(signum, frame):
    "SIGINT: KeyboardInterrupt in running user code, nothing when idle, SystemExit at shutdown."
    # A handler is Python code, so the next signal can run it again from inside itself (at a
    # call, such as shell.poll); in a storm that nested without end. The one running speaks
    # for all.
    if kernel["in_sigint"]:
        return
    kernel["in_sigint"] = True
    try:
        sigints["taken"] += 1
        if kernel["exiting"]:
            kernel["leaving"] = True
        else:
            # Not in user code, it is for the request being started, or for one already waiting
            # on shell (an interrupt_request sent right after its execute_request can overtake
            # it), or for nothing: it came after its cell ended. The main thread owns shell.
            kernel["interrupted"] = (kernel["running"] or kernel["starting"]
                                     or bool(kernel["sockets"]["shell"].poll(0)))
        if not kernel["sending"]:
            interrupt_now()
    finally:
        kernel["in_sigint"] = False


def interrupt_now():
    "Raise what waits: SystemExit to leave; an interrupt if user code runs (idle, it is forgotten)."
    if kernel["leaving"]:
        kernel["leaving"] = False  # once: the cleanup that follows sends too
        raise SystemExit(0)
    if kernel["interrupted"] and kernel["running"]:
        kernel["interrupted"] = False
        raise KeyboardInterrupt


class uninterrupted:
    "In the main thread, an interrupt that comes inside waits until the end."
    # Raised between two frames, it would leave half a message; raised while output taken
    # from the buffer is being sent, it would drop the rest of it. Shaped for speed: every
    # message is sent inside one, and a class costs less than half what a @contextmanager does.

    def __enter__(self):
        # Signals reach the main thread only; inside one already, the outer one raises them.
        self.outer = not kernel["sending"] and threading.current_thread() is threading.main_thread()
        if self.outer:
            kernel["sending"] = True  # from here on_sigint raises nothing

    def __exit__(self, error, *_):
        if self.outer:
            kernel["sending"] = False
            if error is None:  # (one already on its way out goes first)
                interrupt_now()


SNDMORE = int(zmq.SNDMORE)


def send_frames(sock: zmq.Socket, frames: list):
    "sock.send_multipart(frames), shaped for speed: it ORs flag enums, 2 µs a frame; ints don't."
    for frame in frames[:-1]:
        sock.send(frame, SNDMORE)
    sock.send(frames[-1])


def recv_interruptibly(sock: zmq.Socket) -> list:
    "Wait for a message in the main thread, waking for any signal so its handler runs at once."
    # A signal that lands just before a blocking recv would go unnoticed until the next
    # message. So every signal also writes a byte to the wakeup pipe, and we wait on both.
    poller = kernel["pollers"][sock]
    while True:
        ready = dict(poller.poll())  # {socket or fd: events}
        if kernel["wakeup"] in ready:
            os.read(kernel["wakeup"], 64)  # back in Python now: the handler runs, may raise
        if sock in ready:
            # A request is here, still on the socket, so on_sigint sees it: an interrupt from
            # now on is for it.
            if sock is kernel["sockets"]["shell"]:
                kernel["starting"] = True
            return sock.recv_multipart()


def interrupt_request(msg: dict) -> dict:
    "Raise KeyboardInterrupt in the running cell, as Ctrl-C would; harmless when idle."
    # Python runs signal handlers only at certain points between bytecodes. A signal that
    # lands after the last one before a blocking call (time.sleep, a lock) is seen only when
    # the call returns; if the main thread was waiting for the GIL there, that window lasts
    # as long as the wait. So a signal not taken within 0.1 s is sent again: it interrupts
    # the call. Only on_sigint counts what it takes: a cell that set a handler of its own gets
    # one signal, as from one Ctrl-C.
    for _ in range(2):
        before, deadline = sigints["taken"], time.monotonic() + 0.1
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        while sigints["taken"] == before and time.monotonic() < deadline:
            time.sleep(0.002)
        if sigints["taken"] != before or signal.getsignal(signal.SIGINT) is not on_sigint:
            break
    return {"status": "ok"}


################ Control: shutdown and interrupt, even while a cell runs

# Control has its own socket and its own thread, so a frontend can stop or interrupt a kernel
# whose main thread is busy. Both act on the main thread through SIGINT (see Signals): to
# leave, the main thread is made to unwind from wherever it is, with SystemExit.


def leave():
    "Shut down from any thread: the main thread unwinds, cleans up and exits; after 1 s, force it."
    kernel["exiting"] = True
    force_exit_soon()
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def force_exit_soon():
    "Exit within 1 s even if user code swallows SystemExit, or its threads or atexit handlers hang."
    timer = threading.Timer(1.0, force_exit)
    timer.daemon = True  # a non-daemon timer would itself hold up the exit it is there to force
    timer.start()


def exit_without_teardown():
    "The last atexit handler: flush every file still open, then exit without the teardown."
    # A normal exit then clears every module and collects every object: 20 ms or more, most
    # of the time a shutdown takes. What a script relies on at exit is done by now: the atexit
    # handlers have run, and every open file is flushed here. (Python does not promise that
    # __del__ methods run at exit; here they do not.)
    import gc
    # Not the ABC io.IOBase: an isinstance() of it costs ten times more, on every object.
    buffered = (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom)
    for obj in gc.get_objects():
        if isinstance(obj, buffered):
            with contextlib.suppress(Exception):  # closed, detached, or its disk is gone
                obj.flush()
    os._exit(kernel["exit_code"])


def force_exit():
    "Exit now, tidying only the connection file."
    remove_connection_file()
    os._exit(kernel["exit_code"])


def shutdown_request(msg: dict) -> dict:
    "Agree to shut down. To restart, the frontend's manager starts a new process after this one."
    kernel["exiting"] = True
    return {"status": "ok", "restart": bool(msg["content"].get("restart", False))}


CONTROL_HANDLERS = {
    "shutdown_request": shutdown_request,
    "interrupt_request": interrupt_request,
    "kernel_info_request": kernel_info_request,  # 5.5: is it alive, even while shell is busy?
}


def serve_control(control: zmq.Socket):
    "The control thread: answer control requests until one of them is a shutdown."
    try:
        while not kernel["exiting"]:
            dispatch("control", control, control.recv_multipart(), CONTROL_HANDLERS)
    except zmq.ContextTerminated:  # the main thread is already shutting down
        control.close()
        return
    control.close()  # its linger still delivers the shutdown_reply
    leave()


def watch_parent(parent: int):
    "Leave when the process that launched us is gone (jupyter_client sets JPY_PARENT_PID)."
    while os.getppid() == parent:
        time.sleep(1)
    log("the process that started this kernel died: shutting down")  # not a routine exit
    leave()


################ Comms: an object in the kernel and one in a frontend, talking

# A comm pairs an object here with one in a frontend: an ipywidgets slider and its view, say.
# Either side opens it, naming a target; then both send comm_msg, and either closes it. The
# kernel's comm messages go out on iopub, so every frontend hears them; a frontend's come in
# on shell, one at a time between cells. Binary data, an image or an array, travels as
# buffers: raw frames after the four dicts, outside the signature.
#   comm_open  {comm_id, target_name, data}   comm_msg {comm_id, data}   comm_close {comm_id, data}
# This module is the comm package's "comm manager": the `comm` hook (see Optional
# integrations) hands it to comm users, who call register_target() and create Comms.

comms = {}  # comm_id -> Comm: the open comms, whichever side opened them
targets = {}  # target_name -> handler(comm, comm_open msg), for comms a frontend opens


class Comm:
    "Our end of a comm: send() and close() it; on_msg and on_close hear from the other end."

    kernel = me  # ipywidgets' Output widget asks comm.kernel.get_parent() for the request

    def __init__(self, target_name: str = "comm", data: Optional[dict] = None,
                 metadata: Optional[dict] = None, buffers: Sequence = (),
                 comm_id: Optional[str] = None, primary: bool = True,
                 target_module: Optional[str] = None):
        self.comm_id, self.target_name = comm_id or uuid.uuid4().hex, target_name
        self.msg_callback = self.close_callback = None
        self.closed = False
        comms[self.comm_id] = self
        if primary:  # opened here, not by a frontend: tell the frontends
            self.open(data, metadata, buffers, target_module)

    def publish(self, msg_type: str, data, metadata, buffers, **fields):
        "A comm message on iopub, from the request being handled now; buffers as raw frames."
        publish(msg_type, {"comm_id": self.comm_id, "data": data or {}, **fields},
                kernel["parent"]["header"], metadata=metadata or {}, buffers=list(buffers or ()))

    def open(self, data=None, metadata=None, buffers=(), target_module=None):
        self.publish("comm_open", data, metadata, buffers, target_name=self.target_name,
                     target_module=target_module)

    def send(self, data=None, metadata=None, buffers=()):
        self.publish("comm_msg", data, metadata, buffers)

    def close(self, data=None, metadata=None, buffers=()):
        if not self.closed:  # once, as the comm package's Comm does: a second close sends nothing
            self.closed = True
            comms.pop(self.comm_id, None)
            self.publish("comm_close", data, metadata, buffers)

    def on_msg(self, callback):
        self.msg_callback = callback

    def on_close(self, callback):
        self.close_callback = callback

    def handle_msg(self, msg: dict):
        if self.msg_callback:
            self.msg_callback(msg)

    def handle_close(self, msg: dict):
        if self.close_callback:
            self.close_callback(msg)


def register_target(target_name: str, handler):
    "Call handler(comm, msg) when a frontend opens a comm to target_name."
    targets[target_name] = handler


def get_parent() -> dict:
    "The request being handled, as ipykernel's kernel.get_parent() gives it."
    return kernel["parent"]


def comm_callback(f, *args) -> bool:
    "Run a comm callback like a cell: interruptible; if it raises, show where and say so."
    msg = args[-1]  # the message comes last
    # Its buffers as memoryviews, as ipykernel gives them: ipywidgets calls .tobytes() on them.
    msg["buffers"] = [memoryview(b) for b in msg["buffers"]]
    cell = output_belongs_to(msg["header"])  # an Output widget captures it by that msg_id
    try:
        kernel["running"] = True  # inside the try: see Signals
        f(*args)
        return True
    except BaseException as e:  # sys.exit() too: as in a cell, it ends the callback, not the kernel
        kernel["running"] = False  # at once, as in run_cell: a second Ctrl-C must not break this
        if kernel["exiting"]:
            raise
        show_error(e, f"{msg['header']['msg_type']} callback failed")
        return False
    finally:
        kernel["running"] = False
        output_belongs_to(cell)  # a thread of that cell prints there again


def output_belongs_to(header: dict) -> dict:
    "Send output from now on with this parent (what was printed before goes first); the old one."
    with iopub_lock:
        flush_output()
        old, kernel["cell"] = kernel["cell"], header
    return old


def show_error(e: BaseException, what: str):
    "An error outside a cell: its traceback on our log, and to where output goes now."
    error = error_content(e)
    log(f"{what}:\n" + "\n".join(error["traceback"]))
    publish("error", error, kernel["cell"])


def comm_info_request(msg: dict) -> dict:
    "Which comms are open, and their targets: all, or those of the target_name asked for."
    wanted = msg["content"].get("target_name")
    return {"status": "ok", "comms": {comm_id: {"target_name": comm.target_name}
                                      for comm_id, comm in comms.items()
                                      if wanted in (None, comm.target_name)}}


def comm_open(msg: dict):
    "A frontend opens a comm: our end goes to its target's handler; no such target, we close it."
    c = msg["content"]
    handler = targets.get(c["target_name"])
    if handler is None:  # closed at once, so that the frontend does not wait
        log(f"comm_open: no comm target {c['target_name']!r}, comm {c['comm_id']!r} closed")
        publish("comm_close", {"comm_id": c["comm_id"], "data": {}}, msg["header"])
        return
    comm = Comm(c["target_name"], comm_id=c["comm_id"], primary=False)
    if not comm_callback(handler, comm, msg):
        comm.close()


def comm_msg(msg: dict):
    "Data for one of our comms: its on_msg callback gets the whole message, buffers included."
    if comm := known_comm(msg):
        comm_callback(comm.handle_msg, msg)


def comm_close(msg: dict):
    "A frontend closed a comm: forget it, and tell its on_close callback."
    if comm := known_comm(msg):
        comm.closed = True
        del comms[comm.comm_id]
        comm_callback(comm.handle_close, msg)


def known_comm(msg: dict) -> Optional[Comm]:
    "The comm a message is for; an unknown comm_id is logged, and the message dropped."
    comm_id = msg["content"]["comm_id"]
    if comm_id not in comms:
        log(f"{msg['header']['msg_type']} for unknown comm_id {comm_id!r}: dropped")
    return comms.get(comm_id)


SHELL_HANDLERS.update({  # the comm messages and their one request
    "comm_info_request": comm_info_request,
    "comm_open": comm_open,
    "comm_msg": comm_msg,
    "comm_close": comm_close,
})


# ==============================================================================================
# Part two: Python. What makes this kernel a Python worth using: cells that behave as at the
# Python prompt (and as in IPython), rich reprs, completion and help, magics, plots and widgets
# when they are imported, and the output of C code and child processes. A kernel for another
# language replaces this part (see the README: "Make it a kernel for another language").
# ==============================================================================================


################ Running a cell: REPL semantics

# A cell runs like input at the Python prompt: its statements run in the user's namespace, and
# if the last one is an expression, its value is shown (execute_result) and kept as `_` (not
# over a `_` of the user's own); a `;` after it hides it, as in IPython. A cell pasted with all
# its lines indented runs dedented.
# A line that starts a statement may be IPython's syntax: `%magic args`, `obj?` (help), `!cmd`
# (the shell) or a bare `exit`. Each becomes a Python call, line for line, so tracebacks still
# point at the right line. Only the tokenizer knows where a statement starts (never inside a
# string, open brackets or after a backslash), so it reads the cell one line at a time, and each
# line is rewritten, if it starts a statement, just before the tokenizer reads it.

SPECIAL = [  # a line that starts a statement -> the Python call it means
    (re.compile(r"(\s*)%(%?\w+)(.*)"), lambda m: f"{m[1]}__magic__({m[2]!r}, {m[3].strip()!r})"),
    (re.compile(r"(\s*)!(.*)"), lambda m: f"{m[1]}__magic__('system', {m[2].strip()!r})"),
    (re.compile(r"(\s*)([A-Za-z_][\w.]*)(\?\??)\s*"),  # obj?  obj??
     lambda m: f"{m[1]}__magic__({'pinfo2' if m[3] == '??' else 'pinfo'!r}, {m[2]!r})"),
    (re.compile(r"(\s*)(exit|quit)\s*"), lambda m: f"{m[1]}{m[2]}()"),
]


PLAIN_ESCAPES = re.compile(r"[%!?;]|\b(exit|quit)\b")  # a cell without these is plain Python


def rewrite(line: str) -> str:
    "A line that starts a statement, with IPython's syntax in it made a Python call."
    body = line.rstrip("\r\n")
    for pattern, call in SPECIAL:
        if m := pattern.fullmatch(body):
            return call(m) + line[len(body) :]
    return line


def dedent(code: str) -> list:
    "The cell's lines, without the indentation that all of them share (a pasted block)."
    lines = io.StringIO(code).readlines()  # split at \n only, as the tokenizer does
    if not code[:1].isspace():  # the first line has no indentation: there is no margin
        return lines
    margin = os.path.commonprefix([line[: len(line) - len(line.lstrip())]
                                   for line in lines if line.strip()])
    return [line[len(margin) :] if line.startswith(margin) else line for line in lines]


def transform(lines: list) -> tuple[str, bool]:
    "The cell's lines (dedented) as Python source, and whether a `;` ends it (hiding its result)."
    source, read = "".join(lines), []
    if not PLAIN_ESCAPES.search(source):  # shaped for speed: plain Python, nothing to rewrite or
        return source, False  # hide, needs no tokenizer (a fifth of a round trip's CPU)
    import tokenize
    starts, depth, last = True, 0, ""  # the next line starts a statement; open brackets; last token

    def readline() -> str:
        if len(read) == len(lines):
            return ""
        read.append(rewrite(lines[len(read)]) if starts else lines[len(read)])
        return read[-1]

    with contextlib.suppress(tokenize.TokenError, SyntaxError):  # compile() will say what is wrong
        for tok in tokenize.generate_tokens(readline):
            if tok.type == tokenize.OP and tok.string in ("(", "[", "{", ")", "]", "}"):
                depth += 1 if tok.string in ("(", "[", "{") else -1
            # A line starts a statement when the one before ended one: NEWLINE, or NL outside
            # brackets (a blank or comment line), on that line (not a string's first line).
            starts = tok.type in (tokenize.NEWLINE, tokenize.NL) and depth <= 0 \
                and tok.end[0] == len(read)
            if tok.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.COMMENT, tokenize.INDENT,
                                tokenize.DEDENT, tokenize.ENDMARKER):
                last = tok.string
    return "".join(read + lines[len(read) :]), last == ";"


def run_cell(code: str, name: str, silent: bool) -> tuple[Optional[dict], Optional[str]]:
    "Run a cell; return (error content or None, text/plain of its result or None)."
    import ast  # imported by the first cell, like linecache: a kernel only started stays small
    import linecache

    # The cell's lines, kept for tracebacks, as transform gets them: without a pasted block's
    # margin, each ending in a newline as linecache's own do (a magic's line shows as typed).
    # Else the carets under an error would be off by the margin, and by one on a last line
    # without a newline.
    lines = dedent(code + "\n")
    linecache.cache[name] = (len(code), None, lines, name)
    try:
        kernel["running"], kernel["starting"] = True, False  # inside the try: see Signals
        interrupt_now()  # an interrupt that came while this request was on its way
        source, quiet = transform(lines)
        tree = compile(source, name, "exec", ast.PyCF_ONLY_AST)  # ast.parse, minus a frame
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT  # changes nothing in code that has no await
        # A cell of one expression (df.head()) has no statements before it to compile.
        codes = [compile(tree, name, "exec", flags)] if tree.body else []
        if last is not None:
            codes.append(compile(ast.Expression(last.value), name, "eval", flags))
        try:
            value = run_code(codes)
            if value is None or silent or quiet:
                return None, None
            # As in IPython, `_` of the user's own (a loop's, gettext's) stays theirs.
            theirs = user.__dict__.get("_", kernel["result"]) is not kernel["result"]
            if not theirs and "_" not in builtins.__dict__:  # (gettext.install() puts it there)
                user._ = value
            kernel["result"] = value
            data, metadata = mimebundle(value)
            publish("execute_result", {"execution_count": kernel["execution_count"], "data": data,
                                       "metadata": metadata}, kernel["parent"]["header"])
            return None, data["text/plain"]
        finally:  # what the cell drew, even if it then failed, as ipykernel shows it
            show_figures()
    except BaseException as e:  # the user's KeyboardInterrupt and SystemExit included
        kernel["running"] = False  # at once: a second Ctrl-C must not break the error report
        if kernel["exiting"]:  # this SystemExit is ours: the kernel is shutting down
            raise
        if isinstance(e, LeaveDebugger):  # it left pdb (and its trace function): now it is
            e = KeyboardInterrupt().with_traceback(e.__traceback__)  # what the user did
        if not isinstance(e, UsageError):  # %debug debugs the user's code, not a magic's misuse
            remember_for_debug(e)
        error = error_content(e)
        if not silent:
            publish("error", error, kernel["parent"]["header"])
        return error, None
    finally:
        kernel["running"] = False


CO_COROUTINE = 0x80  # inspect.CO_COROUTINE: code with a top-level await, compiled to a coroutine


def run_code(codes: list):
    "Run a cell's statements, then its last expression, in the user's namespace: its value."
    if "asyncio" in sys.modules:  # the kernel's loop is the main thread's in every cell (an
        event_loop()  # asyncio.run() unsets it; a thread may have been the first to import it)
    if any(code.co_flags & CO_COROUTINE for code in codes):  # a top-level await: the whole
        return run_on_loop(run_async(codes))  # cell runs on the event loop
    value = None  # (a cell of comments only has no code at all)
    for code in codes:
        value = eval(code, user.__dict__)
    return value


async def run_async(codes: list):
    "Run a cell's parts as one coroutine, awaiting those that eval() made coroutines of."
    for code in codes:
        value = eval(code, user.__dict__)
        if code.co_flags & CO_COROUTINE:
            value = await value
    return value


def event_loop():
    "The kernel's event loop, which lives from cell to cell, set as the main thread's."
    import asyncio  # imported by the first cell that awaits, or by the user: see hook_asyncio
    kernel["loop"] = kernel["loop"] or asyncio.new_event_loop()
    # asyncio.get_event_loop() and ensure_future() in a cell that does not await find it, so
    # their tasks run on it, in the next cell that awaits.
    asyncio.set_event_loop(kernel["loop"])
    return kernel["loop"]


def hook_asyncio(asyncio):
    "asyncio, imported by a cell: the kernel's loop is the main thread's at once, for its tasks."
    if threading.current_thread() is threading.main_thread():  # (set_event_loop is per thread)
        event_loop()


def run_on_loop(coroutine):
    "Run a cell's coroutine as a task on the kernel's event loop."
    import asyncio

    loop = event_loop()
    task = loop.create_task(coroutine)
    try:
        loop.run_until_complete(asyncio.wait([task]))  # raises only if interrupted
    except BaseException:  # interrupted, or shutting down
        # Cancel the task and let its finally blocks run. running is False, so another SIGINT
        # raises nothing there; a shutdown's SystemExit still cuts them short.
        task.cancel()
        kernel["running"] = False
        with contextlib.suppress(BaseException):
            loop.run_until_complete(asyncio.wait([task]))
        raise
    return task.result()  # its error is raised here, with the cell's frames and not asyncio's


CELL_FRAME = re.compile(r'File "<(Cell In\[\d+\])>", line')  # shown as: Cell In[3], line 2


class UsageError(Exception):
    "A magic was misused: shown as one line, without a traceback."


def remember_for_debug(e: BaseException):
    "Keep an exception of the user's code for %debug, as the Python prompt does (sys.last_*)."
    tb = e.__traceback__
    while tb and tb.tb_frame.f_code.co_filename == __file__:  # start %debug in the user's code
        tb = tb.tb_next
    sys.last_type, sys.last_value, sys.last_traceback = type(e), e, tb or e.__traceback__


def error_content(e: BaseException) -> dict:
    "An exception as frontends show it: ename, evalue, and the traceback without our frames."
    try:
        evalue = str(e)
    except Exception:  # its __str__ raised; the traceback module says the same
        evalue = "<exception str() failed>"
    if isinstance(e, UsageError):
        return {"ename": "UsageError", "evalue": evalue, "traceback": [f"UsageError: {evalue}"]}
    import traceback  # imported on first use: only errors need it

    te = traceback.TracebackException(type(e), e, e.__traceback__)
    hide_kernel_frames(te)
    return {"ename": type(e).__name__, "evalue": evalue,
            "traceback": [CELL_FRAME.sub(r"\1, line", part.removesuffix("\n"))  # joined by \n
                          for part in te.format()]}


def hide_kernel_frames(te):
    "Drop this file's frames from a traceback (and the exceptions chained to it)."
    import traceback

    te.stack = traceback.StackSummary.from_list([f for f in te.stack if f.filename != __file__])
    for chained in (te.__cause__, te.__context__):
        if chained is not None:
            hide_kernel_frames(chained)


class LeaveDebugger(BaseException):
    "An interrupt at the (Pdb) prompt. pdb catches KeyboardInterrupt and prompts again: not this."


def at_pdb_prompt() -> bool:
    "Whether pdb's command loop is what waits for this line."
    pdb = sys.modules.get("pdb")  # (not imported: no debugger is running)
    frame = sys._getframe()
    while pdb and frame:
        if frame.f_code is pdb.Pdb._cmdloop.__code__:
            return True
        frame = frame.f_back
    return False


################ Rich output: display_data, execute_result, clear_output

# An object shows itself as a mimebundle, {mimetype: data}: text/plain from repr(), plus
# whatever rich reprs it offers. The frontend picks the richest type it can render.

REPRS = {"_repr_html_": "text/html", "_repr_markdown_": "text/markdown",
         "_repr_svg_": "image/svg+xml", "_repr_png_": "image/png", "_repr_jpeg_": "image/jpeg",
         "_repr_latex_": "text/latex", "_repr_json_": "application/json",
         "_repr_javascript_": "application/javascript"}


def mimebundle(obj) -> tuple[dict, dict]:
    "An object as (data, metadata): text/plain always, and every rich repr it offers."
    data, metadata = {"text/plain": repr(obj)}, {}
    if isinstance(obj, type):  # a class's _repr_html_ is an unbound function, not a repr
        return data, metadata
    for method, mime in REPRS.items():
        try:  # (getattr's default is quicker than a caught AttributeError, for most values)
            if (value := getattr(obj, method, None)) is None:  # no such repr
                continue
            value = value()
        except Exception as e:  # a broken one: text/plain still stands
            repr_failed(obj, method, e)
            continue
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict):
            value, metadata[mime] = value  # (data, metadata)
        if (value := fit(mime, value)) is not None:
            data[mime] = value
        else:
            metadata.pop(mime, None)
    if inline_figure(obj):  # a matplotlib figure has no rich repr of its own
        data["image/png"] = figure_png(obj)
    try:
        if (method := getattr(obj, "_repr_mimebundle_", None)) is None:
            return data, metadata
        bundle = method(include=None, exclude=None)
    except Exception as e:
        repr_failed(obj, "_repr_mimebundle_", e)
        return data, metadata
    bundle, extra = bundle if isinstance(bundle, tuple) and len(bundle) == 2 else (bundle, {})
    if isinstance(bundle, dict) and isinstance(extra, dict):
        data.update(bundle)
        metadata.update(extra)
    return data, metadata


def repr_failed(obj, method: str, e: Exception):
    "A repr method of the object's class that raised: its error is an output, as in IPython."
    if hasattr(type(obj), method) and not isinstance(e, NotImplementedError) and not hushed():
        publish("error", error_content(e), kernel["cell"])  # (NotImplementedError: it declined)


def fit(mime: str, value):
    "A rich repr's value as JSON carries it, or None if it has the wrong type for its mimetype."
    # An object that answers every attribute (a mock, an RPC proxy) returns objects, not reprs.
    if mime == "application/json":
        return value if isinstance(value, (dict, list)) else None
    if mime in ("image/png", "image/jpeg") and isinstance(value, bytes):
        import base64  # images travel as base64 text inside JSON
        return base64.b64encode(value).decode()
    return value if isinstance(value, str) else None  # text, or an image already in base64


def display(*objs, display_id=None, update: bool = False, raw: bool = False,
            metadata: Optional[dict] = None, include: Sequence[str] = ()):
    """Show objects below the cell (raw: they are mimebundles already). With display_id (True
    makes a fresh one) it returns a handle, and update=True replaces that earlier display."""
    display_id = uuid.uuid4().hex if display_id is True else display_id
    if update and not display_id:
        raise ValueError("display(..., update=True) needs the display_id of the display to update")
    transient = {"display_id": display_id} if display_id else {}
    for obj in objs:
        data, md = (obj, {}) if raw else mimebundle(obj)
        if include:  # IPython's display_html() and the like: that mimetype only
            data = {mime: value for mime, value in data.items() if mime in include}
        if not hushed():
            publish("update_display_data" if update else "display_data",
                    {"data": data, "metadata": {**md, **(metadata or {})},
                     "transient": transient}, kernel["cell"])
    return DisplayHandle(display_id) if display_id else None


def update_display(obj, *, display_id: str, **kwargs):
    "Replace the display that has this display_id."
    display(obj, display_id=display_id, update=True, **kwargs)


class DisplayHandle:
    "What display(..., display_id=...) returns: update() replaces that display, display() adds one."

    def __init__(self, display_id: str):
        self.display_id = display_id

    def display(self, obj, **kwargs):
        display(obj, display_id=self.display_id, **kwargs)

    def update(self, obj, **kwargs):
        update_display(obj, display_id=self.display_id, **kwargs)


def clear_output(wait: bool = False):
    "Clear this cell's output now, or (wait=True) just before the next output arrives."
    if not hushed():
        publish("clear_output", {"wait": wait}, kernel["cell"])


################ Completion and help: Tab, Shift-Tab and "is this cell complete?" for Python

# The protocol asks three questions that only the language can answer: what could finish the
# word at the cursor (complete_request), what is this name (inspect_request), and does Enter
# run the cell or start a new line (is_complete_request). Python answers them here, running as
# little of the user's code as it can: attributes are looked up statically (no property runs),
# and what does run, an object's __dir__ (Tab) or __repr__ (help), can be interrupted.


def resolve(name: str):
    "The object a dotted name refers to in the user's namespace, found without running code."
    import inspect  # imported on first use: help and completion need it

    first, *attrs = name.split(".")
    obj = user.__dict__[first] if first in user.__dict__ else getattr(builtins, first)
    for attr in attrs:  # getattr_static: a property behind a dot is named, not run
        obj = inspect.getattr_static(obj, attr)
    return obj


def word_before(text: str) -> str:
    "The dotted name that ends the text: 'x = os.pa' -> 'os.pa'."
    return re.match(r"[\w.]*", text[::-1]).group()[::-1]  # matched backwards: linear time


def cursor(c: dict) -> int:
    "The request's cursor_pos, in code points (protocol 5.2), checked against the code."
    code, pos = c["code"], c.get("cursor_pos")
    pos = len(code) if pos is None else pos
    if type(pos) is not int or not 0 <= pos <= len(code):  # (a bool is an int to Python)
        raise ValueError(f"cursor_pos must be a position in the code (0 to {len(code)}), "
                         f"not {pos!r}")
    return pos


IMPORT_LINE = re.compile(r"\s*(from\s+|import\s+([\w.]+\s*,\s*)*)[\w.]*")  # import a, b.|
FROM_IMPORT = re.compile(r"\s*from\s+(\w[\w.]*)\s+import\s+[\w\s,(]*")  # from os import pa|
# A string or a comment, left to right on a line: (prefix, quote, text, closing quote or "").
LITERAL = re.compile(r"""(\w{0,2})('{3}|"{3}|'|")((?:\\.|(?!\2)[^\\])*)(\2)?|#.*""")


def complete_request(msg: dict) -> dict:
    "Tab: the names, attributes, keywords, modules or paths that could finish the cursor's word."
    import keyword
    code, pos = msg["content"]["code"], cursor(msg["content"])
    line = code[:pos].rpartition("\n")[2]
    if (text := open_string(line)) is not None:  # open('/tmp/da|: a file's path
        return path_reply(text, pos)
    base, dot, prefix = word_before(line).rpartition(".")  # "os.pa|": "os", ".", "pa"
    try:
        if IMPORT_LINE.fullmatch(line):
            names = module_names(base)
        elif from_import := FROM_IMPORT.fullmatch(line):  # from m import: m's submodules,
            module = sys.modules.get(from_import[1])  # and its names if it is imported
            names = module_names(from_import[1]) + (dir(module) if module else [])
        elif dot:
            names = interruptible(dir, resolve(base))
        else:
            names = [*user.__dict__, *dir(builtins), *keyword.kwlist]
    except (Exception, KeyboardInterrupt):  # nothing by that name, or interrupted: nothing
        names = []
    private = prefix.startswith("_")  # _names only when asked for
    matches = sorted({n for n in names if n.startswith(prefix) and (private or n[0] != "_")})
    return {"status": "ok", "matches": matches, "cursor_start": pos - len(prefix),
            "cursor_end": pos, "metadata": {}}


def open_string(line: str) -> Optional[str]:
    "The text of the string that the line ends inside, if it does (and not in an f-string's {})."
    literals = LITERAL.findall(line)  # a comment's groups are all ""
    prefix, quote, text, closing = literals[-1] if literals else ("", "", "", "")
    if not quote or closing:  # no string, a comment, or the last string is closed
        return None
    if "f" in prefix.lower() and text.count("{") > text.count("}"):  # f"{a.b|: code
        return None
    return text


def path_reply(text: str, pos: int) -> dict:
    "The files and folders a path could go on with: '/tmp/da' -> data/, dates.csv."
    # A folder's name ends in "/", so that Tab again goes inside; hidden ones only when asked for.
    folder, slash, start = text.rpartition("/")
    folder = os.path.expanduser(folder + slash) or "."  # "/tmp/", "~/", or the working dir
    try:
        with os.scandir(folder) as entries:  # (it knows which are folders, with no stat each)
            names = [e.name + "/" if e.is_dir() else e.name for e in entries
                     if e.name.startswith(start) and (start[:1] == "." or e.name[:1] != ".")]
    except OSError:  # no such folder, or not ours to read
        names = []
    return {"status": "ok", "matches": sorted(names), "cursor_start": pos - len(start),
            "cursor_end": pos, "metadata": {}}


def module_names(package: str) -> list:
    "The modules `import package.` could name (top-level ones if package is ''), none imported."
    import importlib.machinery
    import pkgutil
    path = None  # sys.path
    for name in filter(None, package.split(".")):  # find each package's folder, as import would
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not spec.submodule_search_locations:
            return []
        path = spec.submodule_search_locations
    names = [module.name for module in pkgutil.iter_modules(path)]
    return names if path is not None else [*names, *sys.builtin_module_names]


def inspect_request(msg: dict) -> dict:
    "Shift-Tab help: what `obj?` shows (detail_level 1: `obj??`), for the name at the cursor."
    code, pos = msg["content"]["code"], cursor(msg["content"])
    name = word_before(code[:pos]) + re.match(r"\w*", code[pos:]).group()
    if not name.strip("."):  # "print(|": help on the function being called
        name = word_before(code[:pos].rstrip().removesuffix("("))
    try:
        text = interruptible(describe, resolve(name.strip(".")), name,
                             msg["content"].get("detail_level", 0))
    except (Exception, KeyboardInterrupt):
        return {"status": "ok", "found": False, "data": {}, "metadata": {}}
    return {"status": "ok", "found": True, "data": {"text/plain": text}, "metadata": {}}


def interruptible(function, *args):
    "Call a function that runs user code (a __dir__, a __repr__): an interrupt stops it."
    try:
        kernel["running"] = True  # inside the try: see Signals
        return function(*args)
    finally:
        kernel["running"] = False


def describe(obj, name: str, detail: int) -> str:
    "Help text: type, signature and docstring; detail 1 adds the source."
    import inspect  # imported on first use: most kernels never need it
    lines = [f"Type:      {type(obj).__name__}"]
    try:
        lines.append(f"Signature: {name}{inspect.signature(obj)}")
    except (TypeError, ValueError):  # not callable, or a builtin without one
        lines.append(f"Value:     {repr(obj)[:200]}")
    lines.append("Docstring:\n" + (inspect.getdoc(obj) or "<no docstring>"))
    if detail:
        try:
            lines.append("Source:\n" + inspect.getsource(obj))
        except (TypeError, OSError):
            lines.append("Source:    <not available>")
    return "\n".join(lines)


def is_complete_request(msg: dict) -> dict:
    "Should Enter run the cell? complete, incomplete (with the indent to offer), or invalid."
    import ast
    import codeop
    import warnings
    code = msg["content"]["code"]
    source, _ = transform(dedent(code))
    compile_command = codeop.CommandCompiler()
    compile_command.compiler.flags |= ast.PyCF_ALLOW_TOP_LEVEL_AWAIT  # as run_cell compiles
    try:
        with warnings.catch_warnings():  # a SyntaxWarning here is not the user's output
            warnings.simplefilter("ignore")
            compiled = compile_command(source, "<cell>", "exec")
            statements = ast.parse(source).body if compiled else []
    except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError):
        return {"status": "invalid"}  # the last two: too long or deep for the parser
    last = code.split("\n")[-1]  # the indent to offer is the typed one, before dedenting
    indent = last[: len(last) - len(last.lstrip())]
    if compiled is None:  # an open bracket, or a block that has no body yet
        return {"status": "incomplete", "indent": indent + "    " * last.rstrip().endswith(":")}
    in_block = source.split("\n")[-1][:1] in (" ", "\t") and last.strip()
    if in_block and statements and has_body(statements[-1]):
        # inside an indented block (not just a line continued in brackets): a blank line ends it
        return {"status": "incomplete", "indent": indent}
    return {"status": "complete"}


def has_body(statement) -> bool:
    "Is this a compound statement (if, for, def, with, ...), one that a blank line ends?"
    return any(hasattr(statement, field) for field in ("body", "cases"))  # cases: match


SHELL_HANDLERS.update({  # the language's own requests, registered with the protocol's
    "complete_request": complete_request,
    "inspect_request": inspect_request,
    "is_complete_request": is_complete_request,
})


################ Magics: %connect_info, %console, %debug, %matplotlib, obj? and !cmd

def magic(name: str, arg: str):
    "Run %name with its argument string."
    if name not in MAGICS:
        known = ", ".join(f"%{m}" for m in MAGICS)
        raise UsageError(f"unknown magic %{name}. The magics are {known} (obj? is %pinfo obj).")
    MAGICS[name](arg)


def connect_info(arg: str):
    "%connect_info: the connection file's contents, and how to attach another frontend to them."
    path = kernel["connection_file"]
    print(json.dumps(kernel["connection"], indent=2))
    print(f"\nConnection file: {path}\nAttach another frontend to this kernel from a terminal:")
    print(f"    python miniconsole.py --existing {path}")
    if os.path.dirname(path) == os.path.abspath(runtime_dir()):  # --existing searches there
        name = os.path.basename(path).removeprefix("kernel-")[:8]
        print(f"    python miniconsole.py --existing {name}"
              "   (part of the file name is enough)\n"
              "    python miniconsole.py --existing   (no name: the newest kernel)")
    print(f"    jupyter console --existing {path}")


def console(arg: str):
    "%console: open a second console on this kernel (tmux window, terminal, or a command to run)."
    import shlex
    import shutil
    import subprocess
    script = os.path.join(HERE, "miniconsole.py")
    cmd = ([sys.executable, script] if os.path.exists(script) else ["jupyter", "console"])
    cmd += ["--existing", kernel["connection_file"]]
    terminals = [["x-terminal-emulator", "-e"], ["gnome-terminal", "--"], ["konsole", "-e"],
                 ["xterm", "-e"]]
    if os.environ.get("TMUX") and shutil.which("tmux"):
        launch, where = ["tmux", "new-window", shlex.join(cmd)], "a new tmux window"
    elif os.environ.get("DISPLAY") and (found := [t for t in terminals if shutil.which(t[0])]):
        launch, where = found[0] + cmd, f"a new {found[0][0]} window"
    else:
        print(f"No tmux or terminal window to open; run this in a terminal:\n    {shlex.join(cmd)}")
        return
    subprocess.Popen(launch, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)  # never waits for it
    print(f"Opened a console on this kernel in {where}.")


def debug(arg: str):
    "%debug: post-mortem pdb on the last exception; you talk to it through input_request."
    import pdb
    if getattr(sys, "last_traceback", None) is None:
        raise UsageError("%debug: no exception to debug yet")
    pdb.post_mortem(sys.last_traceback)


def pinfo(arg: str, detail: int = 0):
    "obj?: signature and docstring, sent to the pager (an execute_reply payload)."
    try:
        text = describe(resolve(arg), arg, detail)
    except Exception:
        text = f"Object `{arg}` not found."
    kernel["payload"].append({"source": "page", "data": {"text/plain": text}, "start": 0})


def system(cmd: str):
    "!cmd (or %system cmd): run the line in a shell; its output streams into the cell as it comes."
    import subprocess
    # Its output goes to fds 1 and 2, the pipes the kernel forwards (see Output below Python).
    # It has no keyboard, so no stdin; and its own process group, so an interrupt reaches every
    # process of a pipeline, as Ctrl-C in a terminal does.
    child = subprocess.Popen(cmd, shell=True, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        status = child.wait()
    except KeyboardInterrupt:  # SIGINT to the group; SIGKILL if that did not end it in 0.5 s
        kill_group(child.pid, signal.SIGINT)
        try:
            child.wait(0.5)
        except subprocess.TimeoutExpired:
            kill_group(child.pid, signal.SIGKILL)
        raise
    if status:
        sys.stderr.flush()  # what the command wrote comes first
        print(f"!{cmd}: exit status {status}", file=sys.stderr)


def kill_group(pgid: int, signum: int):
    "Send a signal to a process group, if it is still there."
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def ask_exit(keep_kernel: bool = False):
    "exit() and quit(): ask the frontend to close, and to stop the kernel unless keep_kernel."
    kernel["payload"].append({"source": "ask_exit", "keepkernel": keep_kernel})


def matplotlib_magic(arg: str):
    "%matplotlib inline: accepted, and nothing to do: figures are inline already."
    if arg.strip() not in ("", "inline"):
        raise UsageError(f"%matplotlib {arg.strip()}: figures are inline here; for another"
                         " backend, call matplotlib.use() before importing pyplot")


MAGICS = {"connect_info": connect_info, "console": console, "debug": debug, "pinfo": pinfo,
          "pinfo2": lambda arg: pinfo(arg, detail=1), "system": system,
          "matplotlib": matplotlib_magic}


################ Optional integrations: comm, IPython.display, matplotlib, ipywidgets

# None of these is imported at startup, and the kernel needs none of them. A finder at the
# head of sys.meta_path watches imports instead: when the user's code first imports one, the
# real module loads as usual, then HOOKS points its hooks at this module, so that code written
# for ipykernel works unchanged. ipywidgets, for one, reaches comms through the comm package,
# and shows itself through IPython.display. (asyncio's hook, which gives the main thread the
# kernel's event loop, stands with the cells that await, under Running a cell.)

BACKEND = "module://minikernel"  # matplotlib's name for this module as a backend


class HookOnImport:
    "On sys.meta_path: find a module in HOOKS as the other finders do, and hook it once loaded."

    @staticmethod
    def find_spec(name: str, path=None, target=None):
        if name not in HOOKS:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)  # old-style finders have none
            if finder is not HookOnImport and find and (spec := find(name, path, target)):
                break
        else:
            return None  # not installed: the ImportError the user expects
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            try:
                HOOKS[name](module)
            except Exception as e:  # a module of the user's by that name: it imports as it is
                log(f"not hooked: {name} ({module.__file__}): {type(e).__name__}: {e}")

        spec.loader.exec_module = exec_module  # this spec's own loader, made for this import
        return spec


def hook_comm(comm):
    "The comm package: its users create our Comms, and register targets with this module."
    comm.create_comm, comm.get_comm_manager = Comm, lambda: me


def hook_ipython_display(functions):
    "IPython.display and the modules that import from it: display through minikernel."
    functions.display, functions.clear_output = display, clear_output
    functions.update_display, functions.publish_display_data = update_display, publish_data


def publish_data(data: dict, metadata: Optional[dict] = None, source=None, *, transient=None,
                 **kwargs):
    "IPython's publish_display_data: a mimebundle, shown as it is."
    display(data, raw=True, metadata=metadata, display_id=(transient or {}).get("display_id"),
            **kwargs)


def hook_matplotlib(matplotlib):
    "matplotlib: figures inline, unless the user chose a backend (MPLBACKEND, or use() later)."
    if "MPLBACKEND" not in os.environ:
        matplotlib.use(BACKEND)


def hook_ipywidgets(ipywidgets):
    "ipywidgets: register its comm targets, and show its callbacks' errors (IPython's shell would)."
    import logging  # ipywidgets has imported it already

    ipywidgets.register_comm_target()
    shown = logging.Handler(logging.WARNING)  # without a shell it logs them, to a NullHandler
    shown.emit = lambda record: record.exc_info and show_error(record.exc_info[1],
                                                               record.getMessage())
    logging.getLogger("traitlets").addHandler(shown)  # the logger its widgets have


HOOKS = {"asyncio": hook_asyncio, "comm": hook_comm,
         "IPython.core.display_functions": hook_ipython_display,
         "matplotlib": hook_matplotlib, "ipywidgets": hook_ipywidgets}


def __getattr__(name: str):
    "The backend's FigureCanvas, looked up by matplotlib: imported only when pyplot asks."
    if name == "FigureCanvas":
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        globals()[name] = FigureCanvasAgg  # pyplot then copies this module's globals
        return FigureCanvasAgg
    raise AttributeError(f"module 'minikernel' has no attribute {name!r}")


def show(block=None):
    "plt.show(): every open figure as an image/png display_data, then closed."
    from matplotlib import pyplot
    from matplotlib._pylab_helpers import Gcf  # where pyplot keeps its figures, for backends

    try:
        for manager in Gcf.get_all_fig_managers():
            display(manager.canvas.figure)
    finally:
        pyplot.close("all")


def inline_figure(obj) -> bool:
    "Is this a matplotlib figure, with figures inline? Then its value and display() show it."
    figure = sys.modules.get("matplotlib.figure")  # not imported: no figure anywhere
    return (figure is not None and isinstance(obj, figure.Figure)
            and sys.modules["matplotlib"].get_backend() == BACKEND)


def figure_png(figure) -> str:
    "A figure as PNG, in base64 text, cropped to what it draws."
    import base64

    png = io.BytesIO()
    figure.savefig(png, format="png", bbox_inches="tight")
    return base64.b64encode(png.getvalue()).decode()


def show_figures():
    "At the end of a cell: show the figures it drew and did not show, if we are the backend."
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot and pyplot.get_backend() == BACKEND:
        show()


################ Output below Python: file descriptors 1 and 2, forwarded to the streams

# C code, subprocesses and forked children do not write to sys.stdout: they write to file
# descriptors 1 and 2. So at startup both become pipes (the terminal's fd 2 is kept, for log()).
# A forwarder thread wakes when a pipe has data and adds it to the output buffer; every flush
# also takes what is waiting, so what was written before a reply is published before it. A read
# takes one pipe-full at most: a flood from a child stays in bounded pieces, and the full pipe
# makes the child wait (that is the backpressure).

PIPE_READ = 1 << 16  # bytes: what a Linux pipe holds
pipes = []  # [(read end, stream name, its UTF-8 decoder)], for fds 1 and 2 once captured
waiting = select.poll()  # the read ends: one syscall says which pipes hold anything


def capture_fds():
    "Point fds 1 and 2 at pipes the forwarder reads; log() keeps the terminal's fd 2."
    import codecs  # (already imported by every Python: io needs it)
    sys.__stdout__.flush()
    sys.__stderr__.flush()
    kernel["terminal"] = os.fdopen(os.dup(2), "w", buffering=1, errors="backslashreplace")
    for fd, name in ((1, "stdout"), (2, "stderr")):
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)  # fds 1 and 2 stay inheritable: subprocesses write here
        os.close(write_end)
        os.set_blocking(read_end, False)
        waiting.register(read_end, select.POLLIN)
        pipes.append((read_end, name, codecs.getincrementaldecoder("utf-8")(errors="replace")))


def read_fds():
    "Move what waits in the pipes into the output buffer, one pipe-full each at most (lock held)."
    gather_writes()  # first the prints queued so far: what C writes after a print goes after it
    # Shaped for speed: every flush comes here, one before each message, and finds the pipes
    # empty; one poll costs a microsecond, a failing read of each pipe seven.
    try:
        ready = {fd for fd, _ in waiting.poll(0)}
    except RuntimeError:  # "concurrent poll() invocation": a signal handler that flushes ran
        return  # inside our own poll (Python runs handlers on EINTR); the outer read goes on
    for read_end, name, decoder in pipes:  # a character split between two reads waits in decoder
        if read_end not in ready:
            continue
        with contextlib.suppress(BlockingIOError):  # emptied since the poll: nothing is lost
            # While silent code runs, what comes is dropped, whoever wrote it: a pipe can't say.
            if (text := decoder.decode(os.read(read_end, PIPE_READ))) and not kernel["silent"]:
                buffer_output(name, text)


def in_forked_child():
    "A forked child (multiprocessing) prints straight to fds 1 and 2, which the kernel forwards."
    # Only the forking thread lives on in a child: a lock that another thread held at the fork
    # stays held for good, and the kernel's sockets are not the child's to use.
    # Nor are its signal handlers: SIGTERM (Pool.terminate) must end the child, not "shut it down".
    # Nor are the pipes' read ends: a child that read them would take what its siblings wrote.
    global iopub_lock
    iopub_lock = threading.RLock()
    for read_end, _, _ in pipes:
        waiting.unregister(read_end)
        os.close(read_end)
    pipes.clear()
    output["writes"].clear()  # the kernel's text, which the kernel publishes
    output["runs"], output["size"] = [], 0
    kernel["forked"] = {name: os.fdopen(fd, "w", buffering=1, encoding="utf-8", closefd=False)
                        for fd, name in ((1, "stdout"), (2, "stderr"))}
    sys.stdout, sys.stderr = kernel["forked"]["stdout"], kernel["forked"]["stderr"]
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def forward_fds():
    "The forwarder thread: whenever a pipe has data, move it to the output buffer."
    while True:
        zmq.select([read_end for read_end, _, _ in pipes], [], [])
        with iopub_lock:
            read_fds()
            if output["size"] >= FLUSH_SIZE:
                flush_output()


################ Main: start a kernel, or install its kernelspec

HELP = """\
usage: python minikernel.py [-f FILE] [--ip ADDR] [--show-messages]
       python minikernel.py install [--user | --sys-prefix | --prefix DIR] [--name NAME]
                                    [--show-messages]

Start a kernel:
  python minikernel.py               new kernel: free ports on 127.0.0.1, a random key, and a
                                     connection file kernel-<id>.json in the Jupyter runtime dir
  python minikernel.py -f FILE       the kernelspec way: bind exactly what FILE says (transport,
                                     ip, ports, key); if FILE does not exist, write it as above
  python minikernel.py --ip ADDR     listen on ADDR instead of 127.0.0.1 (warns if not loopback)
  python minikernel.py --show-messages
                                     print every message received (<-) and sent (->) on stderr

Let Jupyter start it (jupyter console --kernel minikernel, nbclient, JupyterLab):
  python minikernel.py install [--user | --sys-prefix | --prefix DIR] [--name NAME]
  python minikernel.py install --show-messages
                                     a kernelspec "minikernel-trace" whose kernel prints every
                                     message in the terminal of whoever started it (the server)

Attach to a running kernel: python miniconsole.py --existing
Ctrl-C reaches running code only. To stop the kernel: a shutdown from a frontend, or kill PID.
"""


TRAITLETS_OPTION = re.compile(r"--[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")  # --Class.trait=value

# Each command's options with their defaults. A True/False one is a switch; the rest take a value.
OPTIONS = {"serve": {"-f": None, "--ip": "127.0.0.1", "--show-messages": False},
           "install": {"--user": False, "--sys-prefix": False, "--prefix": None,
                       "--name": None, "--show-messages": False}}


def parse_args(argv: list) -> tuple[str, dict]:
    "The command, serve or install, and its options: a bad command line exits with one line."
    command = "install" if argv[:1] == ["install"] else "serve"
    opts, args = dict(OPTIONS[command]), iter(argv[command == "install" :])
    for arg in args:
        name, eq, value = arg.partition("=")  # --ip ADDR, or --ip=ADDR
        if arg in ("-h", "--help"):
            print(HELP, end="")
            sys.exit(0)
        if command == "serve" and eq and TRAITLETS_OPTION.fullmatch(name):
            # jupyter_client takes a kernelspec named python3 for ipykernel, and nbclient then
            # adds IPython's options, such as --HistoryManager.hist_file=:memory:
            log(f"ignoring {arg}: an option for IPython, not minikernel")
        elif name not in opts:
            usage_error(f"unknown argument {arg!r}")
        elif isinstance(opts[name], bool):
            opts[name] = True
        elif eq or (value := next(args, None)) is not None:
            opts[name] = value
        else:
            usage_error(f"{name} needs a value")
    if sum(bool(opts.get(k)) for k in ("--user", "--sys-prefix", "--prefix")) > 1:
        usage_error("choose one of --user, --sys-prefix and --prefix")
    return command, opts


def usage_error(problem: str):
    "Say what is wrong with the command line, and exit with 2, the usual code for it."
    print(f"minikernel.py: {problem} (see --help)", file=sys.stderr)
    sys.exit(2)


def install(opts: dict):
    "Write a kernelspec: how Jupyter starts this kernel, with {connection_file} filled in."
    import py_compile
    trace = opts["--show-messages"]
    name = opts["--name"] or ("minikernel-trace" if trace else "minikernel")
    prefix = opts["--prefix"] or (sys.prefix if opts["--sys-prefix"] else None)
    base = os.path.join(prefix, "share", "jupyter") if prefix else data_dir()
    spec_dir = os.path.join(base, "kernels", name)
    os.makedirs(spec_dir, exist_ok=True)
    # Jupyter starts the kernel by importing this file, not by running it as a script: an
    # import loads the bytecode cached in __pycache__ (compiled here, as pip compiles what it
    # installs), where a script is compiled afresh at every start, and the memory that takes
    # stays with the kernel for good (4 MiB, a sixth of it). A stale cache is simply not used.
    module = os.path.splitext(os.path.basename(__file__))[0]  # import_module: any file name
    launch = (f"import importlib, sys; sys.path[0] = {HERE!r}; "
              f"importlib.import_module({module!r}).main(sys.argv[1:])")
    try:
        py_compile.compile(__file__, doraise=True)
    except (OSError, py_compile.PyCompileError) as e:  # a read-only folder: it still works
        print(f"(bytecode not cached, so each start compiles the file: {e})", file=sys.stderr)
    # interrupt_mode "message": Jupyter interrupts with interrupt_request on control rather than
    # SIGINT to our process group, the same way a console attached with --existing must.
    spec = {"argv": [sys.executable, "-c", launch, "-f", "{connection_file}",
                     *["--show-messages"] * trace],
            "display_name": f"{DISPLAY_NAME} ({name})", "language": LANGUAGE_INFO["name"],
            "interrupt_mode": "message", "metadata": {"debugger": False}}
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        json.dump(spec, f, indent=2)
    print(f"Installed kernelspec {name} in {spec_dir}")


def remove_connection_file():
    "Remove the connection file, if this kernel wrote it (a kernel manager cleans up its own)."
    if kernel.get("wrote_file"):
        with contextlib.suppress(OSError):
            os.remove(kernel["connection_file"])


def serve(path: Optional[str], ip: str, show_messages: bool):
    "Bind the five sockets, start the threads, and run shell requests until shutdown."
    parent = os.getppid()  # now, before the connection file tells the launcher we are up
    if path and os.path.exists(path):
        with open(path) as f:
            conn = {**new_connection(ip), **json.load(f)}
    else:
        conn = new_connection(ip)
        path = path or os.path.join(runtime_dir(), f"kernel-{uuid.uuid4()}.json")
    loopback = conn["ip"].startswith("127.") or conn["ip"] in ("localhost", "::1")
    if conn["transport"] == "tcp" and not loopback:
        log(f"warning: listening on {conn['ip']}, not loopback: other machines can reach it")
    if not conn["key"]:
        log("warning: empty key, messages are not signed: anyone who can connect can run code")
    ctx = zmq.Context()
    ctx.linger = 1000  # at exit, give queued replies a second to leave
    try:
        sockets = bind_sockets(ctx, conn)
    except zmq.ZMQError as e:  # a port taken, an address not ours: say which, in one line
        log(f"cannot listen on {conn['transport']}://{conn['ip']}: {e}")
        sys.exit(1)
    kernel.update(sockets=sockets, connection=conn, connection_file=os.path.abspath(path),
                  session=new_session(conn["key"], conn["signature_scheme"]),
                  wrote_file=not os.path.exists(path))
    if kernel["wrote_file"]:
        write_connection_file(path, conn)
        # On the terminal's fd 1, while it is still the terminal's (see capture_fds):
        print(f"minikernel {__version__} (pid {os.getpid()}) is running.\n"
              f"Connection file: {kernel['connection_file']}\nAttach a console with:\n"
              f"    python miniconsole.py --existing\n"
              f"    jupyter console --existing {kernel['connection_file']}\n"
              f"Stop it with a shutdown from a frontend, or: kill {os.getpid()}",
              file=sys.__stdout__, flush=True)
    if show_messages:
        kernel["trace"] = True
        log("--show-messages: <- received, -> sent; hb pings are raw bytes echoed in C, not shown")

    # The user's world: a fresh __main__, output to iopub, input from the frontend.
    sys.modules["minikernel"] = me  # so `import minikernel` finds this one, as matplotlib does
    sys.meta_path.insert(0, HookOnImport)  # see Optional integrations
    if sys.path and os.path.realpath(sys.path[0]) == os.path.realpath(HERE):  # as a script or
        sys.path[0] = ""  # from the kernelspec: the working directory first, as in IPython
    sys.argv[0] = os.path.abspath(__file__)  # the kernel's file, as in ipykernel, not the "-c"
    sys.modules["__main__"] = user  # so pickle finds classes defined in cells
    user.__dict__.update(__builtins__=builtins, display=display, clear_output=clear_output,
                         __magic__=magic, exit=ask_exit, quit=ask_exit)
    sys.stdout, sys.stderr = Stream("stdout", 1), Stream("stderr", 2)
    capture_fds()
    os.register_at_fork(after_in_child=in_forked_child)
    # Registered before the user's, it runs after them (last in, first out). pyzmq's own, from
    # its import, comes after it and is skipped: it only keeps a context's __del__ at exit
    # from warning and destroying it.
    atexit.register(exit_without_teardown)
    builtins.input, getpass.getpass = user_input, user_getpass
    kernel["wakeup"], wakeup_w = os.pipe()
    os.set_blocking(wakeup_w, False)
    signal.set_wakeup_fd(wakeup_w)  # every signal also writes a byte here: see recv_interruptibly
    for sock in (sockets["shell"], sockets["stdin"]):  # what recv_interruptibly waits on
        kernel["pollers"][sock] = poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(kernel["wakeup"], zmq.POLLIN)
    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, lambda signum, frame: leave())

    threads = [(heartbeat, sockets["hb"]), (serve_control, sockets["control"]),
               (iopub_ticker, sockets["iopub"]), (forward_fds,)]
    if os.environ.get("JPY_PARENT_PID"):
        threads.append((watch_parent, parent))
    # Threads inherit the signal mask of the thread that starts them. Started with SIGINT and
    # SIGTERM blocked, none of them can take a signal meant for the main thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    for target, *args in threads:
        threading.Thread(target=target, args=args, name=target.__name__, daemon=True).start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    status("starting")
    code = 0
    try:
        serve_shell(sockets["shell"])
    except SystemExit:  # shutdown_request, SIGTERM or the parent's death, via on_sigint
        pass
    except BaseException as e:  # a bug in this file: say so, and still clean up
        log(f"crashed: {type(e).__name__}: {e}")
        code = kernel["exit_code"] = 1  # (a forced exit, too, says that it failed)
        force_exit_soon()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # no more interruptions: we are leaving
    with iopub_lock:
        flush_output()
        sockets["iopub"].close()
    sockets["shell"].close()
    sockets["stdin"].close()
    ctx.term()  # waits for control and hb to close, and for queued messages to leave
    remove_connection_file()
    kernel["exit_code"] = code
    sys.exit(code)  # as a Python script ends: atexit handlers run, then exit_without_teardown


def main(argv: list):
    "Serve a kernel, or install its kernelspec, as the command line says."
    command, opts = parse_args(argv)
    if command == "install":
        install(opts)
    else:
        serve(opts["-f"], opts["--ip"], opts["--show-messages"])


if __name__ == "__main__":
    main(sys.argv[1:])
