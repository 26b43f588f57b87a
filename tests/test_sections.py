"""Section parser on hand-written MIMIC-style reports (REFERENCE.md §4.2 layout) and their fallback
variants."""

import re
import textwrap

import pytest

from models.text.sections import (
    SECTION_NAMES,
    clean_text,
    extract_findings_impression,
    normalize_section_name,
    split_sections,
)
from tests.real_data import iu_xray_rows


def mimic(lines: list[str]) -> str:
    """MIMIC layout: title line, every line indented by one space, blank lines are a single space."""
    return "                                 FINAL REPORT\n" + "\n".join(" " + line for line in lines) + "\n"


EXAMPLE = mimic(
    [
        "EXAMINATION:  CHEST (PA AND LAT)",
        "",
        "INDICATION:  ___ year old man with cough and low grade fever, evaluate for",
        "pneumonia.",
        "",
        "TECHNIQUE:  Chest PA and lateral",
        "",
        "COMPARISON:  Radiograph from ___.",
        "",
        "FINDINGS: ",
        "",
        "Heart size is normal.  The mediastinal and hilar contours are unremarkable.",
        "There is a new patchy opacity in the right lower lobe, concerning for",
        "consolidation.  Trace right pleural effusion.  There is no pneumothorax.  No",
        "pulmonary edema.  Degenerative changes of the thoracic spine are noted.",
        "",
        "IMPRESSION: ",
        "",
        "Right lower lobe opacity, likely pneumonia in the appropriate clinical",
        "setting.  Recommend follow-up radiographs after treatment.",
        "",
        "NOTIFICATION:  The findings were discussed with Dr. ___ by Dr. ___ at ___",
        "on the day of the study.",
    ]
)

EXAMPLE_FINDINGS = (
    "Heart size is normal. The mediastinal and hilar contours are unremarkable. There is a new patchy "
    "opacity in the right lower lobe, concerning for consolidation. Trace right pleural effusion. There is "
    "no pneumothorax. No pulmonary edema. Degenerative changes of the thoracic spine are noted."
)
EXAMPLE_IMPRESSION = (
    "Right lower lobe opacity, likely pneumonia in the appropriate clinical setting. "
    "Recommend follow-up radiographs after treatment."
)


def test_example_report_sections_in_order():
    sections = split_sections(EXAMPLE)
    assert [s.name for s in sections] == [
        "preamble",
        "examination",
        "indication",
        "technique",
        "comparison",
        "findings",
        "impression",
        "notification",
    ]
    assert sections[0].text.strip() == "FINAL REPORT"
    assert [s.header for s in sections[1:3]] == ["EXAMINATION", "INDICATION"]
    # Offsets point at the section text in the original string.
    findings = sections[5]
    assert EXAMPLE[findings.start : findings.start + len(findings.text)] == findings.text
    assert (
        clean_text(sections[2].text)
        == "___ year old man with cough and low grade fever, evaluate for pneumonia."
    )


def test_example_findings_and_impression_cleaned_and_joined():
    result = extract_findings_impression(EXAMPLE)
    assert result.origin == "sections"
    assert result.findings == EXAMPLE_FINDINGS
    assert result.impression == EXAMPLE_IMPRESSION
    assert result.text == EXAMPLE_FINDINGS + " " + EXAMPLE_IMPRESSION
    assert "NOTIFICATION" not in result.text and "discussed" not in result.text


