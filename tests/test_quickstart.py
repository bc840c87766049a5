"""pipelines/quickstart.py on small inputs: where its Fashion-MNIST comes from (the Debian package, a verified
download, a failed one), how it runs a step, and its throughput summary. Its main() always shards and trains on
the whole Fashion-MNIST (minutes on a CPU): that end-to-end run is not tested here."""
from __future__ import annotations

import json
import os
import re
import shlex
import sys

import pytest

from pipelines import quickstart
from pipelines.benchmark.__main__ import main as benchmark
from tests.conftest import BENCH_TINY, FASHION_MNIST, require


@pytest.fixture
def debian_dir() -> str:
    require(os.path.isdir(FASHION_MNIST),
            f"{FASHION_MNIST} missing (Debian package dataset-fashion-mnist; scripts/setup.sh installs it)")
    return FASHION_MNIST


def test_idx_ok_checks_magic_number_and_count(debian_dir, tmp_path):
    for name, spec in quickstart.IDX_FILES.items():
        assert quickstart.idx_ok(os.path.join(debian_dir, name), *spec), name
    labels = os.path.join(debian_dir, "t10k-labels-idx1-ubyte.gz")
    assert not quickstart.idx_ok(labels, 2051, 10000)  # an images file's magic number
    assert not quickstart.idx_ok(labels, 2049, 60000)  # the train split's count
    (tmp_path / "plain").write_bytes(b"not a gzip file")
    (tmp_path / "empty.gz").write_bytes(b"")
    (tmp_path / "cut.gz").write_bytes(open(labels, "rb").read()[:20])  # a half-copied file
    for path in (tmp_path / "plain", tmp_path / "empty.gz", tmp_path / "missing.gz", tmp_path / "cut.gz"):
        assert not quickstart.idx_ok(str(path), 2049, 10000), path


def test_the_debian_package_is_used_in_place(debian_dir, tmp_path, capsys):
    assert quickstart.fashion_mnist_source(str(tmp_path / "cache")) == debian_dir
    assert "from the Debian package" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()


def test_without_the_package_the_files_are_downloaded_once_and_verified(debian_dir, tmp_path, monkeypatch, capsys):
    """The download path against a file:// mirror of the package: each file fetched, checked, then kept."""
    monkeypatch.setattr(quickstart, "DEBIAN_DIR", str(tmp_path / "no-package"))
    monkeypatch.setattr(quickstart, "DOWNLOAD_URL", f"file://{debian_dir}/")
    cache = tmp_path / "cache"
    assert quickstart.fashion_mnist_source(str(cache)) == str(cache)
    out = capsys.readouterr().out
    assert out.count("[data] downloading file://") == 4 and "apt-get install dataset-fashion-mnist" in out
    assert sorted(os.listdir(cache)) == sorted(quickstart.IDX_FILES)
    for name in quickstart.IDX_FILES:
        assert (cache / name).read_bytes() == open(os.path.join(debian_dir, name), "rb").read()
    assert quickstart.fashion_mnist_source(str(cache)) == str(cache)
    assert "downloading" not in capsys.readouterr().out


def test_a_failed_or_wrong_download_stops_with_the_fix_and_leaves_no_file(debian_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(quickstart, "DEBIAN_DIR", str(tmp_path / "no-package"))
    cache = tmp_path / "cache"
    monkeypatch.setattr(quickstart, "DOWNLOAD_URL", f"file://{tmp_path}/no-mirror/")
    with pytest.raises(SystemExit, match=r"could not download train-images-idx3-ubyte.gz: .*Install the Debian "
                                         r"package dataset-fashion-mnist or put the four idx .gz files into"):
        quickstart.fashion_mnist_source(str(cache))
    assert os.listdir(cache) == []
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in quickstart.IDX_FILES:  # every name serves the labels file: not the images it should be
        os.symlink(os.path.join(debian_dir, "t10k-labels-idx1-ubyte.gz"), mirror / name)
    monkeypatch.setattr(quickstart, "DOWNLOAD_URL", f"file://{mirror}/")
    with pytest.raises(SystemExit, match=r"train-images-idx3-ubyte.gz is not the Fashion-MNIST idx file it should be"):
        quickstart.fashion_mnist_source(str(cache))
    assert os.listdir(cache) == []


def test_run_shows_the_command_and_stops_the_quickstart_when_it_fails(capfd):
    cmd = [sys.executable, "-c", "print('step ran')"]
    quickstart.run(cmd)
    assert capfd.readouterr().out.splitlines()[-2:] == [f"$ {shlex.join(cmd)}", "step ran"]
    cmd = [sys.executable, "-c", "raise SystemExit(3)"]
    with pytest.raises(SystemExit, match=rf"^step failed \(exit 3\): {re.escape(shlex.join(cmd))}$"):
        quickstart.run(cmd)


def test_a_mistyped_override_is_one_line_and_exit_2(tmp_path, capsys):
    assert quickstart.main(["--run-dir", str(tmp_path / "run"), "--set", "optim.weigth_decay=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "weigth_decay" in err and "Traceback" not in err
    assert not os.listdir(tmp_path)  # nothing started


def test_help_lists_the_six_steps(capsys):
    with pytest.raises(SystemExit) as done:
        quickstart.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for step in ("1. data", "2. train", "3. export", "4. evaluate", "5. benchmark", "6. plot"):
        assert step in out, step
    assert "--with-peer" in out and "--set KEY=VALUE" in out


def test_quickstart_summary_and_plot_title_name_the_benchmarks_device(tmp_path):
    out = tmp_path / "b.csv"
    assert benchmark(["models", "--models", "mrconvnext_atto@fused", "mrconvnext_atto@unfused", "convnext_atto",
                      *BENCH_TINY, "--no-flops", "--csv", str(out)]) == 0
    title, line = quickstart.throughput_summary(str(out), "mrconvnext_atto", "convnext_atto")
    assert "CPU inference throughput" in title and line.startswith("throughput (CPU)")
    meta = json.loads((tmp_path / "b.csv.json").read_text())
    (tmp_path / "b.csv.json").write_text(json.dumps(dict(meta, device="NVIDIA H200")))  # as a GPU run writes it
    title, line = quickstart.throughput_summary(str(out), "mrconvnext_atto", "convnext_atto")
    assert "NVIDIA H200 inference throughput" in title and "CPU" not in title + line
    assert line.startswith("throughput (NVIDIA H200) fused") and "x unfused" in line and "x convnext_atto" in line
