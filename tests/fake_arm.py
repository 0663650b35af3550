"""Azure Resource Manager, replayed: the answers Azure gives to what cloudlab asks, with
state, so that the real SDK clients (azure-mgmt-*) run their whole pipeline against it.

No live Azure endpoint can be reached here. :class:`ArmTransport` is an azure-core
transport: the SDK serialises each request, sends it through its policies (bearer token,
retries, long-running-operation polling) and deserialises what comes back, exactly as with
Azure; only the last hop is replaced. Answers follow Azure's wire format as documented in
the REST API reference: resource ids and ``properties``, ``provisioningState``, 201/202 with
``Azure-AsyncOperation`` and ``Location`` headers for long-running operations (one poll
"InProgress" before "Succeeded"), ``{"error": {"code", "message"}}`` bodies, 404 for what
is gone. Public addresses come from a pool given by the test, private ones from the subnet
(Azure keeps .0 to .3). A VM created with a system-assigned identity gets a principal id,
and its identity may delete that VM only once a role assignment at the VM's scope grants
it: :meth:`FakeArm.serve` answers the VMs' own requests over HTTP, with that check.

Errors Azure returns and this cannot cause (no capacity, no quota, no right to assign
roles) are queued with :meth:`FakeArm.fail_next`.
"""

from __future__ import annotations

import datetime as dt
import http.server
import itertools
import json
import re
import threading
import time
import urllib.parse
import uuid
from typing import Callable

from azure.core.credentials import AccessToken, AccessTokenInfo
from azure.core.pipeline._tools import is_rest
from azure.core.pipeline.transport import HttpResponse as LegacyResponse
from azure.core.pipeline.transport import HttpTransport
from azure.core.rest._http_response_impl import HttpResponseImpl

TOKEN = "cloudlab-test-token"  # the client's (a user's) bearer token
SIZES = {"Standard_D2s_v5": 2, "Standard_D4s_v5": 4, "Standard_NC4as_T4_v3": 4}
TYPES = {
    "networksecuritygroups": "Microsoft.Network/networkSecurityGroups",
    "virtualnetworks": "Microsoft.Network/virtualNetworks",
    "publicipaddresses": "Microsoft.Network/publicIPAddresses",
    "networkinterfaces": "Microsoft.Network/networkInterfaces",
    "virtualmachines": "Microsoft.Compute/virtualMachines",
}


class Credential:
    """A user's credential, as azure-identity's would give (a bearer token)."""

    def get_token(self, *scopes, **kwargs) -> AccessToken:
        return AccessToken(TOKEN, int(time.time()) + 3600)

    def get_token_info(self, *scopes, options=None) -> AccessTokenInfo:
        return AccessTokenInfo(TOKEN, int(time.time()) + 3600)