def test_phi_marks_are_kept():
    report = mimic(["FINDINGS:  Compared to ___, the ___ tube is unchanged.", "", "IMPRESSION:  Stable."])
    result = extract_findings_impression(report)
    assert result.findings == "Compared to ___, the ___ tube is unchanged."
    assert result.impression == "Stable."


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("IMPRESSION", "impression"),
        ("IMPRESSON", "impression"),
        ("IMPESSION", "impression"),
        ("CONCLUSION", "impression"),
        ("CONCUSION", "impression"),
        ("FINDINGS AND IMPRESSION", "impression"),
        ("FINDINGS/IMPRESSION", "impression"),
        ("PRELIMINARY IMPRESSION", "impression"),
        ("FINDNGS", "findings"),
        ("FINIDNGS", "findings"),
        ("FINDING", "findings"),
        ("CHEST, AP PORTABLE", "findings"),
        ("PA AND LATERAL VIEWS OF THE CHEST", "findings"),
        ("FRONTAL UPRIGHT", "findings"),
        ("REASON FOR EXAM", "indication"),
        ("NDICATION", "indication"),
        ("COMPARISONS", "comparison"),
        ("COMPARISION", "comparison"),
        ("CLINICAL HISTORY", "history"),
        ("RECOMMENDATION(S)", "recommendations"),
        ("WETREAD", "wet read"),
        ("  Type  of examination ", "examination"),
        ("PROCEDURE", "procedure"),
    ],
)
def test_normalize_section_name(header, name):
    assert normalize_section_name(header) == name


def test_the_normalizer_knows_about_sixty_spellings():
    assert len(SECTION_NAMES) >= 60
    assert set(SECTION_NAMES.values()) >= {"findings", "impression", "indication", "comparison", "history"}


def test_typo_headers_still_give_findings_and_impression():
    report = mimic(
        [
            "INDICATION:  Dyspnea.",
            "",
            "FINDNGS:  Lungs are clear.  No effusion.",
            "",
            "IMPRESSON:  No acute cardiopulmonary process.",
        ]
    )
    result = extract_findings_impression(report)
    assert (result.findings, result.impression) == (
        "Lungs are clear. No effusion.",
        "No acute cardiopulmonary process.",
    )


def test_view_title_header_is_findings():
    report = mimic(
        [
            "EXAMINATION:  Chest radiograph.",
            "",
            "INDICATION:  ___ with fever.",
            "",
            "COMPARISON:  None.",
            "",
            "CHEST, AP PORTABLE:  Low lung volumes.  Bibasilar atelectasis.  No pneumothorax.",
        ]
    )
    result = extract_findings_impression(report)
    assert result.origin == "sections"
    assert result.findings == "Low lung volumes. Bibasilar atelectasis. No pneumothorax."
    assert result.impression == ""


def test_last_paragraph_fallback_when_no_findings_or_impression():
    report = mimic(
        [
            "EXAMINATION:  CHEST (PORTABLE AP)",
            "",
            "INDICATION:  Intubated patient.",
            "",
            "COMPARISON:  ___.",
            "",
            "Endotracheal tube terminates 4 cm above the carina.  Mild pulmonary",
            "edema is unchanged.",
            "",
            "Small left pleural effusion.",
        ]
    )
    sections = split_sections(report)
    assert [s.name for s in sections][-2:] == ["comparison", "last_paragraph"]
    assert clean_text(sections[-2].text) == "___."
    result = extract_findings_impression(report)
    assert result.origin == "last_paragraph"
    assert result.findings == (
        "Endotracheal tube terminates 4 cm above the carina. Mild pulmonary edema is unchanged. "
        "Small left pleural effusion."
    )
    assert result.impression == ""


def test_no_header_at_all_is_all_findings_without_the_title():
    report = mimic(["PA and lateral views of the chest.", "", "The lungs are clear.  Heart size is normal."])
    assert [s.name for s in split_sections(report)][0] == "full report"
    result = extract_findings_impression(report)
    assert result.origin == "full_report"
    assert result.findings == "PA and lateral views of the chest. The lungs are clear. Heart size is normal."


def test_plain_manifest_text_is_all_findings():
    result = extract_findings_impression("No focal consolidation.\nHeart size: normal.")
    assert result.origin == "full_report"
    assert result.findings == "No focal consolidation. Heart size: normal."


