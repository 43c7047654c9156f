"""runtime.progress: a bar on a terminal, a few plain lines in a log; and
Paddle's messages that tell a user nothing, silenced."""

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

from paddle_tl.runtime import progress, stderr_lines_dropped

REPO = Path(__file__).resolve().parents[1]


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


def test_stderr_lines_dropped_drops_only_lines_with_the_fragments_from_python_and_native_code(capfd):
    with stderr_lines_dropped("NOISE"):
        print("kept from python", file=sys.stderr)
        print("paddle says NOISE", file=sys.stderr)
        os.write(2, b"kept from C++\nW1207 eager_utils.cc] NOISE!!!\nlast line without newline")
    err = capfd.readouterr().err
    assert "NOISE" not in err
    assert err.splitlines() == ["kept from python", "kept from C++", "last line without newline"]
    with stderr_lines_dropped():  # nothing to drop: nothing held back
        print("straight through", file=sys.stderr)
    assert capfd.readouterr().err == "straight through\n"


# One script, run with paddle alone and through paddle_tl: import, pretrained
# weights without the head, a training forward through BatchNorm, a save in
# inference form (a traced residual add), and L-BFGS (the solved head start).
NOISE_SCRIPT = """
import pathlib, sys
through_paddle_tl = sys.argv[2] == "paddle_tl"
if through_paddle_tl:
    from paddle_tl.runtime import import_paddle
    paddle = import_paddle()
    from paddle_tl.models.static import save_static
    from paddle_tl.models.weights import load_pretrained
else:
    import paddle
paddle.seed(0)  # L-BFGS below takes the same steps every time (its warning needs two)


class Net(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = paddle.nn.Conv2D(3, 3, 3, padding=1), paddle.nn.BatchNorm2D(3), paddle.nn.Linear(3, 2)

    def forward(self, x):
        return self.fc((x + self.bn(self.conv(x))).mean(axis=[2, 3]))


folder = pathlib.Path(sys.argv[1])
paddle.save({k: v for k, v in Net().state_dict().items() if not k.startswith("fc.")}, str(folder / "body.pdparams"))
net = Net()
if through_paddle_tl:
    print(load_pretrained(net, str(folder / "body.pdparams"), ("fc",)))
else:
    net.set_state_dict(paddle.load(str(folder / "body.pdparams")))
net.train()
net(paddle.rand([2, 3, 8, 8])).sum().backward()
net.eval()
if through_paddle_tl:
    save_static(net, 8, folder)
else:
    paddle.jit.save(net, str(folder / "model"), input_spec=[paddle.static.InputSpec([None, 3, 8, 8], "float32")])
features, labels = paddle.rand([20, 4]), (paddle.arange(20) % 2).astype("int64")
if through_paddle_tl:  # the solved head start
    from paddle_tl.transfer.logistic import solve_head
    solve_head(features.numpy(), labels.numpy(), features.numpy(), labels.numpy(), 2)
else:
    w = paddle.create_parameter([4, 2], "float32")
    lbfgs = paddle.optimizer.LBFGS(max_iter=10, line_search_fn="strong_wolfe", parameters=[w])

    def closure():
        lbfgs.clear_grad()
        loss = paddle.nn.functional.cross_entropy(paddle.matmul(features, w), labels)
        loss.backward()
        return loss

    lbfgs.step(closure)
print("done")
"""
NOISE = {"ccache": "No ccache found", "OMP_NUM_THREADS": "PLEASE USE OMP_NUM_THREADS WISELY",
         "head not loaded": "Skip loading for fc.weight", "PIR": "not support input out tensor",
         "BatchNorm": "we now always track global mean and variance", "L-BFGS": "To copy construct from a tensor"}


def test_paddles_messages_that_tell_a_user_nothing_are_silenced(tmp_path):
    """Paddle alone prints each of NOISE (ccache only where there is none on
    PATH); through paddle_tl the same work prints none of them."""
    env = {k: v for k, v in os.environ.items() if k != "PADDLE_TRAINERS_NUM"}
    env.update(OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    script = tmp_path / "noise.py"  # a file: paddle.jit.save reads the network's source
    script.write_text(NOISE_SCRIPT)
    processes = {}
    for way in ("paddle", "paddle_tl"):  # side by side: each is mostly `import paddle`
        (tmp_path / way).mkdir()
        processes[way] = subprocess.Popen([sys.executable, str(script), str(tmp_path / way), way], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr = {}
    for way, process in processes.items():
        stdout, stderr[way] = process.communicate(timeout=120)
        assert process.returncode == 0 and stdout.splitlines()[-1] == "done", stderr[way][-3000:]
    expected = {name: text for name, text in NOISE.items() if name != "ccache" or shutil.which("ccache") is None}
    assert [name for name, text in expected.items() if text not in stderr["paddle"]] == [], \
        "paddle no longer prints these: the test's script does not trigger them\n" + stderr["paddle"]
    assert [name for name, text in NOISE.items() if text in stderr["paddle_tl"]] == [], stderr["paddle_tl"]
