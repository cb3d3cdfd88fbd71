"""Slides and outputs on object storage: a real S3 API (moto's server on 127.0.0.1, started here)."""

from __future__ import annotations

import socket
from pathlib import Path

import polars as pl
import pytest

from cytosyn_data.cli import main

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with the AWS environment pointing at it; stopped at the end."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port())
    server.start()
    host, port = server._server.server_address[:2]
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="slides")
    client.create_bucket(Bucket="runs")
    yield client
    mp.undo()
    server.stop()


def _upload(client, local: Path, key: str) -> str:
    client.upload_file(str(local), "slides", key)
    return f"s3://slides/{key}"


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "shards").glob("*.tar"))}


def test_s3_slides_tile_byte_identical_to_local_through_a_small_cache(tmp_path, s3, cmu_slide, tcga_slide):
    _upload(s3, cmu_slide, "cohort/cmu-1-small-region.svs")
    _upload(s3, tcga_slide, "cohort/tss/tcga-cr-7395-01a-01-ts1.svs")
    s3.put_object(Bucket="slides", Key="cohort/notes.txt", Body=b"not a slide")
    local = tmp_path / "local"
    args = ["--tiles", "40", "--shard-size", "6", "--mpp-override", "0.25"]
    assert main(["tile", "--slides", str(cmu_slide), str(tcga_slide), "--out", str(local), *args]) == 0
    remote = tmp_path / "remote"
    cache = tmp_path / "cache"
    # a cache of 5 MB holds one slide at a time beyond the one in use: they are fetched, used, evicted
    assert main(["tile", "--slides", "s3://slides/cohort/", "--out", str(remote), "--cache-dir", str(cache),
                 "--cache-size", "5MB", *args]) == 0
    assert shard_bytes(remote) == shard_bytes(local) and len(shard_bytes(local)) >= 6
    slides = pl.read_parquet(remote / "slides.parquet").sort("slide_id")
    assert slides["path"].to_list() == ["s3://slides/cohort/cmu-1-small-region.svs",
                                        "s3://slides/cohort/tss/tcga-cr-7395-01a-01-ts1.svs"]
    assert pl.read_parquet(remote / "tiles.parquet").drop("sha256").equals(
        pl.read_parquet(local / "tiles.parquet").drop("sha256"))
    assert sum(p.stat().st_size for p in cache.glob("*.svs")) <= 5_000_000
    # a re-run checks the objects' ETags and skips everything
    assert main(["tile", "--slides", "s3://slides/cohort/", "--out", str(remote), "--cache-dir", str(cache),
                 "--cache-size", "5MB", *args]) == 0
    assert shard_bytes(remote) == shard_bytes(local)


def test_slide_table_at_a_url_with_relative_paths_and_a_missing_object(tmp_path, s3, cmu_slide, capsys):
    _upload(s3, cmu_slide, "t/a.svs")
    s3.put_object(Bucket="slides", Key="t/table.csv", Body=b"path,slide_id\na.svs,alpha\nmissing.svs,beta\n")
    rc = main(["tile", "--slides", "s3://slides/t/table.csv", "--out", str(tmp_path / "o"), "--tiles", "5"])
    assert rc == 1
    slides = pl.read_parquet(tmp_path / "o" / "slides.parquet").sort("slide_id")
    assert slides["status"].to_list() == ["ok", "failed"]
    assert "s3://slides/t/missing.svs" in slides["error"][1] and "no such object" in slides["error"][1]
    assert pl.read_parquet(tmp_path / "o" / "tiles.parquet").height == 5


def test_out_url_publishes_the_run_and_training_streams_it(tmp_path, s3, cmu_slide):
    work = tmp_path / "work"
    rc = main(["tile", "--slides", str(cmu_slide), "--out", "s3://runs/r1", "--work-dir", str(work), "--tiles", "12",
               "--shard-size", "5"])
    assert rc == 0
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="runs", Prefix="r1/")["Contents"])
    assert [k for k in keys if k.endswith(".tar")] == [f"r1/shards/tiles-00000{i}.tar" for i in range(3)]
    assert "r1/tiles.parquet" in keys and not any(k.startswith("r1/work/") for k in keys)
    for p in (work / "shards").glob("*.tar"):
        assert s3.get_object(Bucket="runs", Key=f"r1/shards/{p.name}")["Body"].read() == p.read_bytes()

    from cytosyn_model.data import shard_urls
    import webdataset as wds

    urls = shard_urls("s3://runs/r1/shards/")
    got = sorted(s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False))
    assert got == sorted(pl.read_parquet(work / "tiles.parquet")["key"].to_list())


