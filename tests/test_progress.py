"""pipelines.data.progress: plain lines where the output is not a terminal, tqdm where it is."""
import io

from pipelines.data import progress as P


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_off_a_terminal(monkeypatch):
    out = io.StringIO()
    clock = iter(range(0, 1000, 10))  # 10 s per tick
    monkeypatch.setattr(P.time, "monotonic", lambda: float(next(clock)))
    bar = P.progress(total=8, desc="train", unit="img", file=out)
    assert isinstance(bar, P.PlainProgress)
    for _ in range(4):
        bar.update(2)
    bar.write("skipped x: bad")
    bar.close()
    bar.close()  # once only
    # a line once 30 s have passed (at 6 images), the message, the last line; no carriage returns
    assert out.getvalue().splitlines() == ["train: 6/8 img (75%), 0 img/s", "skipped x: bad",
                                           "train: 8/8 img (100%), 0 img/s"]


def test_iteration_counts_and_ends_with_a_line_only_when_complete():
    out = io.StringIO()
    assert list(P.progress(range(5), total=5, desc="eval", unit="batch", file=out)) == list(range(5))
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]
    assert out.getvalue().startswith("eval: 5/5 batch (100%)")
    failed = io.StringIO()

    def broken():
        yield 1
        raise ValueError("bad shard")

    try:
        list(P.progress(broken(), desc="eval", file=failed))
    except ValueError:
        pass
    assert failed.getvalue() == ""  # the failure's own message stands alone
    quiet = io.StringIO()
    bar = P.progress(range(3), disable=True, file=quiet)
    list(bar)
    bar.write("skipped y: not an image")  # messages still go out
    assert quiet.getvalue() == "skipped y: not an image\n"


def test_a_terminal_gets_tqdm():
    from tqdm import tqdm

    bar = P.progress(total=3, file=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
