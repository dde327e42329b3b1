"""Test helper: a small FHIR server on loopback that serves real resources.

No FHIR server installs from the registries this machine reaches (HAPI and the like need
Maven Central), so this serves the same resources pml's tests write (real scikit-learn
digit images) through the parts of the FHIR REST API pml uses: token search with
``_count`` paging, ``_include``/``_revinclude``, and Bulk Data ``$export`` (kick-off,
status polling, NDJSON files). It can answer 429/503 first, to test retries, and checks the
bearer token.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


class FhirTestServer:
    def __init__(self, resources: list[dict[str, Any]], token: str = "secret-token", flaky: int = 0,
                 raw_unicode: bool = False):
        self.raw_unicode = raw_unicode  # write non-ASCII characters unescaped, as UTF-8
        self.resources = resources
        self.token = token
        self.flaky = flaky  # answer this many requests with 429/503 before serving
        self.requests: list[str] = []
        self.export_polls = 0
        self.foreign_next = False  # a next link to another host (must not be followed)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.handle(self)

            def do_DELETE(self) -> None:
                server.requests.append("DELETE " + self.path)
                self.send_response(202)
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FhirTestServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- helpers ----------------------------------------------------------------------------

    def _send(self, handler: BaseHTTPRequestHandler, status: int, body: Any = None, headers: dict[str, str] | None = None,
              content_type: str = "application/fhir+json") -> None:
        data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        handler.send_response(status)
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _matches(self, resource: dict[str, Any], codes: set[str]) -> bool:
        for coding in (resource.get("type") or {}).get("coding", []):
            if coding.get("code") in codes or f"{coding.get('system')}|{coding.get('code')}" in codes:
                return True
        return False

    def _search(self, kind: str, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        codes = set(",".join(query.get("type", [])).split(","))
        hits = [r for r in self.resources if r["resourceType"] == kind and self._matches(r, codes)]
        return sorted(hits, key=lambda r: r["id"])

    def _with_includes(self, page: list[dict[str, Any]], query: dict[str, list[str]]) -> list[dict[str, Any]]:
        out = [{"resource": r, "search": {"mode": "match"}} for r in page]
        refs = {f"{r['resourceType']}/{r['id']}" for r in page}
        if any(v.endswith(":subject") for v in query.get("_include", [])):
            subjects = {r.get("subject", {}).get("reference") for r in page}
            out += [{"resource": r, "search": {"mode": "include"}} for r in self.resources
                    if r["resourceType"] == "Patient" and f"Patient/{r['id']}" in subjects]
        rev = query.get("_revinclude", [])
        for r in self.resources:
            if "Observation:derived-from" in rev and r["resourceType"] == "Observation" and any(
                d.get("reference") in refs for d in r.get("derivedFrom", [])
            ):
                out.append({"resource": r, "search": {"mode": "include"}})
            if "DocumentReference:relatesto" in rev and r["resourceType"] == "DocumentReference" and any(
                (x.get("target") or {}).get("reference") in refs for x in r.get("relatesTo", [])
            ):
                out.append({"resource": r, "search": {"mode": "include"}})
        return out

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        self.requests.append("GET " + handler.path)
        if handler.headers.get("Authorization") != f"Bearer {self.token}":
            self._send(handler, 401, {"resourceType": "OperationOutcome"})
            return
        if self.flaky > 0:
            self.flaky -= 1
            self._send(handler, 429 if self.flaky % 2 else 503, None, {"Retry-After": "0"})
            return
        url = urlparse(handler.path)
        query = parse_qs(url.query)
        path = url.path.removeprefix("/fhir/")
        if path in ("DocumentReference", "Media"):
            hits = self._search(path, query)
            count = int(query.get("_count", ["10"])[0])
            offset = int(query.get("_offset", ["0"])[0])
            page = hits[offset : offset + count]
            bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(hits),
                                      "entry": self._with_includes(page, query), "link": []}
            if offset + count < len(hits):
                rest = {k: v for k, v in query.items() if k != "_offset"}
                params = "&".join(f"{k}={x}" for k, vs in rest.items() for x in vs)
                host = "http://evil.example" if self.foreign_next else self.base_url.rsplit("/fhir", 1)[0]
                bundle["link"].append({"relation": "next", "url": f"{host}/fhir/{path}?{params}&_offset={offset + count}"})
            self._send(handler, 200, bundle)
        elif path == "$export":
            if handler.headers.get("Prefer") != "respond-async":
                self._send(handler, 400, {"resourceType": "OperationOutcome"})
                return
            self._send(handler, 202, None, {"Content-Location": f"{self.base_url}/export-status/1"})
        elif path == "export-status/1":
            self.export_polls += 1
            if self.export_polls < 3:
                self._send(handler, 202, None, {"Retry-After": "0", "X-Progress": "in progress"})
                return
            kinds = sorted({r["resourceType"] for r in self.resources})
            output = [{"type": k, "url": f"{self.base_url}/export-files/{k}.ndjson"} for k in kinds]
            self._send(handler, 200, {"transactionTime": "2026-01-01T00:00:00Z", "request": "$export",
                                      "requiresAccessToken": True, "output": output, "error": []},
                       content_type="application/json")
        elif path.startswith("export-files/"):
            kind = path.removeprefix("export-files/").removesuffix(".ndjson")
            lines = [json.dumps(r, ensure_ascii=not self.raw_unicode) for r in self.resources if r["resourceType"] == kind]
            self._send(handler, 200, ("\n".join(lines) + "\n").encode(), content_type="application/fhir+ndjson")
        else:
            self._send(handler, 404, {"resourceType": "OperationOutcome"})