def test_out_url_needs_a_work_dir(tmp_path, cmu_slide, capsys):
    assert main(["tile", "--slides", str(cmu_slide), "--out", "s3://runs/x"]) == 2
    assert "give a local --work-dir" in capsys.readouterr().err


def test_features_on_shards_at_a_url_equal_the_local_run(tmp_path, s3, cmu_slide, capsys):
    import shutil

    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "t"), "--tiles", "8", "--shard-size", "4"]) == 0
    shutil.copytree(tmp_path / "t" / "shards", tmp_path / "local")
    for p in sorted((tmp_path / "t" / "shards").glob("*.tar")):
        s3.upload_file(str(p), "runs", f"feat/train/{p.name}")
    feats = ["--h0-mini-weights", "random:small", "--batch-size", "8"]
    assert main(["features", "--shards", str(tmp_path / "local"), *feats]) == 0
    assert main(["features", "--shards", "s3://runs/feat/train/", *feats]) == 0
    for p in sorted((tmp_path / "local").glob("*.tar")):
        assert s3.get_object(Bucket="runs", Key=f"feat/train/{p.name}")["Body"].read() == p.read_bytes()
    capsys.readouterr()
    assert main(["features", "--shards", "s3://runs/feat/train/", *feats]) == 0
    assert "0 shard(s) written, 2 already done" in capsys.readouterr().out


def test_credentials_in_slide_urls_are_never_written_and_a_re_signed_url_is_the_same_input(tmp_path, s3, cmu_slide,
                                                                                        capsys):
    """Presigned URLs (X-Amz-Signature, X-Amz-Credential) and userinfo: the run folder, its reports and
    exports and the printed output hold none of the secrets; a URL re-signed for the same object is
    not a changed input (nothing is redone)."""
    _upload(s3, cmu_slide, "signed/cmu-1-small-region.svs")
    _upload(s3, cmu_slide, "signed/basic-copy.svs")
    from botocore.config import Config

    v4 = boto3.client("s3", endpoint_url=s3.meta.endpoint_url, config=Config(signature_version="s3v4"))
    sign = lambda key, t: v4.generate_presigned_url("get_object", Params={"Bucket": "slides", "Key": key},  # noqa: E731
                                                    ExpiresIn=t)
    url = sign("signed/cmu-1-small-region.svs", 3600)
    missing = sign("signed/nope.svs", 3600)
    host = url.split("://", 1)[1].split("/", 1)[0]
    userinfo = f"http://alice:hunter2@{host}/slides/signed/basic-copy.svs"
    secrets = [v.split("=", 1)[1] for v in url.split("?", 1)[1].split("&") if v.startswith(("X-Amz-Signature",
                                                                                             "X-Amz-Credential"))]
    secrets += [v.split("=", 1)[1] for v in missing.split("?", 1)[1].split("&") if v.startswith("X-Amz-Signature")]
    secrets.append("hunter2")
    table = tmp_path / "slides.csv"
    pl.DataFrame({"path": [url, missing, userinfo], "slide_id": ["signed", "missing", "basic"]}).write_csv(table)
    run = tmp_path / "run"
    args = ["tile", "--slides", str(table), "--out", str(run), "--tiles", "8", "--shard-size", "4"]
    assert main(args) == 1  # the missing object fails its slide, the others are tiled
    assert main(["export-geojson", "--run", str(run)]) == 0 and main(["export-h5", "--run", str(run)]) == 0
    printed = capsys.readouterr()
    slides = pl.read_parquet(run / "slides.parquet").sort("slide_id")
    assert slides["status"].to_list() == ["ok", "failed", "ok"]
    assert "X-Amz-Signature=REDACTED" in slides["path"][2] and "REDACTED@" in slides["path"][0]
    assert "signed/nope.svs" in slides["error"][1] and "X-Amz-Signature=REDACTED" in slides["error"][1]
    written = [p for p in run.rglob("*") if p.is_file()]  # the slide cache included
    for secret in secrets:
        assert secret not in printed.out + printed.err
        for p in written:
            assert secret.encode() not in p.read_bytes(), (secret, p)
    assert (run / "h5" / "trident" / "patches" / "cmu-1-small-region_patches.h5").exists()  # named without the query
    shards = {p.name: p.stat().st_mtime_ns for p in (run / "shards").glob("*.tar")}
    table2 = tmp_path / "slides2.csv"  # the user refreshed the expiring URL: another signature, the same object
    pl.DataFrame({"path": [sign("signed/cmu-1-small-region.svs", 7200), missing, userinfo],
                  "slide_id": ["signed", "missing", "basic"]}).write_csv(table2)
    assert main(["tile", "--slides", str(table2), "--out", str(run), "--tiles", "8", "--shard-size", "4"]) == 1
    assert "changed" not in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (run / "shards").glob("*.tar")} == shards  # nothing redone
