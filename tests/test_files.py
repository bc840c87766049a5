import os

import pytest

from pipelines.data.files import atomic_write, atomic_write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "latest"
    atomic_write_text(str(path), "step_00000010")
    with pytest.raises(RuntimeError):
        with atomic_write(str(path)) as tmp, open(tmp, "w") as f:
            f.write("step_000")
            raise RuntimeError("disk full")
    assert path.read_text() == "step_00000010"
    assert os.listdir(tmp_path) == ["latest"]
    atomic_write_text(str(path), "step_00000020")
    assert path.read_text() == "step_00000020" and os.listdir(tmp_path) == ["latest"]
