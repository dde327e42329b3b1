"""Skip NDJSON lines that cannot matter without parsing them.

In a bulk export most lines are vital signs, labs, encounters: resources pml never uses.
Tests on the raw bytes are far cheaper than parsing. When a line starts with its
``resourceType`` (as bulk exports write them), the type decides: Patient and Bundle are
parsed, other types than DocumentReference, Media and Observation are skipped, and those
three are parsed when they mention a filter code or pml's label system. Other lines are
parsed when they mention any of those or a Patient or Bundle, or have no plain
``"resourceType":`` key, or use JSON ``\\u`` escapes. A skipped line is counted as read;
its JSON is not checked.
"""

from __future__ import annotations

import orjson

from pml.fhir.codes import LABEL_SYSTEM

# Plain substring tests (memchr-fast); a regex per line costs several times more here.
ALWAYS = (b'"Patient"', b'"Bundle"')  # resource types always read, contained ones too
RESOURCE_TYPE_KEY = (b'"resourceType":', b'"resourceType" :')
# Bulk exports write resourceType first: then the type is read off the line's start.
LEADING = b'{"resourceType":"'
READ_WHOLE = frozenset({b"Patient", b"Bundle"})
CODED = frozenset({b"DocumentReference", b"Media", b"Observation"})


class LinePrefilter:
    def __init__(self, codes: list[str]):
        needles = {LABEL_SYSTEM.encode()}
        for code in codes:
            value = code.split("|")[-1]
            raw = value.encode()
            needles.add(raw)
            needles.add(raw.replace(b"/", b"\\/"))  # some writers escape slashes
            needles.add(orjson.dumps(value)[1:-1])  # as JSON writes it (quotes, backslashes)
        # JSON \u escapes could hide a needle: such lines are parsed too.
        self.coded_needles = tuple(sorted(needles)) + (b"\\u",)
        self.needles = self.coded_needles + ALWAYS

    def __call__(self, line: bytes) -> bool:
        """True when the line must be parsed."""
        if line.startswith(LEADING):
            end = line.find(b'"', len(LEADING))
            kind = line[len(LEADING) : end]
            if end > 0 and b"\\" not in kind:
                if kind in READ_WHOLE:
                    return True
                if kind not in CODED:
                    return False  # pml reads nothing else, and nothing contained in it
                for needle in self.coded_needles:
                    if needle in line:
                        return True
                return False
        # Any other layout: the conservative test over the whole line.
        for needle in self.needles:
            if needle in line:
                return True
        return RESOURCE_TYPE_KEY[0] not in line and RESOURCE_TYPE_KEY[1] not in line


# A line that starts with these bytes is read in full whatever its type ends up being.
_NEWLINE_LEADING = b"\n" + LEADING


class ChunkPrefilter:
    """The same decision as ``LinePrefilter``, made for a whole block of lines at once.

    Scanning a block for the few needles with ``bytes.find`` runs at memory speed, so the
    lines that cannot matter cost no Python work at all; only lines near a hit, lines that
    do not start with ``resourceType``, and Patient and Bundle lines are looked at.
    """

    def __init__(self, line_filter: LinePrefilter):
        self.line_filter = line_filter
        self.markers = line_filter.coded_needles

    @staticmethod
    def _occurrences(block: bytes, needle: bytes) -> list[int]:
        found, at = [], block.find(needle)
        while at != -1:
            found.append(at)
            at = block.find(needle, at + len(needle))
        return found

    def candidates(self, block: bytes) -> list[int]:
        """Start offsets of the lines of ``block`` (whole, ``\\n``-ended lines) to parse.

        Exactly the lines ``LinePrefilter`` would parse: every line holding a marker, every
        line starting as a Patient or Bundle, every line not starting with resourceType,
        each then decided by the line filter itself.
        """
        starts: set[int] = set()
        for needle in self.markers:
            for at in self._occurrences(block, needle):
                starts.add(block.rfind(b"\n", 0, at) + 1)
        for kind in READ_WHOLE:
            head = LEADING + kind + b'"'
            if block.startswith(head):
                starts.add(0)
            for at in self._occurrences(block, b"\n" + head):
                starts.add(at + 1)
        regular = block.count(_NEWLINE_LEADING) + block.startswith(LEADING)
        if regular < block.count(b"\n"):
            # Some lines do not start with resourceType: find them one by one (rare).
            position = 0
            while position < len(block):
                if not block.startswith(LEADING, position):
                    starts.add(position)
                end = block.find(b"\n", position)
                position = len(block) if end == -1 else end + 1
        return sorted(s for s in starts if self._wanted_at(block, s))

    def _wanted_at(self, block: bytes, start: int) -> bool:
        end = block.find(b"\n", start)
        return self.line_filter(block[start : len(block) if end == -1 else end])
