"""pipelines.tables: the CSV tables and the benchmark side file, written whole and read back."""
import pytest

from pipelines import tables

ROWS = [{"model": "a", "top1": "1.0", "extra": "dropped"}, {"model": "b", "top1": "2.0"}]


def test_write_read_and_side_file(tmp_path):
    path = str(tmp_path / "sub" / "bench.csv")
    tables.write_rows(path, ("model", "top1"), ROWS, side={"device": "cpu", "settings": {"batch_size": 4}})
    assert tables.read_rows(path) == [{"model": "a", "top1": "1.0"}, {"model": "b", "top1": "2.0"}]
    assert tables.read_side(path) == {"device": "cpu", "settings": {"batch_size": 4}}
    assert tables.read_side(str(tmp_path / "none.csv")) is None
    (tmp_path / "bad.csv.json").write_text("[1, 2]")  # not an object: treated as not recorded
    assert tables.read_side(str(tmp_path / "bad.csv")) is None


def test_merge_into_one_of_its_inputs(tmp_path):
    a, b = str(tmp_path / "a.csv"), str(tmp_path / "b.csv")
    tables.write_rows(a, tables.RESULTS_COLUMNS, [{"model": "m1", "top1": "80"}])
    tables.write_rows(b, tables.RESULTS_COLUMNS, [{"model": "m2", "top1": "81"}])
    rows = tables.merge([a, b], a, tables.RESULTS_COLUMNS)
    assert [r["model"] for r in rows] == [r["model"] for r in tables.read_rows(a)] == ["m1", "m2"]
    assert list(tables.read_rows(a)[0]) == list(tables.RESULTS_COLUMNS)


def test_a_failed_write_keeps_the_old_table(tmp_path):
    path = str(tmp_path / "r.csv")
    tables.write_rows(path, ("model",), [{"model": "old"}])

    def rows():
        yield {"model": "new"}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        tables.write_rows(path, ("model",), rows())
    assert tables.read_rows(path) == [{"model": "old"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]  # no temporary left behind
