import functools
import gzip
import hashlib
import http.server
import re
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpadjoint import data as D
from gpadjoint import datasets as DS

SHIPPED = [n for n, i in DS.DATASETS.items() if i.shipped]
MANIFEST = pd.read_csv(DS.SHIPPED_DATA_DIR / "MANIFEST.tsv", sep="\t", dtype={"sha256": str})


def test_registry_matches_manifest_and_readme():
    assert len(SHIPPED) == 17
    assert sorted(n for n, i in DS.DATASETS.items() if not i.shipped) == sorted(
        ["3droad", "slice", "buzz", "houseelectric", "song"])
    readme = (DS.SHIPPED_DATA_DIR / "README.md").read_text()
    table = dict(
        (m[1], (int(m[2]), int(m[3])))
        for m in re.finditer(r"^\| (\w+) \| (\d+) \| (\d+) \|", readme, re.M))
    assert sorted(table) == sorted(SHIPPED)
    for name in SHIPPED:
        info = DS.DATASETS[name]
        rows = MANIFEST[MANIFEST.dataset == name]
        assert set(rows.n_rows) == {info.n} and set(rows.d_features) == {info.d}
        assert table[name] == (info.n, info.d)
        assert dict(zip(rows.file, rows.sha256, strict=True)) == dict(info.files)
    # the README's n, d for the large sets
    for name in ("3droad", "slice", "buzz", "houseelectric", "song"):
        i = DS.DATASETS[name]
        assert f"{name} n={i.n} d={i.d}" in readme.replace("\n  ", " ")
    assert "data1.csv.gz" in DS.DATASETS["song"].files


