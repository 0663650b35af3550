"""Another user of the machine trying to use someone's cluster: run as that user.

Runs under Debian's /usr/bin/python3 (the cluster owner's Python may sit in a
home directory others cannot enter), with only the standard library and
Debian's python3-zmq. Prints one JSON line: what each attempt got.

    attacker.py files PATH...                  read each path
    attacker.py ipp PORT ENGINE_IDENT KEY FILE  a signed execute_request that creates FILE
    attacker.py dask PORT                      a connection to a Dask scheduler or worker
"""

import datetime
import hashlib
import hmac
import json
import socket
import sys
import uuid


def try_files(paths):
    out = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                f.read(1)
            out[path] = "read"
        except OSError as e:
            out[path] = type(e).__name__
    return out


def try_ipp(port, engine_ident, key, target):
    """What an ipyparallel client sends to run code on one engine, signed with ``key``."""
    import zmq

    session = str(uuid.uuid4())
    header = {"msg_id": str(uuid.uuid4()), "msg_type": "execute_request", "username": "other",
              "session": session, "date": datetime.datetime.now().isoformat(), "version": "5.3"}
    content = {"code": f"open({target!r}, 'w').write('done')", "silent": False,
               "store_history": False, "user_expressions": {}, "allow_stdin": False}
    parts = [json.dumps(x).encode() for x in (header, {}, {}, content)]
    signer = hmac.new(key.encode(), digestmod=hashlib.sha256)
    for part in parts:
        signer.update(part)
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, session.encode())
    dealer.setsockopt(zmq.LINGER, 1000)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send_multipart([engine_ident.encode(), b"<IDS|MSG>",
                           signer.hexdigest().encode(), *parts])
    replied = dealer.poll(3000)
    dealer.close()
    context.term()
    return {"reply": bool(replied)}


def try_dask(port):
    """Connect to a Dask server and wait for the first byte of its handshake."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            data = sock.recv(1)
            return {"result": "accepted" if data else "closed"}
    except OSError as e:
        return {"result": "closed", "why": type(e).__name__}


if __name__ == "__main__":
    what, args = sys.argv[1], sys.argv[2:]
    if what == "files":
        result = try_files(args)
    elif what == "ipp":
        result = try_ipp(int(args[0]), args[1], args[2], args[3])
    else:
        result = try_dask(int(args[0]))
    print(json.dumps(result))
