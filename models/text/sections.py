"""Split a free-text radiology report into named sections and pull out FINDINGS + IMPRESSION.

The rules follow MIT-LCP's MIMIC-CXR section parser (REFERENCE.md §4.1) because ECAMP, MRM and most
MIMIC-CXR pre-training work read reports that way:

* a header is an upper-case name at the start of a line followed by a colon (``FINDINGS:``);
* the text before the first header is the ``preamble``; a text without any header is the ``full report``;
* header names are normalised (``conclusion`` -> impression, typos such as ``impresson`` / ``findngs``,
  view titles such as ``CHEST, PA AND LATERAL`` -> findings);
* empty findings/impression sections are dropped;
* when neither findings nor impression exists, the paragraphs after the first one in the last section
  become a ``last_paragraph`` section (MIMIC reports without headers end with their body text).

Differences from the MIT-LCP code, on purpose: headers may be indented by any amount of spaces (manifest
reports are not MIMIC-formatted), mixed-case headers (``Findings:``) count when they are a known section
name, ``ndication`` maps to indication (MIT-LCP maps it to impression) and ``concusion`` / ``coinclusion``
map to impression (MIT-LCP leaves them as ``conclusion``, which nothing reads).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Known header spellings (lower case) -> normalised section name. Typos are the ones seen in MIMIC-CXR.
SECTION_NAMES: dict[str, str] = {
    "preamble": "preamble",
    "full report": "full report",
    # impression and its synonyms / typos
    "impression": "impression",
    "impressions": "impression",
    "conclusion": "impression",
    "conclusions": "impression",
    "concusion": "impression",
    "coinclusion": "impression",
    "findings and impression": "impression",
    "findings/impression": "impression",
    "findings/ impression": "impression",
    "impresson": "impression",
    "imprression": "impression",
    "imoression": "impression",
    "impressoin": "impression",
    "imprssion": "impression",
    "impresion": "impression",
    "imperssion": "impression",
    "mpression": "impression",
    "impession": "impression",
    # findings and its synonyms / typos
    "findings": "findings",
    "finding": "findings",
    "findins": "findings",
    "findindgs": "findings",
    "findgings": "findings",
    "findngs": "findings",
    "findnings": "findings",
    "finidngs": "findings",
    "reference findings": "findings",
    "chest, two views": "findings",
    # comparison
    "comparison": "comparison",
    "comparisons": "comparison",
    "comparison exam": "comparison",
    "comparison film": "comparison",
    "reference exam": "comparison",
    "comparision": "comparison",
    "comparsion": "comparison",
    "comparrison": "comparison",
    "comparisions": "comparison",
    # indication
    "indication": "indication",
    "indications": "indication",
    "clinical indication": "indication",
    "reason for exam": "indication",
    "reason for examination": "indication",
    "idication": "indication",
    "ndication": "indication",
    # history
    "history": "history",
    "clinical history": "history",
    "clinical information": "history",
    "patient history": "history",
    "pfi": "history",
    # examination / technique
    "examination": "examination",
    "exam": "examination",
    "type of examination": "examination",
    "technique": "technique",
    # the rest
    "notification": "notification",
    "recommendation": "recommendations",
    "recommendations": "recommendations",
    "recommendation(s)": "recommendations",
    "addendum": "addendum",
    "date": "date",
    "comment": "comment",
    "wet read": "wet read",
    "wetread": "wet read",
}

# A header containing one of these words is that section ("PRELIMINARY IMPRESSION" -> impression).
MAIN_SECTIONS = ("impression", "findings", "history", "comparison", "addendum")

# Headers that name the view of the study describe the whole study, i.e. they are findings.
VIEW_TITLE = re.compile(
    r"chest|portable|pa and lateral|lateral and pa|ap and lateral|lateral and ap|frontal and|two "
    r"views|frontal view|pa view|ap view|one view|lateral view|bone window|frontal upright|frontal "
    r"semi-upright|ribs|pa and lat"
)

# Any line-initial "Name:" candidate; whether it is a header is decided by `_is_header`.
HEADER = re.compile(r"^[ \t]*([A-Za-z][A-Za-z ()/,-]*?)[ \t]*:(?=\s|$)", re.MULTILINE)
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
TITLE_LINE = re.compile(r"^\s*FINAL REPORT[ \t]*(\n|$)")
WHITESPACE = re.compile(r"\s+")
LINE_END = re.compile(r"\r\n?")


@dataclass(frozen=True)
class Section:
    name: str  # normalised name, e.g. "impression"
    header: str  # the header as written, "" for preamble / full report / last_paragraph
    start: int  # character offset of the section text in the report
    text: str


@dataclass(frozen=True)
class ReportSections:
    """What a report contributes to pre-training: its findings and impression, cleaned."""

    findings: str
    impression: str
    origin: str  # "sections" | "last_paragraph" | "full_report" | "none"
    section_names: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(part for part in (self.findings, self.impression) if part)


def normalize_section_name(header: str) -> str:
    """Map a header as written to its normalised section name (unknown names are kept, lower-cased)."""
    name = WHITESPACE.sub(" ", header).strip().lower()
    if name in SECTION_NAMES:
        return SECTION_NAMES[name]
    for main in MAIN_SECTIONS:
        if main in name:
            return main
    if VIEW_TITLE.search(name):
        return "findings"
    return name


def _is_header(name: str) -> bool:
    """MIMIC headers are all caps; a mixed-case 'Findings:' only counts when it is a known section name."""
    if name.isupper():
        return True
    return WHITESPACE.sub(" ", name).strip().lower() in SECTION_NAMES


def split_sections(text: str) -> list[Section]:
    """Cut `text` into sections at its headers, applying the MIMIC rules listed in the module docstring."""
    headers = [m for m in HEADER.finditer(text) if _is_header(m.group(1))]
    if not headers:
        sections = [Section("full report", "", 0, text)]
    else:
        sections = [Section("preamble", "", 0, text[: headers[0].start()])]
        for match, following in zip(headers, [*headers[1:], None], strict=True):
            end = following.start() if following is not None else len(text)
            name = normalize_section_name(match.group(1))
            sections.append(Section(name, match.group(1).strip(), match.end(), text[match.end() : end]))
    sections = [s for s in sections if not (s.name in ("findings", "impression") and not s.text.strip())]
    names = {s.name for s in sections}
    if "findings" not in names and "impression" not in names and sections:
        sections = _split_last_paragraph(sections)
    return sections


def _split_last_paragraph(sections: list[Section]) -> list[Section]:
    """Keep the first paragraph of the last section in place; the paragraphs after it form
    `last_paragraph`."""
    last = sections[-1]
    body = last.text
    # Skip leading blank lines so the "first paragraph" is the first one with text.
    lead = len(body) - len(body.lstrip())
    brk = PARAGRAPH_BREAK.search(body, lead)
    if brk is None:
        return sections
    rest = body[brk.end() :]
    if not rest.strip():
        return sections
    head = Section(last.name, last.header, last.start, body[: brk.start()])
    tail = Section("last_paragraph", "", last.start + brk.end(), rest)
    return [*sections[:-1], head, tail]


def normalize_line_ends(text: str) -> str:
    """LF line ends and no byte-order mark: the rules above are written for "\\n", and a report from a
    Windows tool (Excel's "CSV UTF-8" writes a BOM and CRLF) would otherwise lose its paragraph breaks
    and its "FINAL REPORT" title line to the stray "\\r"."""
    return LINE_END.sub("\n", text.removeprefix("\ufeff"))


def clean_text(text: str) -> str:
    """Collapse all whitespace (MIMIC's one-space-indented, 79-column lines) into single spaces."""
    return WHITESPACE.sub(" ", text).strip()


def extract_findings_impression(text: str) -> ReportSections:
    """FINDINGS and IMPRESSION of a report, with the fallbacks real reports need.

    * Several findings (or impression) sections are joined in report order, so a view-title section
      ("CHEST, PA AND LATERAL:") and a FINDINGS section both count.
    * No header at all: the whole text (minus a "FINAL REPORT" title line) is findings.
    * Headers but no findings/impression: the `last_paragraph` section is used as findings.
    * Otherwise `origin` is "none" and both fields are empty; the caller rejects the report.

    CRLF and CR line ends are read as LF first (`normalize_line_ends`).
    """
    body = TITLE_LINE.sub("", normalize_line_ends(text), count=1)
    sections = split_sections(body)
    names = [s.name for s in sections]
    if names[0] == "full report":
        return ReportSections(clean_text(body), "", "full_report" if body.strip() else "none", names)
    findings = clean_text(" ".join(s.text for s in sections if s.name == "findings"))
    impression = clean_text(" ".join(s.text for s in sections if s.name == "impression"))
    if findings or impression:
        return ReportSections(findings, impression, "sections", names)
    last = clean_text(" ".join(s.text for s in sections if s.name == "last_paragraph"))
    if last:
        return ReportSections(last, "", "last_paragraph", names)
    return ReportSections("", "", "none", names)
