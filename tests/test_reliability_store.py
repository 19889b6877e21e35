"""The CT store detects corruption: a volume replaced by other data of the same shape, a manifest whose sha256 no
longer matches, a volume of another size are found — by ``spark3d preprocess --verify`` (writing nothing), by
``spark3d preprocess`` on the existing store (which redoes them, in one line) and by pretraining (size and header
at start, full hashes with ``verify_store``)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spark3d.cli import main
from spark3d.data import CTPretrainData, DataError
from spark3d.data.phantoms import write_btcv_phantoms
from spark3d.data.store_verify import verify_store

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "pretrain" / "demo_ct.yaml"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_btcv_phantoms(tmp_path_factory.mktemp("phantoms"), n_train=3, n_val=0, n_test=0, shape=(40, 40, 20),
                               seed=2)


def _preprocess(datalist, out, *extra):
    return ["preprocess", "--config", str(CONFIG), "--data.init_args.datalist", str(datalist), "--out", str(out),
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def reference(phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "store"
    assert main(_preprocess(phantoms, out)) == 0
    return out


@pytest.fixture
def store(reference, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(reference, copy)
    return copy


def _data(store, **kw):
    """The pretraining data module of the store (the demo config's preprocessing settings)."""
    return CTPretrainData(store=str(store), roi_size=(16, 16, 16), spacing=(6.0, 6.0, 6.0),
                          intensity_range=(-175.0, 250.0), **kw)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _first(root):
    manifest = json.loads((root / "manifest.json").read_text())
    vid, record = next(iter(manifest["volumes"].items()))
    return root / record["file"], record


def _one_error(capsys):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_volume_replaced_by_same_shaped_data_is_found_and_redone(phantoms, reference, store, capsys):
    path, record = _first(store)
    original = path.read_bytes()
    array = np.load(path)
    np.save(path, (array[:, ::-1] * 0.5).astype(array.dtype))  # other data: same shape, dtype, size
    assert path.stat().st_size == record["bytes"]
    before = _files(store)
    assert main(["preprocess", "--verify", "--out", str(store)]) == 2
    line = _one_error(capsys)
    assert path.name in line and "sha256" in line and "1 of 3 volumes" in line
    assert _files(store) == before  # --verify writes nothing
    # pretraining: the size and header look right at start; verify_store compares the full hashes
    _data(store).validate()
    with pytest.raises(DataError, match="sha256"):
        _data(store, verify_store=True).validate()
    # preprocess on the existing store checks what it would skip, and redoes the changed volume (one line)
    assert main(_preprocess(phantoms, store)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "2 already done" in out[0] and "1 redone" in out[0] and path.name in out[0]
    assert path.read_bytes() == original and _files(store) == _files(reference)
    assert main(["preprocess", "--verify", "--out", str(store)]) == 0
    assert "all 3 volumes match" in capsys.readouterr().out


def test_a_manifest_whose_sha256_no_longer_matches_is_found(phantoms, reference, store, capsys):
    manifest = json.loads((store / "manifest.json").read_text())
    vid = next(iter(manifest["volumes"]))
    manifest["volumes"][vid]["sha256"] = "0" * 64
    (store / "manifest.json").write_text(json.dumps(manifest))
    assert main(["preprocess", "--verify", "--out", str(store)]) == 2
    assert "disagree on its sha256" in _one_error(capsys)
    with pytest.raises(DataError, match="1 of 3 volumes"):
        _data(store, verify_store=True).validate()
    assert main(_preprocess(phantoms, store)) == 0  # the volumes match their own records: the manifest is rewritten
    assert "3 already done" in capsys.readouterr().out
    assert verify_store(store)["problems"] == [] and _files(store) == _files(reference)


def test_pretraining_refuses_a_volume_of_another_size_at_start(store):
    path, record = _first(store)
    with path.open("ab") as f:
        f.write(b"\0" * 128)  # the header still parses: the size gives it away
    with pytest.raises(DataError, match=f"{path.name} is {record['bytes'] + 128} bytes"):
        _data(store).validate()
    assert verify_store(store, full=False)["problems"] == [(record["file"], f"{record['bytes'] + 128} bytes, the "
                                                            f"manifest says {record['bytes']}")]
