"""Evaluation metrics against references, and an end-to-end run with tiny extractors."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import yaml
from scipy import linalg

from cytosyn_model.cli import eval_main
from cytosyn_model.eval.fld import fld, memorisation_scores
from cytosyn_model.eval.metrics import (
    RunningMoments,
    bootstrap,
    cosine_similarity_pairs,
    fd_infinity,
    frechet_distance,
    kid,
    frechet_distance_scipy,
    mean_cov,
    prdc,
    precision_recall,
    precision_recall_bruteforce,
)


def test_fd_equals_scipy_sqrtm_reference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3000, 64)) @ rng.normal(size=(64, 64)) * 0.3
    b = rng.normal(size=(2500, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 0.1
    m1, s1 = mean_cov(a)
    m2, s2 = mean_cov(b)
    ours, ref = frechet_distance(m1, s1, m2, s2), frechet_distance_scipy(m1, s1, m2, s2)
    assert abs(ours - ref) / ref < 1e-6
    # covariance accumulated in chunks equals numpy's
    np.testing.assert_allclose(s1, np.cov(a, rowvar=False), rtol=1e-9, atol=1e-12)


def test_fd_closed_form_for_known_gaussians():
    d = 5
    mu1, mu2 = np.zeros(d), np.arange(d, dtype=float)
    s1, s2 = np.diag(np.full(d, 4.0)), np.diag(np.arange(1, d + 1, dtype=float))
    want = float(mu2 @ mu2 + np.sum((2.0 - np.sqrt(np.arange(1, d + 1))) ** 2))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-12)
    q = linalg.qr(np.random.default_rng(1).normal(size=(d, d)))[0]  # rotation-invariant
    assert frechet_distance(mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(mu2, s2, mu2, s2) == pytest.approx(0.0, abs=1e-9)


def test_precision_recall_match_brute_force_and_identical_sets():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(400, 8))
    fake = rng.normal(size=(300, 8)) * 1.3 + 0.4
    assert precision_recall(real, fake, chunk=97) == pytest.approx(precision_recall_bruteforce(real, fake))
    assert precision_recall(real, real) == (1.0, 1.0)


@pytest.mark.parametrize("case", ["gaussian", "integer_ties", "copies"])
def test_prdc_equals_the_prdc_package(case):
    compute_prdc = pytest.importorskip("prdc").compute_prdc
    rng = np.random.default_rng(5)
    if case == "gaussian":
        real, fake = rng.normal(size=(500, 16)), rng.normal(size=(400, 16)) * 1.2 + 0.3
    elif case == "integer_ties":  # small integers: many exactly equal distances and duplicate points
        real, fake = rng.integers(0, 3, (300, 4)).astype(float), rng.integers(0, 3, (250, 4)).astype(float)
    else:  # generated = exact copies of half the real set, plus noise
        real = rng.normal(size=(300, 12))
        fake = np.concatenate([real[:150], rng.normal(size=(100, 12))])
    for k in (3, 5):
        ours = prdc(real, fake, k, chunk=128)
        theirs = compute_prdc(real, fake, k)
        for name in ("precision", "recall", "density", "coverage"):
            assert ours[name] == pytest.approx(float(theirs[name]), abs=1e-12), (case, k, name)


def test_fd_infinity_equals_the_reference_procedure():
    """Chong & Forsyth's calculate_FID_infinity_path (mchong6/FID_Infinity, not on PyPI), replayed
    step by step with numpy's global RNG, scipy's sqrtm FD and sklearn's LinearRegression."""
    from sklearn.linear_model import LinearRegression

    rng = np.random.default_rng(8)
    mix = rng.normal(size=(16, 16)) / 4
    real = rng.normal(size=(3000, 16)) @ mix
    fake = rng.normal(size=(2500, 16)) @ mix * 1.1 + 0.05
    real_m, real_s = real.mean(0), np.cov(real, rowvar=False)
    np.random.seed(5)
    act = fake.copy()
    batches = np.linspace(500, len(act), 7).astype("int32")
    fids = []
    for b in batches:
        np.random.shuffle(act)
        m, s_ = act[:b].mean(0), np.cov(act[:b], rowvar=False)
        fids.append(frechet_distance_scipy(m, s_, real_m, real_s))
    reg = LinearRegression().fit(1 / batches.reshape(-1, 1), np.array(fids).reshape(-1, 1))
    theirs = reg.predict(np.array([[0]]))[0, 0]
    ours = fd_infinity(fake, real_m, real_s, min_fake=500, num_points=7, seed=5)
    assert ours == pytest.approx(theirs, rel=1e-8)
    assert ours < fids[-1]  # the bias of the finite-N FD is removed
    with pytest.raises(ValueError, match="needs more than min_fake = 5000"):
        fd_infinity(fake, real_m, real_s)


