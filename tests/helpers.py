"""Small real models with random weights, for tests that need no pretrained weights."""

from flax import nnx

from jaxdistill import sampling
from jaxdistill.models import Decoder, ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """Gemma-3-like by default: local/global layers with a small window, so caches cross it."""
    fields = dict(arch="gemma3", vocab_size=64, d_model=32, d_ff=64, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=8, rope_theta=10000.0, local_rope_theta=1000.0, sliding_window=6,
                  layer_is_local=(True, True, False, True), qk_norm=True, sandwich_norm=True, embed_scale=True,
                  activation="gelu_tanh", max_seq_len=256)
    return ModelConfig(**(fields | overrides))


def tiny_model(seed=0, **overrides) -> Decoder:
    return Decoder(tiny_config(**overrides), rngs=nnx.Rngs(seed))


# The two-process sampling check (distributed_worker.py): 16 rows, 8 per process, with repeats
# in the first process's rows only (prefix sharing, decided for both) and stop ids that end
# some rows early (compaction every 4 steps).
SAMPLING_PROMPTS = ([[1, 5, 9], [3, 3], [7], [1, 5, 9], [6, 2], [9], [3, 3], [8]]
                    + [[1, 5, 9], [3, 3], [7], [4, 4], [6, 2], [9], [5], [8]])
SAMPLING_SETTINGS = dict(max_new_tokens=24, rule=sampling.Sample(1.5), rng=11, eos_ids=(2, 3, 4), compact_every=4)


def read_board(workdir) -> dict:
    """A work directory's TensorBoard events, read back from the files (TFRecord framing, Event
    protos): {"scalars": {tag: {step: value}}, "text": {tag: text}, "images": {tag: (h, w)}, "files": n}.
    A resumed run's START marker hides the earlier events at and after its step, as TensorBoard does."""
    import struct
    from pathlib import Path

    from tensorboardX.proto import event_pb2

    out = {"scalars": {}, "text": {}, "images": {}, "files": 0}
    for file in sorted(Path(workdir, "tensorboard").glob("events.out.tfevents.*")):
        out["files"] += 1
        data, pos = file.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])  # after length and its crc
            pos += 12 + length + 4
            if event.session_log.status == event_pb2.SessionLog.START:  # purge_step
                for series in out["scalars"].values():
                    for step in [s for s in series if s >= event.step]:
                        del series[step]
            for value in event.summary.value:
                if value.HasField("image"):
                    out["images"][value.tag] = (value.image.height, value.image.width)
                elif value.metadata.plugin_data.plugin_name == "text":
                    out["text"][value.tag] = value.tensor.string_val[0].decode()
                else:
                    out["scalars"].setdefault(value.tag, {})[event.step] = value.simple_value
    return out
