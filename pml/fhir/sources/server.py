"""A FHIR server over REST: search with paging, or a Bulk Data ``$export``.

Search asks for the filter's example resources with their Patients, label Observations and
masks included, following ``next`` links. Bulk export kicks off ``$export``, polls the status
URL and streams each NDJSON file. Both send the bearer token, retry 429 and 5xx answers with
backoff (honouring ``Retry-After``), and never follow a link to another host, so the token
is only ever sent to the configured server.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator
from urllib.parse import urljoin, urlparse

import httpx
import orjson

from pml.errors import StepFailed
from pml.fhir.report import CurationReport
from pml.fhir.sources.base import RawResource, ndjson_resources, unpack

RETRY_STATUS = {429, 500, 502, 503, 504}
MAX_PAGES = 100_000
MAX_RETRY_AFTER_S = 60.0
EXPORT_TYPES = "Patient,DocumentReference,Media,Observation"


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """NDJSON lines end at \\n only (JSON strings may hold U+2028 or NEL unescaped)."""
    rest = b""
    for chunk in chunks:
        rest += chunk
        *lines, rest = rest.split(b"\n")
        yield from lines
    if rest:
        yield rest


class ServerSource:
    root = None  # no local files: relative attachment URLs are refused

    def __init__(
        self,
        base_url: str,
        codes: list[str],
        *,
        token: str | None = None,
        mode: str = "search",
        page_size: int = 100,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        poll_timeout_s: float = 3600.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self.base_url = base_url.rstrip("/") + "/"
        self.codes = codes
        self.mode = mode
        self.page_size = page_size
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.poll_timeout_s = poll_timeout_s
        headers = {"Accept": "application/fhir+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.client = httpx.Client(headers=headers, timeout=60.0, transport=transport, follow_redirects=False)
        self.requests = 0  # for tests and logs: how many HTTP requests were made

    # -- plumbing ---------------------------------------------------------------------

    def _same_server(self, url: str) -> str:
        """The absolute URL, if it is on the configured server (same scheme, host and port)."""
        absolute = urljoin(self.base_url, url)
        there, here = urlparse(absolute), urlparse(self.base_url)
        if (there.scheme, there.netloc) != (here.scheme, here.netloc):
            raise StepFailed(
                f"the FHIR server sent a link to {there.scheme}://{there.netloc}, not its own "
                f"{here.scheme}://{here.netloc}; not followed (the token goes nowhere else)"
            )
        return absolute

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request with retries on 429/5xx and transport errors."""
        url = self._same_server(url)
        for attempt in range(self.max_retries + 1):
            self.requests += 1
            try:
                response = self.client.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                if attempt == self.max_retries:
                    raise StepFailed(f"the FHIR server did not answer ({type(exc).__name__}) after {attempt + 1} tries") from None
                time.sleep(self.backoff_s * 2**attempt)
                continue
            if response.status_code not in RETRY_STATUS:
                return response
            if attempt == self.max_retries:
                break
            time.sleep(self._retry_after(response, self.backoff_s * 2**attempt))
        raise StepFailed(f"the FHIR server answered HTTP {response.status_code} to {method} {urlparse(url).path} "
                         f"after {self.max_retries + 1} tries")

    @staticmethod
    def _retry_after(response: httpx.Response, default: float) -> float:
        value = response.headers.get("Retry-After", "")
        try:
            return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
        except ValueError:
            return default

    def _json(self, response: httpx.Response, what: str) -> dict[str, Any]:
        if response.status_code == 401 or response.status_code == 403:
            raise StepFailed(f"the FHIR server refused the account's token ({response.status_code}) for {what}")
        if response.status_code != 200:
            raise StepFailed(f"the FHIR server answered HTTP {response.status_code} for {what}")
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise StepFailed(f"the FHIR server's answer for {what} is not JSON") from None
        if not isinstance(data, dict):
            raise StepFailed(f"the FHIR server's answer for {what} is not a JSON object")
        return data

    # -- search -----------------------------------------------------------------------

    def _search(self, report: CurationReport) -> Iterator[RawResource]:
        codes = ",".join(self.codes)
        for kind in ("DocumentReference", "Media"):
            params: list[tuple[str, str | int]] = [
                ("type", codes), ("_count", self.page_size), ("_include", f"{kind}:subject"),
                ("_revinclude", "Observation:derived-from"),
            ]
            if kind == "DocumentReference":
                params.append(("_revinclude", "DocumentReference:relatesto"))
            url: str | None = f"{kind}"
            page = 0
            seen: set[str] = set()
            while url:
                if url in seen or page >= MAX_PAGES:
                    raise StepFailed(f"the FHIR server's {kind} search pages loop or go on past {MAX_PAGES} pages")
                seen.add(url)
                page += 1
                response = self._request("GET", url, params=params if page == 1 else None)
                if kind == "Media" and response.status_code in (400, 404):
                    break  # an R5 server has no Media
                bundle = self._json(response, f"{kind} search page {page}")
                yield from unpack(bundle, f"{kind}?page={page}", report)
                url = next(
                    (link.get("url") for link in bundle.get("link") or [] if link.get("relation") == "next"), None
                )

    # -- bulk export --------------------------------------------------------------------

    def _bulk(self, report: CurationReport, wanted: Callable[[bytes], bool] | None) -> Iterator[RawResource]:
        kickoff = self._request(
            "GET", "$export", params={"_type": EXPORT_TYPES, "_outputFormat": "application/fhir+ndjson"},
            headers={"Prefer": "respond-async"},
        )
        if kickoff.status_code != 202 or "Content-Location" not in kickoff.headers:
            raise StepFailed(f"the FHIR server did not accept the $export request (HTTP {kickoff.status_code})")
        status_url = kickoff.headers["Content-Location"]
        deadline = time.monotonic() + self.poll_timeout_s
        while True:
            status = self._request("GET", status_url)
            if status.status_code != 202:
                break
            if time.monotonic() > deadline:
                raise StepFailed(f"the $export did not finish within {self.poll_timeout_s:.0f} s")
            time.sleep(self._retry_after(status, 1.0))
        manifest = self._json(status, "the $export status")
        for i, item in enumerate(manifest.get("output") or []):
            url = item.get("url") if isinstance(item, dict) else None
            if not isinstance(url, str):
                report.skip(f"$export output[{i}]", "export output without a url")
                continue
            name = f"$export/{item.get('type', 'file')}[{i}]"
            yield from self._download(self._same_server(url), i, name, report, wanted)
        try:
            self._request("DELETE", status_url)  # the server may drop the files now
        except StepFailed:
            pass

    def _download(
        self, url: str, index: int, name: str, report: CurationReport, wanted: Callable[[bytes], bool] | None
    ) -> Iterator[RawResource]:
        """Stream one export file, retrying its start like any other request."""
        started = False
        for attempt in range(self.max_retries + 1):
            self.requests += 1
            try:
                with self.client.stream("GET", url, headers={"Accept": "application/fhir+ndjson"}) as response:
                    if response.status_code in RETRY_STATUS and attempt < self.max_retries:
                        time.sleep(self._retry_after(response, self.backoff_s * 2**attempt))
                        continue
                    if response.status_code != 200:
                        raise StepFailed(f"downloading $export file {index} answered HTTP {response.status_code}")
                    started = True
                    yield from ndjson_resources(_split_lines(response.iter_bytes()), name, report, wanted)
                    return
            except httpx.TransportError as exc:
                if started or attempt == self.max_retries:  # half a file read: not retried
                    raise StepFailed(f"downloading $export file {index} failed ({type(exc).__name__})") from None
                time.sleep(self.backoff_s * 2**attempt)

    def resources(self, report: CurationReport, wanted: Callable[[bytes], bool] | None = None) -> Iterator[RawResource]:
        try:
            if self.mode == "bulk":
                yield from self._bulk(report, wanted)
            else:
                yield from self._search(report)
        finally:
            self.client.close()