def test_kid_equals_torch_fidelity():
    tf = pytest.importorskip("torch_fidelity.metric_kid")
    import torch

    rng = np.random.default_rng(6)
    gen, real = rng.normal(size=(600, 32)), rng.normal(size=(700, 32)) * 1.1 + 0.05
    ours = kid(gen, real, subsets=20, subset_size=200, seed=2020)
    theirs = tf.kid_features_to_metric(torch.from_numpy(gen), torch.from_numpy(real), kid_subsets=20, kid_subset_size=200,
                                       rng_seed=2020, kid_kernel="poly", kid_kernel_poly_degree=3,
                                       kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, verbose=False)
    assert ours[0] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-10)
    assert ours[1] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-10)


def _normal(rng, mean, cov, n):
    """Gaussian samples through a Cholesky factor: the same numbers with every LAPACK build
    (numpy's multivariate_normal goes through an SVD whose signs differ between builds)."""
    return np.asarray(mean) + rng.standard_normal((n, len(cov))) @ np.linalg.cholesky(cov).T


def _gaussian_sets(seed=3, d=12):
    rng = np.random.default_rng(seed)
    cov = np.eye(d) + 0.3
    return rng, cov, _normal(rng, np.zeros(d), cov, 1500), _normal(rng, np.zeros(d), cov, 800)


def test_fld_follows_the_published_algorithm_on_fixed_seeds():
    """Figures of the published FLD algorithm (marcojira/fld, re-implemented; not on PyPI) on fixed
    seeds: about 0 for a sample of the real distribution, rising with a shift, and very high for exact
    copies of the training set (the reference warns above 1,000) and for copies with small noise."""
    rng, cov, train, test = _gaussian_sets()
    d = train.shape[1]
    good = _normal(rng, np.zeros(d), cov, 800)
    shifted = [_normal(rng, np.full(d, s), cov, 800) for s in (1.0, 0.5, 0.25)]
    values = [fld(test, x, real_train=train) for x in shifted + [good]]
    assert values[0] > values[1] > values[2] > values[3]
    assert abs(values[3]) < 5.0
    copies = fld(test, train[:800], real_train=train)
    noisy = fld(test, train[:800] + rng.normal(scale=0.01, size=(800, d)), real_train=train)
    assert copies > 1000 and noisy > 100 and copies > noisy
    assert fld(test, train[:800], real_train=train, mode="gap") < -1000  # the memorisation gap
    assert values == pytest.approx(PINNED_FLD, abs=0.05), values  # regression figures of this implementation


PINNED_FLD = [14.873, 2.675, 0.819, 0.367]  # shift 1.0, 0.5, 0.25, none


def test_fld_memorisation_scores_rank_copies_first():
    rng, cov, train, test = _gaussian_sets(4, 8)
    gen = np.concatenate([train[:50], _normal(rng, np.zeros(8), cov, 50)])
    scores = memorisation_scores(train, test, gen)
    assert scores[:50].min() > scores[50:].max()


def test_bootstrap_resamples_with_replacement():
    pool = np.random.default_rng(4).normal(size=(100, 3))
    mean, std, values = bootstrap(lambda x: float(x.mean()), pool, n=100, draws=20)
    assert std > 0 and len(set(values)) > 1  # a pool no larger than n still varies
    assert abs(mean - pool.mean()) < 3 * std
    again = bootstrap(lambda x: float(x.mean()), pool, n=100, draws=20)
    assert again[2] == values  # seeded


