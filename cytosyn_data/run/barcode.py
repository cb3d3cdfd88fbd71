"""Slide identifiers and TCGA barcode parsing.

``slide_id`` is the file stem with every '.' replaced by '-' (webdataset keys
cannot hold dots). TCGA barcodes such as ``TCGA-CR-7395-01A-01-TS1`` are parsed
into tissue-source-site (TSS), patient, sample type and slide type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# TCGA-{TSS}-{participant}-{sample}{vial}-{portion}{analyte?}-{slide type}{n}
_TCGA_RE = re.compile(
    r"^TCGA-(?P<tss>[A-Z0-9]{2})-(?P<participant>[A-Z0-9]{4})"
    r"(?:-(?P<sample>\d{2})(?P<vial>[A-Z])?"
    r"(?:-(?P<portion>\d{2})[A-Z]?"
    r"(?:-(?P<slide_type>DX|TS|BS|MS)(?P<slide_n>[A-Z0-9]*))?)?)?",
    re.IGNORECASE,
)

#: TCGA sample type codes (first two digits of the sample field).
SAMPLE_TYPES = {
    "01": "Primary Solid Tumor",
    "02": "Recurrent Solid Tumor",
    "03": "Primary Blood Derived Cancer - Peripheral Blood",
    "05": "Additional - New Primary",
    "06": "Metastatic",
    "07": "Additional Metastatic",
    "10": "Blood Derived Normal",
    "11": "Solid Tissue Normal",
}


@dataclass(frozen=True)
class SlideName:
    """Identity fields parsed from a slide file name; TCGA fields are None for other names."""

    slide_id: str
    tss: str | None = None
    patient: str | None = None
    sample_type: str | None = None
    slide_type: str | None = None


def slide_id_from_path(path: str | Path) -> str:
    """File stem with every '.' replaced by '-' (e.g. ``TCGA-..-DX1.UUID.svs`` -> ``TCGA-..-DX1-UUID``)."""
    return Path(path).stem.replace(".", "-")


def parse_slide_name(name: str) -> SlideName:
    """Parse a slide stem or id; TCGA barcodes give tss/patient/sample/slide type (upper case)."""
    slide_id = name.replace(".", "-")
    m = _TCGA_RE.match(name)
    if m is None:
        return SlideName(slide_id=slide_id)
    tss = m.group("tss").upper()
    patient = f"TCGA-{tss}-{m.group('participant').upper()}"
    sample = m.group("sample")
    slide_type = m.group("slide_type")
    return SlideName(
        slide_id=slide_id,
        tss=tss,
        patient=patient,
        sample_type=sample,
        slide_type=slide_type.upper() if slide_type else None,
    )
