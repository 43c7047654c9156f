"""A network in inference form: saved as a static program (paddle.jit.save)
and run by Paddle Inference. Export writes one for deployment; the feature
cache and the report run one, because on CPU it is several times faster than
the dynamic graph for the same numbers."""

import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from paddle_tl.errors import ConfigError, ExportError
from paddle_tl.runtime import PIR_OUT_WARNING, import_paddle, stderr_lines_dropped

paddle = import_paddle()

PREFIX = "inference"
# paddle.jit.save writes a PIR program (.json, Paddle 3 default) or a legacy ProgramDesc (.pdmodel).
MODEL_FILES = (f"{PREFIX}.json", f"{PREFIX}.pdmodel")
PARAMS_FILE = f"{PREFIX}.pdiparams"
# The exported model's one input: float32 images [N, 3, input_size, input_size].
INPUT_NAME = "image"
# Initial GPU memory pool (--gpu_mem); Paddle Inference grows it on demand.
GPU_MEMORY_POOL_MB = 256
TRT_PRECISIONS = ("fp32", "fp16")


class _BatchedModel:
    """Runs any number of images in batches of at most batch_size, the largest
    batch the model is prepared for."""

    def __init__(self, batch_size):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def run(self, batch):
        return np.concatenate([self._run(np.ascontiguousarray(batch[start:start + self.batch_size], dtype=np.float32))
                               for start in range(0, len(batch), self.batch_size)])


# What Paddle Inference's oneDNN INT8 passes print on stderr when a
# predictor is made for an INT8 model, disable_glog_info() notwithstanding:
# how many ops of each of some 30 kinds they quantized or squashed, most 0.
INT8_PASS_COUNTS = ("---    quantized ", "---    squashed ")


def inference_config(model_file, params_file, device="cpu", cpu_threads=None, use_mkldnn=True, gpu_mem=None):
    """A Paddle Inference Config for a saved model: on GPU with a gpu_mem MB
    initial pool, or on CPU with cpu_threads threads (default all cores) and
    oneDNN unless use_mkldnn is false. Quiet (no glog lines)."""
    config = paddle.inference.Config(str(model_file), str(params_file))
    if device == "gpu":
        if not paddle.device.is_compiled_with_cuda():
            raise ConfigError("device gpu: this paddle build has no CUDA support (install paddlepaddle-gpu, "
                              "or use --device cpu)")
        config.enable_use_gpu(gpu_mem or GPU_MEMORY_POOL_MB, 0)
    elif device == "cpu":
        if gpu_mem:  # refused to users as flags (flags.py); a caller's bug here
            raise ValueError("gpu_mem applies only on device gpu")
        config.disable_gpu()
        if use_mkldnn:
            config.enable_mkldnn()
        else:
            config.disable_mkldnn()
        config.set_cpu_math_library_num_threads(cpu_threads or os.cpu_count() or 1)
    else:
        raise ConfigError(f"device {device!r}: expected cpu or gpu")
    config.disable_glog_info()
    return config


class StaticModel(_BatchedModel):
    """A static model run by Paddle Inference: float32 batches in, outputs out.
    Loaded once and reusable; oneDNN on CPU by default. On device gpu only:
    gpu_mem (MB, the initial memory pool) and trt ("fp32" or "fp16": TensorRT
    subgraphs, which need the model's input image_size). int8: a quantized
    model (export --int8), run on CPU with oneDNN INT8 kernels."""

    def __init__(self, model_file, params_file, device="cpu", cpu_threads=None, use_mkldnn=True, batch_size=8,
                 gpu_mem=None, trt=None, image_size=None, int8=False):
        super().__init__(batch_size)
        if int8 and (device != "cpu" or not use_mkldnn):
            raise ConfigError("an INT8 model (export --int8) runs on CPU with oneDNN: leave out --device gpu "
                              "and --no_mkldnn")
        if device == "cpu" and trt:  # refused to users as flags (flags.py); a caller's bug here
            raise ValueError("trt applies only on device gpu")
        config = inference_config(model_file, params_file, device, cpu_threads, use_mkldnn, gpu_mem)
        if device == "gpu" and trt:
            self._enable_trt(config, trt, image_size)
        if int8:
            config.enable_mkldnn_int8()
        with stderr_lines_dropped(*(INT8_PASS_COUNTS if int8 else ())):
            self._predictor = paddle.inference.create_predictor(config)
        self._input = self._predictor.get_input_handle(self._predictor.get_input_names()[0])
        self._output = self._predictor.get_output_handle(self._predictor.get_output_names()[0])
        self._model_file = Path(model_file)

    def input_shape(self):
        """[N, 3, H, W] as the model file declares its input (-1: any), or None
        where it cannot tell: Paddle Inference's input handle reports no shape
        before the first run, so the program itself is read."""
        return declared_input_shape(self._model_file)

    def _enable_trt(self, config, precision, size):
        """TensorRT subgraphs for batches of 1..batch_size. Untested: written
        on machines without a GPU build of paddle."""
        if precision not in TRT_PRECISIONS:
            raise ConfigError(f"--trt {precision!r}: expected one of {', '.join(TRT_PRECISIONS)}")
        modes = {"fp32": paddle.inference.PrecisionType.Float32, "fp16": paddle.inference.PrecisionType.Half}
        config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=self.batch_size, min_subgraph_size=3,
                                      precision_mode=modes[precision], use_static=False, use_calib_mode=False)
        # The batch dimension is dynamic, so TensorRT needs its range; the image size is fixed.
        smallest, largest = ({INPUT_NAME: [batch, 3, size, size]} for batch in (1, self.batch_size))
        config.set_trt_dynamic_shape_info(smallest, largest, largest)

    def _run(self, chunk):
        self._input.reshape(list(chunk.shape))
        self._input.copy_from_cpu(chunk)
        self._predictor.run()
        return self._output.copy_to_cpu()