def test_cosine_and_running_moments():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert cosine_similarity_pairs(a, a * 3) == pytest.approx(1.0)
    assert cosine_similarity_pairs(a, -a) == pytest.approx(-1.0)
    m = RunningMoments(2)
    m.add(a)
    m.add(a + 1)
    mu, cov = m.mean_cov()
    np.testing.assert_allclose(cov, np.cov(np.vstack([a, a + 1]), rowvar=False))


def test_end_to_end_on_cmu_tiles_with_jpeg_ablation(tmp_path, cmu_slide):
    from cytosyn_data.cli import main
    from cytosyn_data.io.png import decode_png, encode_png
    from cytosyn_data.io.tar_read import iter_tar_members

    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "run"), "--tiles", "all", "--shard-size", "20"]) == 0
    real = {n: b for p in sorted((tmp_path / "run" / "shards").glob("*.tar")) for n, b in iter_tar_members(p)}
    keys = sorted(n[:-4] for n in real if n.endswith(".png"))
    # 'generated' tiles named as cytosyn-sample's cond mode names them: flipped copies of the real ones
    gen = tmp_path / "gen"
    gen.mkdir()
    for i, k in enumerate(keys):
        img = decode_png(real[f"{k}.png"])[:, ::-1]
        (gen / f"gen__{k}__s0_{i}.png").write_bytes(encode_png(np.ascontiguousarray(img)))
    base = {"real": {"cmu": str(tmp_path / "run" / "shards")}, "generated": {"flip": {"path": str(gen), "steps": 250}},
            "extractors": {"inception_v3": "random:small", "uni": "random:small"},
            "bootstrap": {"draws": 3, "n": 20}, "batch_size": 16}
    for name, pre in (("png", {"real": [], "generated": []}), ("jpeg", {"real": ["jpeg70"], "generated": []})):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({"eval": {**base, "out": str(tmp_path / name), "preprocess": pre}}))
        assert eval_main(["--config", str(cfg)]) == 0
    a = pl.read_parquet(tmp_path / "png" / "metrics.parquet")
    b = pl.read_parquet(tmp_path / "jpeg" / "metrics.parquet")
    assert set(a["metric"]) == {"fd", "fld", "precision", "recall", "density", "coverage", "cosine"}
    assert set(a["extractor"]) == {"inception_v3", "uni"}
    fd = a.filter(pl.col("metric") == "fd")
    assert (fd["value"] >= 0).all() and fd["std"].is_not_null().all()
    cos = a.filter(pl.col("metric") == "cosine")["value"]
    assert (cos > 0.5).all()  # features of a tile and of its mirror image stay close
    # the JPEG ablation changes the real features and so the numbers
    fd_png = fd.filter(pl.col("extractor") == "uni")["value"].item()
    fd_jpeg = b.filter((pl.col("metric") == "fd") & (pl.col("extractor") == "uni"))["value"].item()
    assert fd_png != fd_jpeg
    assert "jpeg70" in (tmp_path / "jpeg" / "report.md").read_text()
    for f in ("report.md", "fd.png", "grid.png", "report/index.html", "report/img/fd.png"):
        assert (tmp_path / "png" / f).exists()
    assert len(list((tmp_path / "png" / "cache").iterdir())) == 4  # (real, generated) x 2 extractors, cached


def test_features_are_memory_mapped_and_large_sets_subsampled_for_knn_metrics(tmp_path):
    from cytosyn_model.eval.features import subsample
    from cytosyn_model.eval.run import reference_pairs

    x = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float32, shape=(1000, 4))
    x[:] = np.arange(4000, dtype=np.float32).reshape(1000, 4)
    x.flush()
    m = np.load(tmp_path / "f.npy", mmap_mode="r")
    s = subsample(m, 100, seed=3)
    assert s.shape == (100, 4) and np.array_equal(s, subsample(m, 100, seed=3))
    rows = s[:, 0].astype(int) // 4
    assert (np.diff(rows) > 0).all() and np.array_equal(s, x[rows])  # distinct rows, in file order
    assert subsample(m, 5000, 0).shape == (1000, 4)
    ri, gi = reference_pairs(["a__x0_y0", "b__x0_y0", "c__x0_y0"],
                             ["gen__c__x0_y0__s0_0", "junk", "gen__a__x0_y0__s0_1", "gen__z__x0_y0__s0_2"])
    assert ri.tolist() == [2, 0] and gi.tolist() == [0, 2]
