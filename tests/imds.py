"""A VM's instance metadata service, as EC2 serves it (IMDSv2), for one test host:

    nsenter --net=/run/netns/HOST python tests/imds.py INSTANCE_ID

serves http://169.254.169.254/latest/... inside that host's network (the address is the
host's own, on its loopback): a session token, then the instance's id with that token.
"""

import http.server
import secrets
import sys

INSTANCE_ID = sys.argv[1]
TOKEN = secrets.token_hex(16)


class Metadata(http.server.BaseHTTPRequestHandler):
    def do_PUT(self):
        if self.path == "/latest/api/token":
            return self._reply(200, TOKEN)
        self._reply(404, "")

    def do_GET(self):
        if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
            return self._reply(401, "")
        if self.path == "/latest/meta-data/instance-id":
            return self._reply(200, INSTANCE_ID)
        self._reply(404, "")

    def _reply(self, status: int, body: str):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


http.server.HTTPServer(("169.254.169.254", 80), Metadata).serve_forever()