class FakeArm:
    def __init__(self, public_pool: list[str], on_vm: Callable | None = None,
                 on_vm_gone: Callable | None = None):
        self.resources: dict[str, dict] = {}  # lower-case id -> resource, as Azure shows it
        self.groups: dict[str, dict] = {}  # lower-case name -> resource group
        self.role_assignments: list[dict] = []
        self.custom_data: dict[str, str] = {}  # VM id -> its custom data (never shown back)
        self.requests: list[tuple[str, str, str]] = []  # method, path, whose token
        self._operations: dict[str, int] = {}  # id -> polls left before it succeeds
        self._failures: list[tuple[str, str, int, str, str]] = []
        self._public = list(public_pool)
        self._private: dict[str, itertools.count] = {}
        self._lock = threading.RLock()
        self.on_vm, self.on_vm_gone = on_vm, on_vm_gone
        self.vm_power: dict[str, str] = {}  # VM id -> PowerState
        self.unregistered: set[str] = set()  # resource providers not registered
        self.restricted: set[str] = set()  # sizes NotAvailableForSubscription
        self.usages = {"cores": ("Total Regional vCPUs", 0, 10),
                       "standardDSv5Family": ("Standard DSv5 Family vCPUs", 0, 10),
                       "lowPriorityCores": ("Total Regional Low-priority vCPUs", 0, 3)}

    def _sku(self, name: str, cores: int) -> dict:
        return {"resourceType": "virtualMachines", "name": name, "tier": "Standard",
                "family": "standardNCASv3_T4Family" if "NC" in name else "standardDSv5Family",
                "locations": ["eastus"],
                "capabilities": [{"name": "vCPUs", "value": str(cores)},
                                 {"name": "MemoryGB", "value": str(4 * cores)}],
                "restrictions": [{"type": "Location", "values": ["eastus"],
                                  "reasonCode": "NotAvailableForSubscription"}]
                if name in self.restricted else []}

    def fail_next(self, method: str, path_part: str, status: int, code: str, message: str):
        """The next ``method`` request whose path holds ``path_part`` gets this error."""
        self._failures.append((method, path_part.lower(), status, code, message))

    # ------------------------------------------------------------------ dispatch
    def handle(self, method: str, url: str, headers, body: bytes | None):
        """(status, headers, JSON body or None) for one request."""
        parts = urllib.parse.urlsplit(url)
        path, query = parts.path.rstrip("/"), urllib.parse.parse_qs(parts.query)
        token = (headers.get("Authorization") or "").removeprefix("Bearer ")
        with self._lock:
            self.requests.append((method, path, "client" if token == TOKEN else "identity"))
            for failure in self._failures:
                if failure[0] == method and failure[1] in path.lower():
                    self._failures.remove(failure)
                    return _error(failure[2], failure[3], failure[4])
            if token != TOKEN and not self._identity_may(token, method, path):
                return _error(403, "AuthorizationFailed", f"The client with token "
                              f"'{token[:8]}...' does not have authorization to perform "
                              f"action '{method}' over scope '{path}'.")
            document = json.loads(body) if body else None
            return self._route(method, path, query, document)

    def _route(self, method, path, query, document):
        low = path.lower()
        if low.startswith("/fake/operations/"):
            return self._poll(low.rsplit("/", 1)[1], "location" in query.get("kind", []))
        if m := re.fullmatch(r"/subscriptions/[^/]+/resourcegroups", low):
            return self._list_groups(query)
        if m := re.fullmatch(r"/subscriptions/[^/]+/resourcegroups/([^/]+)", low):
            return self._group(method, path, m.group(1), document)
        if m := re.fullmatch(r"/subscriptions/[^/]+/providers/(microsoft\.[a-z]+)", low):
            return 200, {}, {"namespace": m.group(1), "registrationState":
                             "NotRegistered" if m.group(1) in self.unregistered else "Registered"}
        if re.fullmatch(r"/subscriptions/[^/]+/providers/microsoft.compute/skus", low):
            return 200, {}, {"value": [self._sku(n, c) for n, c in SIZES.items()]}
        if m := re.fullmatch(r"/subscriptions/[^/]+/providers/microsoft.compute/locations/"
                             r"[^/]+/usages", low):
            return 200, {}, {"value": [
                {"name": {"value": n, "localizedValue": label}, "currentValue": used,
                 "limit": limit, "unit": "Count"}
                for n, (label, used, limit) in self.usages.items()]}
        if m := re.fullmatch(r"/subscriptions/[^/]+/providers/microsoft.compute/locations/"
                             r"([^/]+)/publishers/([^/]+)/artifacttypes/vmimage/offers/([^/]+)/"
                             r"skus/([^/]+)/versions", low):
            if m.group(2, 3, 4) != ("canonical", "ubuntu-24_04-lts", "server"):
                return _error(404, "NotFound", "Artifact: VMImage was not found.")
            return 200, {}, [{"name": v, "location": m.group(1), "id": f"{path}/{v}"}
                             for v in ("24.04.202410170", "24.04.202411030")]
        if m := re.fullmatch(r"/subscriptions/[^/]+/providers/microsoft.compute/locations/"
                             r"([^/]+)/vmsizes", low):
            return 200, {}, {"value": [{"name": n, "numberOfCores": c, "memoryInMB": 8192 * c}
                                       for n, c in SIZES.items()]}
        if m := re.fullmatch(r"(.+)/providers/microsoft.authorization/roleassignments/([^/]+)",
                             low):
            return self._assign(path, m.group(1), document)
        if m := re.fullmatch(r"/subscriptions/[^/]+/resourcegroups/([^/]+)/providers/"
                             r"([^/]+)/([^/]+)", low):
            return self._list(m.group(1), m.group(3))
        if m := re.fullmatch(r"/subscriptions/[^/]+/resourcegroups/([^/]+)/providers/"
                             r"([^/]+)/([^/]+)/([^/]+)", low):
            return self._resource(method, path, m.group(1), m.group(3), document, query)
        return _error(404, "NotFound", f"No route for {method} {path}.")

    # ------------------------------------------------------------------ groups
    def _list_groups(self, query):
        groups = list(self.groups.values())
        if f := query.get("$filter"):
            m = re.fullmatch(r"tagName eq '([^']+)'", f[0])
            groups = [g for g in groups if m and m.group(1) in (g.get("tags") or {})]
        return 200, {}, {"value": groups}

    def _group(self, method, path, name, document):
        if method == "PUT":
            group = {"id": path, "name": path.rsplit("/", 1)[1],
                     "type": "Microsoft.Resources/resourceGroups",
                     "location": document["location"], "tags": document.get("tags", {}),
                     "properties": {"provisioningState": "Succeeded"}}
            status = 200 if name in self.groups else 201
            self.groups[name] = group
            return status, {}, group
        if name not in self.groups:
            return _error(404, "ResourceGroupNotFound",
                          f"Resource group '{name}' could not be found.")
        if method == "GET":
            return 200, {}, self.groups[name]
        if method == "DELETE":
            for key in [k for k in self.resources if f"/resourcegroups/{name}/" in k]:
                self._remove(key)
            del self.groups[name]
            return 202, self._operation(location=True), None
        return _error(405, "MethodNotAllowed", method)

    # ------------------------------------------------------------------ resources
    def _list(self, group, kind):
        if group not in self.groups:
            return _error(404, "ResourceGroupNotFound",
                          f"Resource group '{group}' could not be found.")
        found = [self._shown(r) for k, r in self.resources.items()
                 if f"/resourcegroups/{group}/" in k and r["type"].lower().endswith("/" + kind)]
        return 200, {}, {"value": found}

    def _resource(self, method, path, group, kind, document, query):
        key = path.lower()
        if method == "PUT":
            if group not in self.groups:
                return _error(404, "ResourceGroupNotFound",
                              f"Resource group '{group}' could not be found.")
            return self._put(path, kind, document)
        if key not in self.resources:
            return _error(404, "ResourceNotFound", f"The Resource '{TYPES.get(kind, kind)}/"
                          f"{path.rsplit('/', 1)[1]}' under resource group '{group}' was not "
                          f"found.")
        if method == "GET":
            shown = self._shown(self.resources[key])
            if kind == "virtualmachines" and "instanceView" in query.get("$expand", []):
                shown["properties"]["instanceView"] = {"statuses": [
                    {"code": "ProvisioningState/succeeded", "level": "Info"},
                    {"code": f"PowerState/{self.vm_power.get(key, 'running')}",
                     "level": "Info"}]}
            return 200, {}, shown
        if method == "DELETE":
            self._remove(key)
            return 202, self._operation(location=True), None
        return _error(405, "MethodNotAllowed", method)

    def _put(self, path, kind, document):
        key = path.lower()
        properties = document.setdefault("properties", {})
        resource = {**document, "id": path, "name": path.rsplit("/", 1)[1],
                    "type": TYPES[kind], "properties": properties}
        properties["provisioningState"] = "Succeeded"
        if kind == "virtualnetworks":
            for subnet in properties.get("subnets", []):
                subnet["id"] = f"{path}/subnets/{subnet['name']}"
                subnet.setdefault("properties", {})["provisioningState"] = "Succeeded"
                self._private.setdefault(subnet["id"].lower(), itertools.count(4))
        elif kind == "publicipaddresses":
            properties["ipAddress"] = self._public.pop(0)
        elif kind == "networkinterfaces":
            for configuration in properties["ipConfigurations"]:
                subnet = configuration["properties"]["subnet"]["id"]
                prefix = self._subnet_prefix(subnet)
                configuration["id"] = f"{path}/ipConfigurations/{configuration['name']}"
                configuration["properties"]["privateIPAddress"] = (
                    f"{prefix.rsplit('.', 1)[0]}.{next(self._private[subnet.lower()])}")
        elif kind == "virtualmachines":
            if key in self.resources:
                return _error(409, "PropertyChangeNotAllowed", "Changing property "
                              "'osProfile' is not allowed.")
            if document.get("identity", {}).get("type") == "SystemAssigned":
                document["identity"].update(principalId=str(uuid.uuid4()),
                                            tenantId=str(uuid.uuid4()))
            os_profile = properties.get("osProfile", {})
            self.custom_data[key] = os_profile.pop("customData", "")
            properties.update(vmId=str(uuid.uuid4()), timeCreated=dt.datetime.now(
                dt.timezone.utc).isoformat())
            self.resources[key] = resource
            self.vm_power[key] = "running"
            if self.on_vm:
                self.on_vm(self, resource)
            shown = self._shown(resource)
            shown["properties"]["provisioningState"] = "Creating"
            return 201, self._operation(), shown
        status = 200 if key in self.resources else 201
        self.resources[key] = resource
        if kind in ("virtualnetworks", "networksecuritygroups", "publicipaddresses",
                    "networkinterfaces"):
            shown = self._shown(resource)
            shown["properties"]["provisioningState"] = "Updating"
            return status, self._operation(), shown
        return status, {}, self._shown(resource)

    def _subnet_prefix(self, subnet_id: str) -> str:
        vnet = self.resources[subnet_id.lower().rsplit("/subnets/", 1)[0]]
        for subnet in vnet["properties"]["subnets"]:
            if subnet["id"].lower() == subnet_id.lower():
                return subnet["properties"]["addressPrefix"].split("/")[0]
        raise KeyError(subnet_id)

    def _remove(self, key: str) -> None:
        resource = self.resources.pop(key, None)
        if resource is None or not resource["type"].endswith("virtualMachines"):
            return
        self.vm_power.pop(key, None)
        properties = resource["properties"]
        # What the VM was created to take with it (deleteOption: Delete).
        deletes = lambda ref: ref.get("properties", {}).get("deleteOption") == "Delete"  # noqa: E731
        for nic_ref in properties["networkProfile"]["networkInterfaces"]:
            if not deletes(nic_ref):
                continue
            nic = self.resources.pop(nic_ref["id"].lower(), None)
            for configuration in (nic or {}).get("properties", {}).get("ipConfigurations", []):
                address = configuration["properties"].get("publicIPAddress")
                if address and deletes(address):
                    self.resources.pop(address["id"].lower(), None)
        if self.on_vm_gone:
            self.on_vm_gone(self, resource)

    def _shown(self, resource: dict) -> dict:
        return json.loads(json.dumps(resource))

    # ------------------------------------------------------------------ identity
    def _assign(self, path, scope, document):
        principal = document["properties"]["principalId"]
        if not any(r.get("identity", {}).get("principalId") == principal
                   for r in self.resources.values()):
            return _error(400, "PrincipalNotFound", f"Principal {principal} does not exist "
                          f"in the directory.")
        assignment = {"id": path, "name": path.rsplit("/", 1)[1],
                      "type": "Microsoft.Authorization/roleAssignments",
                      "properties": {**document["properties"], "scope": scope}}
        self.role_assignments.append(assignment)
        return 201, {}, assignment

    def identity_token(self, vm: dict) -> str:
        return f"mi-{vm['identity']['principalId']}"

    def _identity_may(self, token: str, method: str, path: str) -> bool:
        """A VM's identity may delete its own VM, if a role assignment says so."""
        if not token.startswith("mi-") or method != "DELETE":
            return False
        principal = token.removeprefix("mi-")
        return any(a["properties"]["principalId"] == principal and
                   a["properties"]["scope"] == path.lower() and
                   a["properties"]["roleDefinitionId"].endswith(
                       "/9980e02c-c2be-4d73-94e8-173b1dc7cf3c")
                   for a in self.role_assignments)

    # ------------------------------------------------------------------ operations
    def _operation(self, location: bool = False) -> dict:
        operation = uuid.uuid4().hex
        self._operations[operation] = 1
        url = f"https://management.azure.com/fake/operations/{operation}"
        headers = {"Azure-AsyncOperation": url, "Retry-After": "0"}
        if location:
            headers["Location"] = url + "?kind=location"
        return headers

    def _poll(self, operation: str, location: bool):
        left = self._operations.get(operation)
        if left is None:
            return _error(404, "NotFound", "No such operation.")
        if left > 0:
            self._operations[operation] = left - 1
            if location:
                return 202, {"Location": f"https://management.azure.com/fake/operations/"
                                         f"{operation}?kind=location", "Retry-After": "0"}, None
            return 200, {"Retry-After": "0"}, {"status": "InProgress"}
        return 200, {}, ({} if location else {"status": "Succeeded"})

    # ------------------------------------------------------------------ HTTP
    def serve(self, address: str) -> tuple[http.server.ThreadingHTTPServer, str]:
        """Answer over HTTP at ``address`` (the VMs' own calls); (server, its base URL)."""
        arm = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                status, headers, document = arm.handle(self.command, self.path, self.headers,
                                                       self.rfile.read(length) or None)
                body = b"" if document is None else json.dumps(document).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_DELETE = do_POST = _any

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer((address, 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://{address}:{server.server_port}"


def _error(status: int, code: str, message: str):
    return status, {}, {"error": {"code": code, "message": message}}


class _Response(HttpResponseImpl):
    def __init__(self, request, status: int, headers: dict, body: bytes):
        super().__init__(request=request, internal_response=None, status_code=status,
                         reason=http.HTTPStatus(status).phrase, headers=headers,
                         content_type=headers.get("Content-Type"), block_size=4096,
                         stream_download_generator=None)
        self._content = body
        self._is_closed = self._is_stream_consumed = True


class _LegacyResponse(LegacyResponse):
    """For SDK clients still on azure-core's older request type (azure-mgmt-authorization)."""

    def __init__(self, request, status: int, headers: dict, body: bytes):
        super().__init__(request, None)
        self.status_code, self.headers, self._body = status, headers, body
        self.reason = http.HTTPStatus(status).phrase
        self.content_type = headers.get("Content-Type")

    def body(self) -> bytes:
        return self._body


class ArmTransport(HttpTransport):
    """The SDK's last hop, to a :class:`FakeArm` instead of Azure."""

    def __init__(self, arm: FakeArm):
        self.arm = arm

    def send(self, request, **kwargs):
        content = request.content if is_rest(request) else request.data
        if isinstance(content, str):
            content = content.encode()
        status, headers, body = self._exchange(request.method, request.url,
                                               dict(request.headers), content)
        headers = {**headers, "Content-Type": "application/json; charset=utf-8",
                   "x-ms-request-id": str(uuid.uuid4())}
        kind = _Response if is_rest(request) else _LegacyResponse
        return kind(request, status, headers, body)

    def _exchange(self, method, url, headers, content) -> tuple[int, dict, bytes]:
        status, headers, document = self.arm.handle(method, url, headers, content)
        return status, headers, b"" if document is None else json.dumps(document).encode()

    def open(self):
        pass

    def close(self):
        pass

    def __exit__(self, *exc):
        pass


class ForwardTransport(ArmTransport):
    """The same, for a client in another process: to :meth:`FakeArm.serve`'s HTTP face."""

    def __init__(self, url: str):
        self.url = url

    def _exchange(self, method, url, headers, content) -> tuple[int, dict, bytes]:
        import urllib.error
        import urllib.request

        parts = urllib.parse.urlsplit(url)
        request = urllib.request.Request(f"{self.url}{parts.path}?{parts.query}", data=content,
                                         method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                return reply.status, dict(reply.headers), reply.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()
