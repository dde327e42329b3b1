"""Skip NDJSON lines that cannot matter without parsing them.

In a bulk export most lines are vital signs, labs, encounters: resources pml never uses.
A substring test on the raw bytes is far cheaper than parsing, so a line is parsed only when
it mentions a filter code, pml's label system, or a Patient or Bundle. The test is
conservative: a line it cannot read plainly (no ``"resourceType":`` key, or JSON ``\\u``
escapes) is parsed. A skipped line is counted as read; its JSON is not checked.
"""

from __future__ import annotations

from pml.fhir.records import LABEL_SYSTEM

# Plain substring tests (memchr-fast); a regex per line costs several times more here.
ALWAYS = (b'"Patient"', b'"Bundle"')  # resource types always read, contained ones too
RESOURCE_TYPE_KEY = (b'"resourceType":', b'"resourceType" :')


class LinePrefilter:
    def __init__(self, codes: list[str]):
        needles = {LABEL_SYSTEM.encode()}
        for code in codes:
            value = code.split("|")[-1].encode()
            needles.add(value)
            needles.add(value.replace(b"/", b"\\/"))  # some writers escape slashes
        self.needles = tuple(sorted(needles)) + ALWAYS + (b"\\u",)

    def __call__(self, line: bytes) -> bool:
        """True when the line must be parsed."""
        for needle in self.needles:
            if needle in line:
                return True
        return RESOURCE_TYPE_KEY[0] not in line and RESOURCE_TYPE_KEY[1] not in line
