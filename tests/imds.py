"""A VM's instance metadata service, as the cloud serves it, for one test host:

    nsenter --net=/run/netns/HOST python tests/imds.py ec2 INSTANCE_ID [ROLE CREDENTIALS]
    nsenter --net=/run/netns/HOST python tests/imds.py azure NAME RESOURCE_ID TOKEN

serves http://169.254.169.254/... inside that host's network (the address is the host's
own, on its loopback). EC2 (IMDSv2): a session token, then the instance's id with that
token, and for an instance with a profile its role's name and credentials (CREDENTIALS:
the JSON that STS's AssumeRole gave, as EC2 itself gets them for the instance). Azure (header Metadata: true on every request): the VM's name and resource id, and
an access token of its managed identity for Azure Resource Manager.
"""

import http.server
import json
import secrets
import sys

CLOUD = sys.argv[1]
SESSION = secrets.token_hex(16)
ROLES = "/latest/meta-data/iam/security-credentials/"


class Metadata(http.server.BaseHTTPRequestHandler):
    def do_PUT(self):
        if CLOUD == "ec2" and self.path == "/latest/api/token":
            return self._reply(200, SESSION)
        self._reply(404, "")

    def do_GET(self):
        if CLOUD == "ec2":
            if self.headers.get("X-aws-ec2-metadata-token") != SESSION:
                return self._reply(401, "")
            if self.path == "/latest/meta-data/instance-id":
                return self._reply(200, sys.argv[2])
            if len(sys.argv) > 3 and self.path.startswith(ROLES):
                return self._role(self.path[len(ROLES):].strip("/"))
            return self._reply(404, "")
        if self.headers.get("Metadata") != "true":
            return self._reply(400, '{"error": "Bad request. Required metadata header not specified"}')
        path = self.path.split("?")[0]
        if path == "/metadata/instance/compute/name":
            return self._reply(200, sys.argv[2])
        if path == "/metadata/instance/compute/resourceId":
            return self._reply(200, sys.argv[3])
        if path == "/metadata/identity/oauth2/token" and "resource=" in self.path:
            return self._reply(200, json.dumps({
                "access_token": sys.argv[4], "expires_in": "86399",
                "resource": "https://management.azure.com/", "token_type": "Bearer"},
                separators=(",", ":")))
        self._reply(404, "")

    def _role(self, name: str):
        role, credentials = sys.argv[3], json.loads(sys.argv[4])
        if not name:
            return self._reply(200, role)
        if name != role:
            return self._reply(404, "")
        self._reply(200, json.dumps({
            "Code": "Success", "LastUpdated": credentials["Expiration"], "Type": "AWS-HMAC",
            "AccessKeyId": credentials["AccessKeyId"],
            "SecretAccessKey": credentials["SecretAccessKey"],
            "Token": credentials["SessionToken"], "Expiration": credentials["Expiration"]}))

    def _reply(self, status: int, body: str):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


http.server.HTTPServer(("169.254.169.254", 80), Metadata).serve_forever()