def test_mixed_case_known_headers_count_unknown_ones_do_not():
    text = "Findings: Heart size: normal. Lungs clear.\nImpression: Normal chest.\nHeart size: normal."
    result = extract_findings_impression(text)
    assert result.findings == "Heart size: normal. Lungs clear."
    assert result.impression == "Normal chest. Heart size: normal."


def test_empty_findings_header_is_dropped_and_several_findings_are_joined():
    report = mimic(
        [
            "CHEST, PA AND LATERAL:",
            "",
            "INDICATION:  Cough.",
            "",
            "FINDINGS:  Right lower lobe opacity.",
            "",
            "PORTABLE VIEW:  Unchanged line position.",
            "",
            "IMPRESSION:",
            "",
            "Pneumonia.",
        ]
    )
    names = [s.name for s in split_sections(report)]
    assert names == ["preamble", "indication", "findings", "findings", "impression"]
    result = extract_findings_impression(report)
    assert result.findings == "Right lower lobe opacity. Unchanged line position."
    assert result.impression == "Pneumonia."


def test_headers_without_any_report_body_give_nothing():
    report = mimic(["EXAMINATION:  CHEST (PA AND LAT)", "", "INDICATION:  Cough.", "", "COMPARISON:  None."])
    result = extract_findings_impression(report)
    assert result.origin == "none"
    assert (result.findings, result.impression, result.text) == ("", "", "")
    assert result.section_names == ["preamble", "examination", "indication", "comparison"]


def test_empty_text():
    assert extract_findings_impression("  \n \n").origin == "none"


def test_real_iu_xray_reports_in_mimic_layout_round_trip():
    """1,924 real reports (Open-i), laid out as MIMIC files (79-column lines, ' ' blank lines, only the
    sections present get a header): the parser returns exactly their findings and impression columns."""
    headers = [("EXAMINATION", "image"), ("INDICATION", "indication"), ("COMPARISON", "comparison")]
    headers += [("FINDINGS", "findings"), ("IMPRESSION", "impression")]
    # Row uid 2415 quotes a whole second report ("IMPRESSION: Exam: ... FINDINGS: ...") inside its impression.
    quotes_headers = re.compile(r"\b[A-Z][A-Z ]{3,}:")
    checked = 0
    for row in iu_xray_rows():
        if quotes_headers.search(row["findings"] + row["impression"]):
            assert row["uid"] == "2415"
            continue
        lines = ["FINAL REPORT".rjust(45)]
        for header, column in headers:
            if row[column].strip():
                lines += textwrap.wrap(f"{header}:  {row[column]}", 78, break_on_hyphens=False) + [""]
        result = extract_findings_impression("\n ".join(lines))
        expected = (clean_text(row["findings"]), clean_text(row["impression"]))
        assert (result.findings, result.impression) == expected, row["uid"]
        assert result.origin == ("sections" if any(expected) else "none"), row["uid"]
        checked += 1
    assert checked == 1923


def test_crlf_cr_and_a_byte_order_mark_parse_like_lf():
    """Reliability #17a: Windows line ends cost the closing paragraph and the title line before."""
    closing = mimic(
        [
            "EXAMINATION:  CHEST (PORTABLE AP)",
            "",
            "COMPARISON:  ___.",
            "",
            "Mild edema.",
            "",
            "Small effusion.",
        ]
    )
    titled = mimic(["Heart size is normal.", "", "No effusion."])
    for report in (EXAMPLE, closing, titled):
        lf = extract_findings_impression(report)
        for variant in (report.replace("\n", "\r\n"), report.replace("\n", "\r"), "\ufeff" + report):
            assert extract_findings_impression(variant) == lf
    assert (
        extract_findings_impression(closing.replace("\n", "\r\n")).findings == "Mild edema. Small effusion."
    )
    assert (
        extract_findings_impression(titled.replace("\n", "\r\n")).findings
        == "Heart size is normal. No effusion."
    )
