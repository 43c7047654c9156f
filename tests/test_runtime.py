"""runtime.progress: a bar on a terminal, a few plain lines in a log."""

import io

from paddle_tl.runtime import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_in_a_log_is_a_few_plain_lines():
    log = io.StringIO()
    assert list(progress(iter(range(1000)), "checking images", total=1000, unit="img", stream=log)) == \
        list(range(1000))
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0] == "checking images: 1000 img"
    assert [line.split(": ", 1)[1].split(" (")[0] for line in lines[1:4]] == ["25%", "50%", "75%"]
    assert lines[1].startswith("checking images: 25% (250/1000 img, ")
    assert lines[-1].startswith("checking images: done, 1000 img in ") and lines[-1].endswith(" s")
    assert len(lines) == 5


def test_progress_takes_the_length_and_handles_tiny_and_unknown_totals(capsys):
    assert list(progress([1, 2], "tiny")) == [1, 2]  # stderr is captured: not a terminal
    assert [line.split(",")[0] for line in capsys.readouterr().err.splitlines()] == [
        "tiny: 2 it", "tiny: 50% (1/2 it", "tiny: done"]
    log = io.StringIO()
    list(progress(iter("abc"), "features", unit="batch", stream=log))
    assert log.getvalue().splitlines()[0] == "features: started"
    assert log.getvalue().splitlines()[1].startswith("features: done, 3 batch in ")


def test_progress_is_silent_up_to_min_total():
    log = io.StringIO()
    assert list(progress(range(5), "hashing images", min_total=5, stream=log)) == list(range(5))
    assert log.getvalue() == ""


def test_progress_on_a_terminal_is_a_tqdm_bar():
    from tqdm import tqdm
    terminal = Terminal()
    bar = progress(range(3), "similarity probe", stream=terminal)
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2]
    assert "similarity probe" in terminal.getvalue()