def test_list_datasets():
    rows = {r["name"]: r for r in DS.list_datasets()}
    assert len(rows) == 22
    assert rows["kin8nm"] == dict(name="kin8nm", n=8192, d=8, shipped=True, n_splits=20,
                                  available=True)
    assert rows["yacht"]["n_splits"] == 10 and rows["yacht"]["available"]
    assert not rows["song"]["shipped"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_set_shapes_and_splits(name):
    info = DS.DATASETS[name]
    s = DS.load_dataset(name, 0)
    assert s.n_train + s.n_test == info.n and s.d == info.d
    assert s.X_train.shape == (s.n_train, info.d) and s.X_test.shape == (s.n_test, info.d)
    assert s.y_train.shape == (s.n_train,) and s.y_test.shape == (s.n_test,)
    assert s.x_mean.shape == s.x_std.shape == (info.d,) and s.y_std == 1.0
    for a in (s.X_train, s.y_train, s.X_test, s.y_test, s.x_std):
        assert np.isfinite(a).all()
    # every split: train and test disjoint and covering all rows
    data, splits = DS._parse(name, DS.SHIPPED_DATA_DIR / name, ())
    tests = []
    for k in range(info.n_splits):
        train, test = splits(k)
        assert len(np.intersect1d(train, test)) == 0
        assert np.array_equal(np.union1d(train, test), np.arange(info.n))
        assert len(train) + len(test) == info.n  # no duplicated indices either
        tests.append(test)
    if info.kind == "mask10":  # a fixed 10-fold partition: test sets disjoint, ~n/10 each
        assert np.array_equal(np.sort(np.concatenate(tests)), np.arange(info.n))
        assert {len(t) for t in tests} <= {info.n // 10, -(-info.n // 10)}


def test_standardisation_uses_training_statistics():
    for name in ("yacht", "kin8nm", "protein"):
        s = DS.load_dataset(name, 3)
        data, splits = DS._parse(name, DS.SHIPPED_DATA_DIR / name, ())
        train, test = splits(3)
        np.testing.assert_allclose(s.X_train.mean(0), 0, atol=1e-10)
        np.testing.assert_allclose(s.X_train.std(0), 1, rtol=1e-10)
        assert abs(s.y_train.mean()) < 1e-10
        # test rows use the training statistics, so they are not exactly standardised
        assert np.abs(s.X_test.mean(0)).max() > 1e-6 and abs(s.y_test.mean()) > 1e-6
        np.testing.assert_allclose(s.x_mean, data[train, :-1].mean(0))
        np.testing.assert_allclose(s.unscale_X(s.X_test), data[test, :-1], atol=1e-12)
        np.testing.assert_allclose(s.unscale_y(s.y_test), data[test, -1], atol=1e-12)
        np.testing.assert_allclose(s.scale_X(data[test, :-1]), s.X_test, atol=1e-12)


def test_scale_y_and_dtype():
    s = DS.load_dataset("concrete", 2, scale_y=True, dtype=np.float32)
    assert s.X_train.dtype == s.y_test.dtype == np.float32
    assert s.y_std > 1 and abs(s.y_train.std() - 1) < 1e-5
    ref = DS.load_dataset("concrete", 2)
    np.testing.assert_allclose(s.unscale_y(s.y_test), ref.unscale_y(ref.y_test), rtol=1e-5)
    np.testing.assert_allclose(s.unscale_y_std(np.ones(3)), s.y_std)
    np.testing.assert_allclose(s.unscale_y_var(np.ones(3)), s.y_std**2)
    assert "concrete" in repr(s) and "n_test=103" in repr(s)


@pytest.mark.parametrize("name,const", [("sml", [2, 20, 21, 22]), ("keggundirected", [9])])
def test_constant_columns_get_unit_std(name, const):
    s = DS.load_dataset(name, 0)
    assert np.isfinite(s.X_train).all() and np.isfinite(s.X_test).all()
    assert np.flatnonzero(np.ptp(s.X_train, axis=0) == 0).tolist() == const
    assert (s.x_std[const] == 1).all() and (s.X_train[:, const] == 0).all()


def test_column_constant_only_in_training_rows():
    # keggdirected column 7 is constant except row 23109, which is a test row of split 2; the
    # naive std of the training column is ~1e-21 (rounding), not 0.
    s = DS.load_dataset("keggdirected", 2)
    assert s.x_std[7] == 1 and (s.X_train[:, 7] == 0).all()
    assert np.abs(s.X_test).max() < 100


def _all_targets(name):
    s = DS.load_dataset(name, 0)
    return np.concatenate([s.y_train, s.y_test]) + s.y_mean


def test_protein_target_is_already_log1p_rmsd():
    # The paper's loader fits log(RMSD + 1), centred.  CASP's RMSD spans 0..21 Angstrom, so that
    # target spans log(22) = 3.0910; a raw (untransformed) RMSD would span ~21.  The shipped file
    # is already transformed, so loading it must not transform it again.
    y = _all_targets("protein")
    assert abs(np.ptp(y) - np.log(22.0)) < 1e-3
    assert abs(y.mean()) < 1e-5  # centred over all rows


def test_keggundirected_target_is_already_log():
    # The paper's loader fits log(y), centred.  The shipped target is log(y) - c for a raw y in
    # steps of 1/2 (2, 3, 4, ... halves of the smallest value), which a raw or log1p target is not.
    y = _all_targets("keggundirected")
    ratios = 2.0 * np.exp(np.unique(y) - y.min())
    # the file keeps 5 significant digits of y: ~5e-5 relative in each ratio
    assert (np.abs(ratios - np.round(ratios)) < 1e-4 * ratios + 1e-4).all()
    assert abs(y.mean()) < 1e-5


def test_kin8nm_has_20_splits_of_7373_819():
    for k in range(20):
        s = DS.load_dataset("kin8nm", k)
        assert (s.n_train, s.n_test) == (7373, 819)
    _, splits = DS._parse("kin8nm", DS.SHIPPED_DATA_DIR / "kin8nm", ())
    assert len(np.intersect1d(splits(0)[1], splits(1)[1])) == 76  # random splits, not folds
    with pytest.raises(ValueError, match="20 splits"):
        DS.load_dataset("kin8nm", 20)


def test_bad_name_and_split():
    with pytest.raises(ValueError, match=r"Unknown data set 'yatch'.*'yacht'.*airfoil"):
        DS.load_dataset("yatch")
    with pytest.raises(ValueError, match=r"split 10 out of range for 'yacht'.*0\.\.9"):
        DS.load_dataset("yacht", 10)
    with pytest.raises(ValueError, match="out of range"):
        DS.load_dataset("yacht", -1)
    with pytest.raises(TypeError, match="split must be an int"):
        DS.load_dataset("yacht", 1.0)


def test_checksum_catches_corrupted_copy(tmp_path):
    shutil.copytree(DS.SHIPPED_DATA_DIR / "yacht", tmp_path / "yacht")
    assert DS.load_dataset("yacht", 1, data_dir=tmp_path).n_test == 31  # intact copy loads
    f = tmp_path / "yacht" / "data.csv.gz"
    raw = bytearray(f.read_bytes())
    raw[100] ^= 0x01
    f.write_bytes(bytes(raw))
    expected = DS.DATASETS["yacht"].files["data.csv.gz"]
    with pytest.raises(DS.ChecksumError) as err:
        DS.load_dataset("yacht", 1, data_dir=tmp_path)
    msg = str(err.value)
    assert str(f) in msg and expected in msg and hashlib.sha256(raw).hexdigest() in msg
    assert "re-copy" in msg
    (tmp_path / "yacht" / "test_mask.csv.gz").unlink()
    with pytest.raises(FileNotFoundError, match="missing test_mask.csv.gz"):
        DS.load_dataset("yacht", data_dir=tmp_path)


def test_large_set_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("GPADJOINT_DATA", str(tmp_path))
    assert DS.default_cache_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match=r"not shipped.*download_dataset\('3droad'"):
        DS.load_dataset("3droad")
    with pytest.raises(ValueError, match="not a treforevans"):
        DS.download_dataset("kin8nm")


# ---------------------------------------------------------------------------------------------
# download, against a local HTTP server


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serve a tiny 'tinyremote' set (50 x 3, 10-fold mask) from tmp_path/srv; yield base URL."""
    rng = np.random.default_rng(0)
    n, d = 50, 3
    folder = tmp_path / "srv" / "tinyremote"
    folder.mkdir(parents=True)
    data = np.round(rng.normal(size=(n, d + 1)), 5)
    mask = np.zeros((n, 10), dtype=int)
    mask[np.arange(n), rng.permutation(np.arange(n) % 10)] = 1
    with gzip.open(folder / "data.csv.gz", "wt") as f:
        np.savetxt(f, data, delimiter=",", fmt="%.5g")
    with gzip.open(folder / "test_mask.csv.gz", "wt") as f:
        np.savetxt(f, mask, delimiter=",", fmt="%d")
    info = DS.DatasetInfo("tinyremote", n, d, False, "mask10",
                         {"data.csv.gz": None, "test_mask.csv.gz": None})
    monkeypatch.setitem(DS.DATASETS, "tinyremote", info)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path / "srv"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", data, mask
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_download_and_load(server, tmp_path):
    url, data, mask = server
    cache = tmp_path / "cache"
    good = hashlib.sha256((tmp_path / "srv/tinyremote/data.csv.gz").read_bytes()).hexdigest()
    folder = DS.download_dataset("tinyremote", cache_dir=cache, base_url=url,
                                sha256={"data.csv.gz": good})
    assert sorted(p.name for p in folder.iterdir()) == [
        "SHA256SUMS", "data.csv.gz", "test_mask.csv.gz"]
    s = DS.load_dataset("tinyremote", 3, data_dir=cache)
    test = mask[:, 3] == 1
    np.testing.assert_allclose(s.unscale_X(s.X_test), data[test, :-1], atol=1e-4)
    np.testing.assert_allclose(s.unscale_y(s.y_train), data[~test, -1], atol=1e-4)
    # already there: no second download, but a hash given now is still checked
    assert DS.download_dataset("tinyremote", cache_dir=cache, base_url=url + "/gone") == folder
    with pytest.raises(DS.ChecksumError, match="force=True"):
        DS.download_dataset("tinyremote", cache_dir=cache, sha256={"data.csv.gz": "1" * 64})
    # the hashes recorded at download protect later loads
    (folder / "data.csv.gz").write_bytes(b"not the same bytes")
    with pytest.raises(DS.ChecksumError, match="download_dataset"):
        DS.load_dataset("tinyremote", 3, data_dir=cache)


def test_download_wrong_checksum_leaves_nothing(server, tmp_path):
    url, _, _ = server
    cache = tmp_path / "cache"
    with pytest.raises(DS.ChecksumError, match="expected sha256 " + "0" * 64):
        DS.download_dataset("tinyremote", cache_dir=cache, base_url=url, retries=0,
                           sha256={"test_mask.csv.gz": "0" * 64})
    assert not cache.exists() or not any(cache.rglob("*"))
    with pytest.raises(OSError):  # requests' HTTPError (404) for a wrong base URL
        DS.download_dataset("tinyremote", cache_dir=cache, base_url=url + "/nope", retries=0)
    assert not any(cache.rglob("*"))


def test_download_retries_a_failed_request(server, tmp_path):
    """pooch's retry: the first request for each file fails (503), the second succeeds."""
    requests = pytest.importorskip("requests")  # pooch's
    url, data, _ = server
    real, calls = requests.get, []

    def flaky(*args, **kwargs):
        calls.append(args[0])
        if calls.count(args[0]) == 1:
            return real(url + "/nope", *args[1:], **kwargs)  # a 404 response
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(requests, "get", flaky)
        mp.setattr("time.sleep", lambda s: None)  # pooch waits 1 s, 2 s, ... between tries
        folder = DS.download_dataset("tinyremote", cache_dir=tmp_path / "c", base_url=url,
                                     retries=1)
    assert len(calls) == 4  # two files, two requests each
    s = DS.load_dataset("tinyremote", 0, data_dir=folder.parent)
    assert s.n_train + s.n_test == len(data)


def test_default_cache_dir_is_the_user_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("GPADJOINT_DATA", raising=False)
    import platformdirs
    assert DS.default_cache_dir() == Path(platformdirs.user_cache_dir("gpadjoint",
                                                                       appauthor=False))
    if sys.platform.startswith("linux"):  # XDG: ~/.cache/gpadjoint unless XDG_CACHE_HOME says
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        assert DS.default_cache_dir() == tmp_path / "gpadjoint"


# ---------------------------------------------------------------------------------------------
# user data


def test_from_arrays():
    rng = np.random.default_rng(1)
    X = rng.normal(3, 5, size=(40, 2))
    y = X @ [1.0, -2.0] + 10
    s = D.from_arrays(X, y, test_fraction=0.25, seed=4, scale_y=True)
    assert (s.n_train, s.n_test, s.d) == (30, 10, 2)
    np.testing.assert_allclose(s.X_train.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(np.sort(np.concatenate(
        [s.unscale_y(s.y_train), s.unscale_y(s.y_test)])), np.sort(y))
    s2 = D.from_arrays(X[:30], y[:30, None], X_test=X[30:], y_test=y[30:])
    assert (s2.n_train, s2.n_test) == (30, 10) and s2.y_std == 1.0
    np.testing.assert_allclose(s2.unscale_X(s2.X_test), X[30:])
    s3 = D.from_arrays(X, y)
    assert (s3.n_train, s3.n_test) == (40, 0)
    # constant user column: std 1, not NaN
    Xc = np.column_stack([X, np.full(40, 7.0)])
    assert np.isfinite(D.from_arrays(Xc, y).X_train).all()


@pytest.mark.parametrize("X,y,kw,exc,match", [
    (np.ones((5, 2)), np.ones(4), {}, ValueError, "5 rows but y has 4"),
    (np.ones(5), np.ones(5), {}, ValueError, r"2-D \(n, d\).*reshape\(-1, 1\)"),
    (np.ones((5, 2, 2)), np.ones(5), {}, ValueError, r"2-D \(n, d\); got shape \(5, 2, 2\)"),
    (np.ones((0, 2)), np.ones(0), {}, ValueError, "empty"),
    (np.ones((1, 2)), np.ones(1), {}, ValueError, "at least 2 training points"),
    (np.ones((3, 2)), np.ones(3), {"test_fraction": 0.5}, ValueError, "at least 2 training"),
    (np.ones((5, 0)), np.ones(5), {}, ValueError, "zero features"),
    (np.array([["a", "b"]] * 3), np.ones(3), {}, TypeError, "X must be numeric"),
    (np.ones((5, 2)), np.ones((5, 2)), {}, ValueError, r"y must be 1-D"),
    (np.ones((5, 2)), np.ones(5), {"test_fraction": 1.5}, ValueError, r"in \(0, 1\)"),
    (np.ones((5, 2)), np.ones(5), {"X_test": np.ones((2, 3)), "y_test": np.ones(2)},
     ValueError, "X_test has 3 features but X has 2"),
    (np.ones((5, 2)), np.ones(5), {"X_test": np.ones((2, 2))}, ValueError, "both X_test"),
])
def test_from_arrays_rejects(X, y, kw, exc, match):
    with pytest.raises(exc, match=match):
        D.from_arrays(X, y, **kw)


def test_from_arrays_names_non_finite_rows_and_columns():
    X = np.ones((6, 3))
    X[2, 1] = np.nan
    X[4, 2] = np.inf
    with pytest.raises(ValueError, match=r"X has 2 NaN/inf.*rows \[2, 4\], columns \[1, 2\]"):
        D.from_arrays(X, np.ones(6))
    y = np.ones(6)
    y[5] = np.nan
    with pytest.raises(ValueError, match=r"y has 1 NaN/inf.*rows \[5\]"):
        D.from_arrays(np.ones((6, 3)), y)


def test_load_csv(tmp_path):
    rng = np.random.default_rng(2)
    df = pd.DataFrame(rng.normal(size=(30, 3)), columns=["a", "b", "c"])
    df["price"] = 100 + 3 * df.a
    path = tmp_path / "houses.csv"
    df.to_csv(path, index=False)
    s = D.load_csv(path, "price", test_fraction=0.2, seed=1)
    assert (s.name, s.n_train, s.n_test, s.d) == ("houses", 24, 6, 3)
    assert abs(s.y_mean - 100) < 2
    s2 = D.load_csv(path, "price", features=["a", "c"], test_fraction=None)
    np.testing.assert_allclose(s2.unscale_X(s2.X_train), df[["a", "c"]].to_numpy())

    with pytest.raises(ValueError, match=r"'cost' not in .*columns present: \['a', 'b', 'c', "
                                         r"'price'\]"):
        D.load_csv(path, "cost")
    with pytest.raises(ValueError, match=r"feature columns \['zz'\]"):
        D.load_csv(path, "price", features=["a", "zz"])

    df2 = df.assign(city=["x", "y", "z"] * 10)
    df2.loc[7, "b"] = np.nan
    df2.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"non-numeric column\(s\).*\['city'\]"):
        D.load_csv(path, "price")
    with pytest.raises(ValueError, match=r"NaN/inf.*rows \[7\], columns \['b'\]"):
        D.load_csv(path, "price", features=["a", "b", "c"])

    path.write_text("")
    with pytest.raises(ValueError, match="empty"):
        D.load_csv(path, "price")
    path.write_text("a,b,price\n")
    with pytest.raises(ValueError, match="no data rows"):
        D.load_csv(path, "price")
    path.write_text("price\n1\n2\n3\n")
    with pytest.raises(ValueError, match="no feature columns"):
        D.load_csv(path, "price")