def declared_input_shape(model_file):
    """The shape save_static gave the input "image" ([-1, 3, S, S]), read from
    a PIR program (.json) or a legacy ProgramDesc (.pdmodel); None for a file
    it cannot parse, since these formats are paddle's own and may change."""
    model_file = Path(model_file)
    try:
        if model_file.suffix == ".json":
            return _pir_input_shape(json.loads(model_file.read_text()))
        from paddle.base.proto import framework_pb2
        program = framework_pb2.ProgramDesc()
        program.ParseFromString(model_file.read_bytes())
        for var in program.blocks[0].vars:
            if var.name == INPUT_NAME:
                return list(var.type.dense_tensor.tensor.dims)
    except Exception:  # an unknown layout means no check, never a failure: Paddle Inference loaded the file
        return None
    return None


def _pir_input_shape(node):
    """The "shape" attribute of the program's data op named "image"."""
    if isinstance(node, dict):
        if str(node.get("#", "")).endswith(".data"):
            attributes = {item.get("N"): (item.get("AT") or {}).get("D") for item in node.get("A", [])
                          if isinstance(item, dict)}
            if attributes.get("name") == INPUT_NAME and isinstance(attributes.get("shape"), list):
                return attributes["shape"]
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _pir_input_shape(child)
        if found is not None:
            return found
    return None


def dynamic_runner(network):
    """run(images) -> the network's outputs as numpy, in eval mode, without
    gradients (the dynamic graph: what training computes)."""
    network.eval()

    def run(images):
        with paddle.no_grad():
            return network(images).numpy()

    return run


@contextlib.contextmanager
def fastest_runner(network, input_size, batch_size, device):
    """Yields run(images) -> the network's outputs as numpy, in eval mode. On
    CPU through a temporary static model run by Paddle Inference with oneDNN,
    several times faster than the dynamic graph for the same numbers (within
    float tolerance); on GPU (or with device "dynamic") the dynamic graph."""
    if device != "cpu":
        yield dynamic_runner(network)
        return
    network.eval()
    with temporary_static_model(network, input_size, batch_size) as model:
        yield lambda images: model.run(images.numpy())


@contextlib.contextmanager
def temporary_static_model(network, input_size, batch_size):
    """The network saved in inference form to a temporary folder and loaded
    by Paddle Inference (CPU, oneDNN), for the length of the context."""
    with tempfile.TemporaryDirectory(prefix="paddle_tl_static_") as folder:
        folder = Path(folder)
        model_file = save_static(network, input_size, folder)
        yield StaticModel(folder / model_file, folder / PARAMS_FILE, batch_size=batch_size)


def save_static(network, input_size, out_dir):
    """Save the network in inference form; returns the model file's name.

    The network is in eval mode (trained_model), so every BatchNorm, frozen or
    not, is traced with its running statistics."""
    # An int is an image size; a tuple is the shape of one input of another
    # kind (stored activations, for the layers after a cut).
    shape = [3, input_size, input_size] if isinstance(input_size, int) else list(input_size)
    return save_program(network, [paddle.static.InputSpec([None, *shape], "float32", INPUT_NAME)], out_dir)


def save_program(network, input_spec, out_dir):
    """Save the network traced for `input_spec` (paddle.static.InputSpecs)
    in inference form; returns the model file's name."""
    for name in MODEL_FILES:
        (out_dir / name).unlink(missing_ok=True)  # a stale model file from an older export: ambiguous
    with stderr_lines_dropped(*PIR_OUT_WARNING):  # paddle's own code, not the user's network: nothing to act on
        paddle.jit.save(network, str(out_dir / PREFIX), input_spec=input_spec)
    written = [name for name in MODEL_FILES if (out_dir / name).is_file()]
    if not written or not (out_dir / PARAMS_FILE).is_file():
        raise ExportError(f"paddle.jit.save wrote no {' or '.join(MODEL_FILES)} + {PARAMS_FILE} in {out_dir}")
    return written[0]
