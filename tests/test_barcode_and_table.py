from pathlib import Path

import polars as pl
import pytest

from cytosyn_data.run.barcode import parse_slide_name, slide_id_from_path
from cytosyn_data.run.slide_table import SlideTableError, build_slide_table


def test_tcga_barcode_parsed_case_insensitively():
    n = parse_slide_name("tcga-cr-7395-01a-01-ts1")
    assert (n.slide_id, n.tss, n.patient, n.sample_type, n.slide_type) == (
        "tcga-cr-7395-01a-01-ts1",
        "CR",
        "TCGA-CR-7395",
        "01",
        "TS",
    )


def test_diagnostic_slide_with_uuid_and_dots():
    stem = Path("TCGA-A2-A0CM-01Z-00-DX1.AC4901DE-4B6D-4185-BB9F-156033839828.svs").stem
    n = parse_slide_name(stem)
    assert n.slide_id == "TCGA-A2-A0CM-01Z-00-DX1-AC4901DE-4B6D-4185-BB9F-156033839828"
    assert (n.tss, n.slide_type, n.patient) == ("A2", "DX", "TCGA-A2-A0CM")
    assert slide_id_from_path("a/b/x.y.z.svs") == "x-y-z"


def test_non_tcga_name_has_null_fields():
    n = parse_slide_name("CMU-1-Small-Region")
    assert n.tss is None and n.patient is None and n.slide_type is None


def test_slide_table_from_folder_csv_and_files(tmp_path, cmu_slide, tcga_slide):
    df = build_slide_table([cmu_slide.parent])
    assert df["slide_id"].to_list() == ["broken", "cmu-1-small-region", "tcga-cr-7395-01a-01-ts1"]
    assert df.filter(pl.col("slide_id") == "tcga-cr-7395-01a-01-ts1")["tss"].item() == "CR"
    csv = tmp_path / "t.csv"
    csv.write_text(f"path,slide_id,mpp,project\n{tcga_slide},tcga-x,0.25,TCGA-SKCM\n{cmu_slide},,,\n")
    df = build_slide_table([csv])
    row = df.filter(pl.col("slide_id") == "tcga-x").row(0, named=True)
    assert row["mpp_override"] == 0.25 and row["project"] == "TCGA-SKCM"
    assert df.filter(pl.col("slide_id") == "cmu-1-small-region")["mpp_override"].item() is None


def test_slide_table_errors(tmp_path, cmu_slide):
    with pytest.raises(SlideTableError, match="duplicate slide_id"):
        build_slide_table([cmu_slide, cmu_slide])
    bad = tmp_path / "bad.csv"
    bad.write_text("file\nx.svs\n")
    with pytest.raises(SlideTableError, match="no 'path' column"):
        build_slide_table([bad])
