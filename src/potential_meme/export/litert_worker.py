"""Converts a Hugging Face folder to TFLite and serves it, in the Python that has Google's converter (litert-torch)
and runtime (ai-edge-litert). Runs as `python -c <this file's text> convert|serve ...`: it imports nothing of
potential-meme, whose own requirements those packages conflict with.

    convert MODEL_DIR OUT.tflite LENGTH PRECISION   a graph of token ids int32 [1, LENGTH] to logits
                                          [1, LENGTH, vocab], weights in PRECISION (fp32 or fp16)
    serve OUT.tflite                      reads token ids [1, n <= LENGTH] from stdin, right-pads them to
                                          LENGTH (a causal model's first n logits do not see the padding),
                                          writes the first n positions' logits to stdout, until EOF

Arrays cross the pipes as .npy bytes behind their length (8 bytes, little-endian): numpy cannot seek a pipe.
"""

import io
import os
import sys

import numpy as np


def send(stream, array) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    stream.write(len(buffer.getvalue()).to_bytes(8, "little") + buffer.getvalue())
    stream.flush()


def receive(stream):
    """The next array, or None at the end of the stream."""
    size = stream.read(8)
    if len(size) < 8:
        return None
    return np.load(io.BytesIO(stream.read(int.from_bytes(size, "little"))))


def convert(model_dir: str, out: str, length: int, precision: str) -> None:
    import litert_torch
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    class LogitsOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, use_cache=False).logits

    # litert-torch 0.10 cannot lower a dynamic sequence axis (its int64 rewrite fails on arange): the length is fixed
    # fp16 weights through the converter's recipe: a half-precision module does not lower (embedding lookup)
    recipe = None
    if precision == "fp16":
        from litert_torch.generative.quantize import quant_recipes

        recipe = quant_recipes.full_fp16_recipe()
    sample = (torch.zeros(1, length, dtype=torch.int32),)
    litert_torch.convert(LogitsOnly().eval(), sample, quant_config=recipe).export(out)


def serve(path: str) -> None:
    from ai_edge_litert.interpreter import Interpreter

    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever the runtime prints goes to stderr; stdout carries the replies alone
    interpreter = Interpreter(model_path=path)
    (signature,) = interpreter.get_signature_list().values()
    (name,), (output,) = signature["inputs"], signature["outputs"]
    runner = interpreter.get_signature_runner()
    length = int(interpreter.get_input_details()[0]["shape"][1])
    while (ids := receive(sys.stdin.buffer)) is not None:
        padded = np.zeros((1, length), dtype=np.int32)
        padded[:, : ids.shape[1]] = ids
        send(replies, runner(**{name: padded})[output][:, : ids.shape[1]])


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "convert":
        convert(arguments[0], arguments[1], int(arguments[2]), arguments[3])
    else:
        serve(arguments[0])
